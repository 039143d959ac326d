"""Many cameras, one process (issue 25): aggregate frames per second, per-camera latency and memory of N cameras in one
`adtr-run` (one model in memory, frames of all cameras batched together) against N separate `adtr-run` processes, for
N = 1, 2, 4, 8, measured side by side in one run.

    flock /tmp/adtr-cpu.lock python benchmarks/multicam.py --images 'DEMO/grass/test/**/*.png'   # untrained lite0
    flock /tmp/adtr-cpu.lock python benchmarks/multicam.py --model EXPORT/model.onnx --images '...'

Cameras are real MJPEG streams on 127.0.0.1 served from this script (real photographs, JPEG, --size pixels, --fps
frames per second each, more than the CPU can score, so what is measured is the capacity). Each configuration runs
until every camera has a record (N processes load N models), then --warmup + --seconds more, and is stopped with
SIGTERM; the first --warmup seconds after the last camera's first record are left out. From the
records themselves: aggregate fps = ok records of all cameras within the common window / its length; latency =
each record's latency_ms (frame taken from the camera to its record written). Memory: the processes' resident set
(RSS) and proportional set (PSS: shared library pages split between the processes that map them, so N processes are
not charged N times for one libonnxruntime) summed over the processes and sampled every 0.5 s; the peak is reported.
Writes benchmarks/results/multicam.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from adtr_deploy.bench.camera import MjpegCamera
from adtr_deploy.bench.studies import command_line, machine, write_result

RESULTS = Path(__file__).resolve().parent / "results"
RUN = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()"]


def jpeg_frames(pattern: str, size: int, n: int = 30) -> list[bytes]:
    import cv2

    files = sorted(glob.glob(pattern, recursive=True))[:n]
    if not files:
        raise SystemExit(f"--images {pattern!r} matches no files")
    return [cv2.imencode(".jpg", cv2.resize(cv2.imread(f), (size, size)))[1].tobytes() for f in files]


def sample_memory(procs: list[subprocess.Popen], stop: threading.Event, peak: dict) -> None:
    import psutil

    handles = [psutil.Process(p.pid) for p in procs]
    while not stop.is_set():
        rss = pss = 0
        try:
            for h in handles:
                info = h.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
        stop.wait(0.5)


def read_folder(folder: Path) -> dict[str, list[dict]]:
    """Records by camera: a line folder holds one folder per camera, a single run's folder one camera."""
    from adtr_deploy.runtime.outdir import read_records

    by_camera: dict[str, list[dict]] = {}
    for rec in read_records(folder):
        by_camera.setdefault(rec.get("camera") or folder.name, []).append(rec)
    return by_camera


def run_config(args, cams: list[MjpegCamera], config: str, work: Path) -> dict:
    """Start the configuration, wait until every camera has a record (N processes load N models, one after the
    other on a busy CPU), let them run --warmup + --seconds together, stop them with SIGTERM, read the records."""
    n = len(cams)
    base = ["--model", str(args.model), "-q", "--device", args.device, "--backend", args.backend]
    one_process = config != "separate"
    if config == "one-streams":
        base += ["--streams", str(args.streams)]
    if one_process:
        sources = [a for i, c in enumerate(cams) for a in ("--source", f"cam{i + 1}={c.url}")]
        extra = ["--max-batch", str(args.max_batch or n), "--max-wait-ms", str(args.max_wait_ms)]
        cmds = [RUN + base + sources + extra + ["--out", str(work / "line")]]
        folders = [work / "line"]
        results = [work / "line" / f"cam{i + 1}" / "results.jsonl" for i in range(n)]
    else:
        folders = [work / f"cam{i + 1}" for i in range(n)]
        cmds = [RUN + base + ["--source", c.url, "--out", str(f)] for c, f in zip(cams, folders, strict=True)]
        results = [f / "results.jsonl" for f in folders]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    stop, peak = threading.Event(), {"rss": 0, "pss": 0}
    sampler = threading.Thread(target=sample_memory, args=(procs, stop, peak), daemon=True)
    sampler.start()
    deadline = time.monotonic() + 300
    while not all(r.is_file() and r.stat().st_size for r in results):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise SystemExit("adtr-run did not start:\n" + "\n".join(p.communicate()[1] for p in procs))
        time.sleep(0.2)
    time.sleep(args.warmup + args.seconds)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    stop.set()
    sampler.join()
    if any(p.returncode for p in procs):
        raise SystemExit("adtr-run failed:\n" + "\n".join(errors))
    records: dict[str, list[dict]] = {}
    for folder in folders:
        records.update(read_folder(folder))
    ok = {cam: [r for r in recs if r["status"] == "ok"] for cam, recs in records.items()}
    t0 = max(recs[0]["timestamp"] for recs in ok.values()) + args.warmup
    t1 = min(recs[-1]["timestamp"] for recs in ok.values())
    window = {cam: [r for r in recs if t0 <= r["timestamp"] <= t1] for cam, recs in ok.items()}
    per_camera = {
        cam: {
            "fps": round(len(recs) / (t1 - t0), 3),
            "p50_ms": round(float(np.percentile([r["latency_ms"] for r in recs], 50)), 2),
            "p99_ms": round(float(np.percentile([r["latency_ms"] for r in recs], 99)), 2),
        }
        for cam, recs in sorted(window.items())
    }
    batching = None
    if one_process:
        batching = json.loads((work / "line" / "line-summary.json").read_text())["batching"]["default"]
    return {
        "cameras": n,
        "config": {"one": "one process", "one-streams": f"one process, --streams {args.streams}"}.get(
            config, f"{n} processes"
        ),
        "window_s": round(t1 - t0, 3),
        "aggregate_fps": round(sum(len(r) for r in window.values()) / (t1 - t0), 3),
        "p50_ms_median": round(float(np.median([c["p50_ms"] for c in per_camera.values()])), 2),
        "p99_ms_max": round(max(c["p99_ms"] for c in per_camera.values()), 2),
        "per_camera": per_camera,
        "peak_rss_mb": round(peak["rss"] / 2**20, 1),
        "peak_pss_mb": round(peak["pss"] / 2**20, 1),
        "mean_batch": batching and batching["mean_batch"],
    }


