"""What a rollout costs the line (adtr_deploy/runtime/rollout.py): a run over image files with a versioned model folder;
version 2 is published at the 200th record and switched in while the run goes on.

    python benchmarks/rollout_switch.py                  # tiny exports at 64 and 256 px, 1 and 2 streams, 3 rounds

Reported per setting and round: the records (all images, each once), where the switch came, the time from publishing to
the first record of version 2 (the watcher's poll, opening and verifying the new version beside the running one, the
next batch boundary), the median gap between two consecutive records, the largest gap among the records around the
switch (the three before the first record of version 2 and the two after it), and the largest gap elsewhere in the run
(ordinary jitter on a shared machine). Run it under the CPU lock on a
shared machine: `flock /tmp/adtr-cpu.lock python benchmarks/rollout_switch.py`.

The models are the tests' tiny ADTR (untrained, seeded): a switch's own work (drain the in-flight batches, swap, close
the old session) does not depend on the model's size; opening and verifying the new one does, and runs beside the line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adtr_deploy.bench.studies import command_line, machine, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(work: Path, exports: list[list[Path]], images: Path, streams: int, poll_s: float) -> dict:
    import cv2  # noqa: F401 -- the pipeline's decoder, imported before timing

    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.modelrepo import ModelRepo
    from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
    from adtr_deploy.runtime.rollout import Rollout
    from adtr_deploy.runtime.sources import open_source

    shutil.rmtree(work / "models", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    repo = ModelRepo(work / "models" / "m")
    repo.publish(exports[0], {"by": "benchmark"})
    rollout = Rollout(repo, lambda f: open_model(f, "cpu", streams=streams), poll_s=poll_s, log=lambda m: None)
    times, versions, published = [], [], []

    def on_record(record, counts):
        times.append(time.perf_counter())
        versions.append(record["model_version"])
        if counts["images"] == 200:
            published.append(time.perf_counter())
            repo.publish(exports[1], {"by": "benchmark"})

    pipeline = Pipeline(
        rollout.open_first(), open_source(str(images)), work / "out", RunOptions(workers=2), on_record=on_record
    )
    rollout.attach(pipeline)
    rollout.start()
    try:
        summary = pipeline.run()
    finally:
        rollout.close()
        pipeline.backend.close()
    k = versions.index(2)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "records": summary["images"],
        "switch_at_record": k,
        "publish_to_first_v2_ms": round(1000 * (times[k] - published[0]), 1),
        "median_gap_ms": round(1000 * statistics.median(gaps), 2),
        "largest_gap_at_switch_ms": round(1000 * max(gaps[k - 3 : k + 2]), 2),
        "largest_gap_elsewhere_ms": round(1000 * max(gaps[: k - 3] + gaps[k + 2 :]), 2),
    }


def markdown(result: dict) -> str:
    lines = [
        "| input | streams | round | records | switch at | publish -> first v2 record | median gap | largest gap at the switch | largest gap elsewhere |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['size']} | {r['streams']} | {r['round']} | {r['records']} | {r['switch_at_record']} | "
            f"{r['publish_to_first_v2_ms']} ms | {r['median_gap_ms']} ms | {r['largest_gap_at_switch_ms']} ms | "
            f"{r['largest_gap_elsewhere_ms']} ms |"
        )
    return "\n".join(lines) + f"\n\n`{result['command']}`; machine: {result['machine']}\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--streams", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adtr-rollout-switch")
    parser.add_argument("--out", type=Path, default=RESULTS / "rollout_switch.json")
    args = parser.parse_args(argv)
    import cv2

    from tests.conftest import export_tiny_onnx, texture_images

    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / f"images{args.images}"
    if not images.is_dir():
        images.mkdir()
        for i, image in enumerate(texture_images(args.images, 256, seed=7)):
            cv2.imwrite(str(images / f"{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    runs = []
    for size in map(int, args.sizes.split(",")):
        exports = []
        for seed in (1, 2):
            folder = args.work / f"export{size}_{seed}"
            if not (folder / "model.onnx").is_file():
                folder.mkdir(exist_ok=True)
                export_tiny_onnx(folder, seed=seed, size=size)
            exports.append([folder / "model.onnx", folder / "model.json"])
        for streams in map(int, args.streams.split(",")):
            for r in range(1, args.rounds + 1):
                run = one_run(args.work, exports, images, streams, args.poll)
                runs.append({"size": size, "streams": streams, "round": r, **run})
    result = {"command": command_line("rollout_switch.py", argv), "machine": machine(), "runs": runs}
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
