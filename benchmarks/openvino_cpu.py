"""The CPU paths of issue 27 side by side: ONNX Runtime FP32/INT8 and OpenVINO FP32/BF16/INT8, accuracy and speed.

    python benchmarks/openvino_cpu.py --data VAL_ROOT --run brick=RUN [--run grass=RUN ...] --time brick \
        --work /tmp/ov --out benchmarks/results/openvino_cpu.json

For each trained run, in one process:
1. export with adtr-export's own export_checkpoint (`--exporter`: dynamo, adtr-export's default, or the TorchScript-based
   one, whose graph computes its pads at run time), every export verified against the
   checkpoint on the good images of DATA/CATEGORY/test (a validation split: the run must not have trained on it):
   ONNX FP32, ONNX INT8, OpenVINO BF16, INT8 and INT8-BF16 (int8 layers, the rest bf16); an export refused by
   verification is exported again unverified (FOLDER-unverified) so its accuracy and speed can still be reported,
2. evaluate every (runtime, export) on DATA/CATEGORY/test with adtr-eval's code: image and pixel AUROC, the delta
   against ONNX Runtime FP32,
3. for --time categories: adtr-bench --choose-fastest's code on those exports (every candidate checked here against
   the FP32 export, timed interleaved at batch 1 and 8, refused ones timed too and marked), the choice and why.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# export folder -> (format, export_checkpoint keyword arguments)
EXPORTS: dict[str, tuple[str, dict]] = {
    "onnx-fp32": ("onnx", {}),
    "onnx-int8": ("onnx", {"precision": "int8"}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
    "openvino-int8": ("openvino", {"precision": "int8"}),
    "openvino-int8-bf16": ("openvino", {"precision": "int8-bf16"}),
}
# what is evaluated: label -> (export folder, runtime)
EVALUATED: dict[str, tuple[str, str]] = {
    "ONNX Runtime FP32": ("onnx-fp32", "onnxruntime"),
    "ONNX Runtime INT8": ("onnx-int8", "onnxruntime"),
    "OpenVINO FP32": ("onnx-fp32", "openvino"),
    "OpenVINO BF16": ("openvino-bf16", "openvino"),
    "OpenVINO INT8": ("openvino-int8", "openvino"),
    "OpenVINO INT8, the rest BF16": ("openvino-int8-bf16", "openvino"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_all(run: Path, verify_images: Path, work: Path, dynamo: bool = True) -> dict[str, dict]:
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.export.verify import VerificationError

    out = {}
    for folder, (fmt, kwargs) in EXPORTS.items():
        t0 = time.time()
        common = {"dynamo": dynamo, "verify_images": str(verify_images)}
        try:
            result = export_checkpoint(run, fmt, work / folder, **common, **kwargs)
            v = result.verification
            out[folder] = {"verified": True, "reason": v["reason"], "notes": list(result.notes)}
        except VerificationError as exc:
            out[folder] = {"verified": False, "reason": str(exc)}
            unverified = work / (folder + "-unverified")
            export_checkpoint(run, fmt, unverified, **{**common, "verify": False}, **kwargs)
            out[folder]["unverified_export"] = str(unverified)
        out[folder]["export_s"] = round(time.time() - t0, 1)
        log(f"exported {folder}: verified {out[folder]['verified']} ({out[folder]['reason'][:160]})")
    return out


def evaluate_all(data: Path, category: str, work: Path, exports: dict[str, dict]) -> dict[str, dict]:
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.runtime import open_model
    from adtr_deploy.train.evaluate import BackendRunner, evaluate_runner

    dataset = open_dataset(data, category)
    out = {}
    for label, (folder, runtime) in EVALUATED.items():
        path = work / folder
        if not exports[folder]["verified"]:
            path = Path(exports[folder]["unverified_export"])
        runner = BackendRunner(open_model(path, "cpu", backend=runtime))
        metrics, _ = evaluate_runner(runner, dataset, batch_size=8)
        out[label] = {
            "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"],
            "test_images": metrics["num_images"],
            "verified": exports[folder]["verified"],
            "inference_precision": runner.backend.describe().get("inference_precision")
            if hasattr(runner, "backend")
            else None,
        }
        log(f"{category} {label}: image AUROC {metrics['image_auroc']:.4f}, pixel {metrics['pixel_auroc']:.4f}")
    base = out["ONNX Runtime FP32"]
    for row in out.values():
        row["image_delta_points"] = 100 * (row["image_auroc"] - base["image_auroc"])
        row["pixel_delta_points"] = 100 * (row["pixel_auroc"] - base["pixel_auroc"])
    return out


def markdown(report: dict) -> str:
    lines = ["# CPU paths: ONNX Runtime and OpenVINO, FP32 / BF16 / INT8 (issue 27)", ""]
    lines += [f"Command: `{report['command']}`", "", f"CPU: {report['cpu']['model']}; flags: "]
    lines[-1] += ", ".join(report["cpu"]["flags"]) + "."
    lines += ["", "## Accuracy on the validation split (image / pixel AUROC, delta vs ONNX Runtime FP32 in points)", ""]
    cats = list(report["categories"])
    lines += ["| path | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for label in EVALUATED:
        cells = []
        for c in cats:
            r = report["categories"][c]["accuracy"][label]
            mark = "" if r["verified"] else " (refused by verification)"
            cells.append(
                f"{100 * r['image_auroc']:.1f} / {100 * r['pixel_auroc']:.1f} "
                f"({r['image_delta_points']:+.2f} / {r['pixel_delta_points']:+.2f}){mark}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Exports and verification", ""]
    for c in cats:
        for folder, e in report["categories"][c]["exports"].items():
            lines.append(f"- {c} {folder}: {'verified' if e['verified'] else 'REFUSED'}: {e['reason'][:300]}")
    for c, entry in report["categories"].items():
        if entry.get("choice"):
            from adtr_deploy.bench.choose import render

            lines += ["", f"## Speed ({c})", "", render(entry["choice"]).split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from adtr_deploy.bench.choose import choose_fastest
    from adtr_deploy.bench.studies import command_line, write_result
    from adtr_deploy.bench.timing import TimingPlan
    from adtr_deploy.preprocess import IMAGE_SUFFIXES
    from adtr_deploy.runtime.cpu import cpu_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, required=True, help="MVTec-layout root whose CATEGORY/test is a validation split"
    )
    ap.add_argument("--run", action="append", required=True, help="CATEGORY=RUN_DIR (an adtr-train folder)")
    ap.add_argument("--time", default="", help="comma-separated categories to time (--choose-fastest's code)")
    ap.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="ONNX exporter of every export (default: dynamo, what adtr-export writes by default)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=4.0)
    ap.add_argument("--work", type=Path, required=True, help="where the exports go (outside the repository)")
    ap.add_argument("--out", type=Path, default=RESULTS / "openvino_cpu.json")
    args = ap.parse_args(argv)
    report = {"command": command_line("openvino_cpu.py", argv), "cpu": cpu_info(), "categories": {}}
    for item in args.run:
        category, _, run = item.partition("=")
        work = args.work / category
        verify_images = args.data / category / "test" / "good"
        exports = export_all(Path(run), verify_images, work, dynamo=args.exporter == "dynamo")
        entry = {"run": run, "exports": exports, "accuracy": evaluate_all(args.data, category, work, exports)}
        if category in args.time.split(","):
            files = sorted(p for p in (args.data / category / "test").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            plan = TimingPlan(warmup=3, min_iters=10, min_seconds=args.min_seconds)
            entry["choice"] = choose_fastest(
                work,
                work / "choice",
                files,
                batch_sizes=(1, 8),
                plan=plan,
                threads=args.threads,
                log=log,
                time_refused=True,
            )
        report["categories"][category] = entry
        write_result(report, args.out, markdown)  # after each category: a long run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