def markdown(result: dict) -> str:
    lines = [
        "# Many cameras: one process against one process per camera",
        "",
        f"`{result['command']}`",
        "",
        f"Model {result['model']} on {result['device']}; cameras: MJPEG on 127.0.0.1, {result['fps']} fps each, {result['size']} px; "
        f"{result['seconds']} s per configuration, first {result['warmup']} s left out; machine: "
        f"{result['machine']['cpus']} CPUs, load {result['machine']['loadavg_1m_at_end']:.2f} at the end.",
        "",
        "| cameras | round | configuration | aggregate fps | latency p50 (median camera), ms | p99 (worst camera), ms "
        "| mean batch | peak RSS, MB | peak PSS, MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cameras']} | {r.get('round', 1)} | {r['config']} | {r['aggregate_fps']:.1f} | {r['p50_ms_median']:.1f} | "
            f"{r['p99_ms_max']:.1f} | {r['mean_batch'] or '-'} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="an export; default: --preset exported untrained")
    p.add_argument("--preset", default="lite0", help="without --model: this preset, exported untrained (fixed seed)")
    p.add_argument("--images", required=True, help="glob of real photographs the cameras show")
    p.add_argument("--cameras", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--warmup", type=float, default=6.0)
    p.add_argument("--fps", type=float, default=30.0, help="each camera's frame rate")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-batch", type=int, default=None, help="one process: --max-batch (default: the camera count)")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu", help="adtr-run --device (cuda on a GPU machine: gpu_check.sh)")
    p.add_argument("--backend", default="auto", help="adtr-run --backend (e.g. torchscript with a CUDA PyTorch)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the configurations, alternating, this many times")
    p.add_argument("--streams", type=int, default=0, help="also one process with adtr-run --streams N (0: not)")
    p.add_argument("--out", type=Path, default=RESULTS / "multicam.json")
    args = p.parse_args(argv)
    frames = jpeg_frames(args.images, args.size)
    work = Path(tempfile.mkdtemp(prefix="adtr-multicam-model-"))
    if args.model is None:  # timing does not depend on the weights (serve_overhead.py does the same)
        from serve_overhead import export_untrained

        args.model = export_untrained(args.preset, work)
    rows = []
    for n in [int(x) for x in args.cameras.split(",")]:
        cams = [MjpegCamera(frames, args.fps) for _ in range(n)]
        configs = ["one"] + (["one-streams"] if args.streams > 1 else []) + ["separate"]
        try:
            for round_ in range(1, args.rounds + 1):
                for config in configs if round_ % 2 else configs[::-1]:  # alternate the order between rounds
                    with tempfile.TemporaryDirectory(prefix="adtr-multicam-") as tmp:
                        row = {**run_config(args, cams, config, Path(tmp)), "round": round_}
                    print(json.dumps({k: v for k, v in row.items() if k != "per_camera"}), flush=True)
                    rows.append(row)
        finally:
            for cam in cams:
                cam.close()
    result = {
        "command": command_line("multicam.py", argv),
        "model": f"untrained {args.preset} export" if str(args.model).startswith(str(work)) else str(args.model),
        "fps": args.fps,
        "size": args.size,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "max_wait_ms": args.max_wait_ms,
        "device": args.device,
        "rows": rows,
        "machine": machine(),
    }
    write_result(result, args.out, markdown)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
