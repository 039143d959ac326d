"""INT8 calibration methods on validation splits: which one should adtr-export use by default (issue 27)?

    python benchmarks/int8_calibration.py --data VAL_ROOT --runs RUNS --categories brick,grass,gravel,moon,stars,tissue \
        --work /tmp/calib --out benchmarks/results/int8_calibration_val.json

For each category, in one process: the FP32 ONNX export of RUNS/CATEGORY (adtr-export's defaults), then one INT8 export
per `--methods` (minmax, percentile, entropy; everything else adtr-export's defaults, the dynamo exporter included),
each verified against the checkpoint on VAL_ROOT/CATEGORY/test/good like any export (a refused one is exported again
unverified and marked), and every export evaluated with adtr-eval's code on VAL_ROOT/CATEGORY/test through ONNX
Runtime and through OpenVINO (the INT8 ONNX file, f32 for what INT8 leaves float: what `--backend openvino` runs).
VAL_ROOT/CATEGORY/test must be a validation split (held-out training images with synthetic defects: data/validation.py),
never the test split: the method chosen here becomes a default. The table gives each method's image / pixel AUROC delta
against FP32 per category, the mean and the worst.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = ("openvino", "onnxruntime")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(path: Path, backend: str, dataset) -> tuple[float, float]:
    from adtr_deploy.runtime import open_model
    from adtr_deploy.train.evaluate import BackendRunner, evaluate_runner

    metrics, _ = evaluate_runner(BackendRunner(open_model(path, "cpu", backend=backend)), dataset, batch_size=8)
    return 100 * metrics["image_auroc"], 100 * metrics["pixel_auroc"]


def measure(run: Path, data: Path, category: str, methods: list[str], work: Path, verify_on_split: bool = True) -> dict:
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.export.verify import VerificationError

    dataset = open_dataset(data, category)
    # a validation split verifies on its own good images; a test split leaves it to adtr-export (held-out training images)
    verify = str(data / category / "test" / "good") if verify_on_split else None
    export_checkpoint(run, "onnx", work / "fp32", verify_images=verify)
    fp32 = evaluate(work / "fp32", "onnxruntime", dataset)
    out = {"fp32": {"image": fp32[0], "pixel": fp32[1]}, "methods": {}}
    for method in methods:
        t0 = time.time()
        folder = work / method
        try:
            export_checkpoint(run, "onnx", folder, precision="int8", calib_method=method, verify_images=verify)
            verified = "verified"
        except VerificationError as exc:
            verified = f"refused: {exc}"
            export_checkpoint(run, "onnx", folder, precision="int8", calib_method=method, verify=False)
        row = {"verification": verified, "export_and_eval_s": None}
        for backend in BACKENDS:
            image, pixel = evaluate(folder, backend, dataset)
            row[backend] = {
                "image": image,
                "pixel": pixel,
                "image_delta": image - fp32[0],
                "pixel_delta": pixel - fp32[1],
            }
        row["export_and_eval_s"] = round(time.time() - t0, 1)
        out["methods"][method] = row
        log(
            f"{category} {method}: "
            + ", ".join(f"{b} {row[b]['image_delta']:+.2f} / {row[b]['pixel_delta']:+.2f}" for b in BACKENDS)
        )
    return out


def markdown(report: dict) -> str:
    cats = list(report["categories"])
    methods = report["methods"]
    lines = ["# INT8 calibration method, chosen on validation splits (issue 27)", ""]
    lines += [f"Command: `{report['command']}`", ""]
    lines += [f"CPU: {report['cpu']['model']}; flags: {', '.join(report['cpu']['flags'])}.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    split = report.get("split", "validation")
    lines += [f"Image / pixel AUROC delta against the FP32 export (points), {split} split of each category.", ""]
    for backend in BACKENDS:
        lines += [f"## Through {backend}", ""]
        lines += [
            "| method | " + " | ".join(cats) + " | mean image | worst image |",
            "|---|" + "---|" * (len(cats) + 2),
        ]
        for m in methods:
            cells, images = [], []
            for c in cats:
                r = report["categories"][c]["methods"][m]
                mark = "" if r["verification"] == "verified" else " (refused)"
                cells.append(f"{r[backend]['image_delta']:+.2f} / {r[backend]['pixel_delta']:+.2f}{mark}")
                images.append(r[backend]["image_delta"])
            lines.append(
                f"| {m} | " + " | ".join(cells) + f" | {sum(images) / len(images):+.2f} | {min(images):+.2f} |"
            )
        lines.append("")
    lines += [
        "FP32 image / pixel AUROC: "
        + ", ".join(
            f"{c} {report['categories'][c]['fp32']['image']:.2f} / {report['categories'][c]['fp32']['pixel']:.2f}"
            for c in cats
        )
        + "."
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from adtr_deploy.bench.studies import command_line, write_result
    from adtr_deploy.runtime.cpu import cpu_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, required=True, help="MVTec-layout root whose CATEGORY/test is a validation split"
    )
    ap.add_argument(
        "--runs", type=Path, required=True, help="folder of adtr-train runs, one per category (RUNS/CATEGORY)"
    )
    ap.add_argument("--categories", default="brick,grass,gravel,moon,stars,tissue")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument(
        "--test-split",
        action="store_true",
        help="DATA/CATEGORY/test is the test split (the chosen setting's figure): verify on adtr-export's own images",
    )
    ap.add_argument("--work", type=Path, required=True, help="where the exports go (outside the repository)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_calibration_val.json")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    report = {"command": command_line("int8_calibration.py", argv), "cpu": cpu_info(), "methods": methods}
    report["categories"], report["split"] = {}, "test" if args.test_split else "validation"
    for category in args.categories.split(","):
        report["categories"][category] = measure(
            args.runs / category, args.data, category, methods, args.work / category
        )
        write_result(report, args.out, markdown)  # after each category: a long run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
