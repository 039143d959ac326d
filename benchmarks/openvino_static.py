"""OpenVINO's static-shape compilations against its dynamic-batch one, ONNX Runtime FP32 beside them (issue 27).

    python benchmarks/openvino_static.py --exports OV_WORK/brick --images VAL/brick/test/good \
        --out benchmarks/results/openvino_static.json

Our exports keep the batch axis dynamic. The OpenVINO backend compiles the model once more for each batch (part) size
it meets (runtime/openvino.py, STATIC_SHAPES); this measures what that buys, in one process: the FP32 ONNX export on
ONNX Runtime (the reference), and on OpenVINO dynamic-only (static_shapes=0) and with static shapes; the INT8 IR
(EXPORTS/openvino-int8) the same two ways. Batch 1 and 8 of real images, every backend timed in interleaved blocks
(adtr_deploy.bench.timing), `--threads` threads, one stream; the first call of a new size (its compilation) is outside
the timed calls and reported apart. Outputs of static and dynamic compilations are compared (max score difference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def markdown(report: dict) -> str:
    lines = ["# OpenVINO: static-shape compilations against the dynamic-batch one (issue 27)", ""]
    lines += [f"Command: `{report['command']}`", ""]
    lines += [f"CPU: {report['cpu']['model']}; flags: {', '.join(report['cpu']['flags'])}; threads {report['threads']}"]
    lines[-1] += ", one stream; one process, blocks interleaved; medians."
    lines += [
        "",
        "| backend | batch 1 ms/img (vs ORT FP32) | batch 8 ms/img (vs ORT FP32) | first call of each size, ms |",
    ]
    lines.append("|---|---|---|---|")
    base = report["ms"]["onnxruntime fp32"]
    for name, ms in report["ms"].items():
        cells = [f"{ms[b]:.1f} ({base[b] / ms[b]:.2f}x)" for b in ("1", "8")]
        first = report["first_call_ms"].get(name, {})
        lines.append(
            f"| {name} | " + " | ".join(cells) + " | " + ", ".join(f"{k}: {v:.0f}" for k, v in first.items()) + " |"
        )
    lines += ["", "Largest score difference, static against dynamic compilation (relative): "]
    lines[-1] += ", ".join(f"{k} {v:.1e}" for k, v in report["static_vs_dynamic"].items()) + "."
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from adtr_deploy.bench.studies import command_line, write_result
    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved
    from adtr_deploy.preprocess import IMAGE_SUFFIXES, load_image, stack_batch
    from adtr_deploy.runtime import open_model
    from adtr_deploy.runtime.cpu import cpu_info
    from adtr_deploy.runtime.openvino import OpenVINOBackend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exports", type=Path, required=True, help="a folder with onnx-fp32/ and openvino-int8/ exports")
    ap.add_argument("--images", type=Path, required=True, help="a folder of real images (at least 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "openvino_static.json")
    args = ap.parse_args(argv)
    fp32, int8 = args.exports / "onnx-fp32" / "model.onnx", args.exports / "openvino-int8" / "model.xml"
    engines = {
        "onnxruntime fp32": open_model(fp32, "cpu", backend="onnxruntime", threads=args.threads),
        "openvino fp32, dynamic only": OpenVINOBackend(fp32, threads=args.threads, static_shapes=0),
        "openvino fp32, static shapes": OpenVINOBackend(fp32, threads=args.threads),
        "openvino int8, dynamic only": OpenVINOBackend(int8, threads=args.threads, static_shapes=0),
        "openvino int8, static shapes": OpenVINOBackend(int8, threads=args.threads),
    }
    size = engines["onnxruntime fp32"].spec.input_size
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:8]
    batches = {b: stack_batch(load_image(p, size) for p in np.resize(np.array(files, dtype=object), b)) for b in (1, 8)}
    report = {"command": command_line("openvino_static.py", argv), "cpu": cpu_info(), "threads": args.threads}
    report["first_call_ms"], outputs = {}, {}
    for name, engine in engines.items():
        for b, batch in batches.items():
            t0 = time.perf_counter()
            outputs[(name, b)] = engine.run(batch)
            report["first_call_ms"].setdefault(name, {})[f"batch {b}"] = 1000 * (time.perf_counter() - t0)

    def largest_difference(kind: str) -> float:
        """The largest relative score difference between the static and the dynamic compilation of one export."""
        diffs = []
        for b in batches:
            static, dynamic = (
                outputs[(f"openvino {kind}, static shapes", b)][1],
                outputs[(f"openvino {kind}, dynamic only", b)][1],
            )
            diffs.append(float(np.max(np.abs(static - dynamic) / np.abs(dynamic))))
        return max(diffs)

    report["static_vs_dynamic"] = {kind: largest_difference(kind) for kind in ("fp32", "int8")}
    plan = TimingPlan(warmup=2, min_iters=10, min_seconds=args.min_seconds)
    report["ms"] = {name: {} for name in engines}
    for b, batch in batches.items():
        calls = {name: (lambda e=engine, x=batch: e.run(x)) for name, engine in engines.items()}
        samples = measure_interleaved(calls, plan)
        for name, s in samples.items():
            report["ms"][name][str(b)] = 1000 * float(np.median(s)) / b
        print(f"batch {b}: " + ", ".join(f"{n} {report['ms'][n][str(b)]:.1f}" for n in engines), flush=True)
    write_result(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
