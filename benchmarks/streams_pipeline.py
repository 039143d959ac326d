"""adtr-run's whole pipeline (decode, preprocess, inference, postprocess, records) at batch 1 with 1 or 2 inference
streams, and with thread spinning: frames per second and per-frame latency from the run's own summary.json.

    python benchmarks/streams_pipeline.py --model EXPORT/model.onnx --images 'DEMO/grass/test/**/*.png' [--rounds 3]

The source is a real video file (real photographs written with OpenCV, 224x224 MJPG), processed frame by frame
at batch 1 as a camera's frames are; the configurations run in alternating rounds in one process. Writes
benchmarks/results/streams_pipeline.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from adtr_deploy.bench.studies import command_line, machine, write_result

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name -> OnnxRuntimeBackend options
    "1 session, 2 threads (default)": {"threads": 2},
    "1 session, 2 threads, spinning": {"threads": 2, "spinning": True},
    "2 streams x 1 thread": {"threads": 2, "streams": 2},
}


def write_video(path: Path, pattern: str, frames: int, size: int = 224) -> None:
    """A video of real photographs (the files matching `pattern`, resized), `frames` long."""
    import glob

    import cv2

    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise SystemExit(f"--images {pattern!r} matches no files")
    images = [cv2.resize(cv2.imread(f), (size, size)) for f in files[:frames]]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (size, size))
    for i in range(frames):
        writer.write(images[i % len(images)])
    writer.release()


def run_once(model: Path, video: Path, options: dict, out: Path) -> dict:
    from adtr_deploy.runtime import RunOptions, open_source, run_pipeline
    from adtr_deploy.runtime.backends import OnnxRuntimeBackend

    with OnnxRuntimeBackend(model, **options) as backend:
        return run_pipeline(backend, open_source(str(video)), out, RunOptions(batch_size=1, overwrite=True))


def markdown(r: dict) -> str:
    lines = [
        "# adtr-run's pipeline at batch 1: inference streams and spinning",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        f"Machine: {r['machine']['cpus']} CPUs; load average {r['load'][0]:.1f} at start, {r['load'][1]:.1f} at end. "
        f"Model: {r['model']}. Source: a {r['frames']}-frame video, batch 1; {r['rounds']} alternating rounds, "
        "medians. Frames per second and latency (frame taken to record written) from each run's summary.json.",
        "",
        "| configuration | frames/s | vs default | latency p50 ms | inference ms per frame |",
        "|---|---:|---:|---:|---:|",
    ]
    base = r["rows"][0]["fps"]
    for row in r["rows"]:
        lines.append(
            f"| {row['config']} | {row['fps']:.2f} | {row['fps'] / base:.2f}x | {row['latency_p50']:.1f} | "
            f"{row['infer_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument(
        "--images", required=True, help="glob of real images for the video, e.g. 'DEMO/grass/test/**/*.png'"
    )
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "streams_pipeline.json"))
    args = parser.parse_args(argv)

    load0 = os.getloadavg()[0]
    samples: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "line.avi"
        write_video(video, args.images, args.frames)
        for i in range(args.rounds):
            order = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                summary = run_once(args.model, video, CONFIGS[name], Path(tmp) / "out")
                samples[name].append(summary)
                print(f"round {i + 1} {name}: {summary['throughput_fps']:.2f} fps", flush=True)
    rows = [
        {
            "config": name,
            "options": CONFIGS[name],
            "fps": float(np.median([s["throughput_fps"] for s in runs])),
            "fps_all": [s["throughput_fps"] for s in runs],
            "latency_p50": float(np.median([s["latency_ms"]["p50"] for s in runs])),
            "infer_ms": float(np.median([s["inference_ms_per_image"] for s in runs])),
        }
        for name, runs in samples.items()
    ]
    result = {
        "command": command_line("streams_pipeline.py", argv),
        "machine": machine(),
        "model": str(args.model),
        "frames": args.frames,
        "rounds": args.rounds,
        "rows": rows,
        "load": [load0, os.getloadavg()[0]],
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
