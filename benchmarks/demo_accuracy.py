"""Accuracy of ADTR on the built-in demo data with the default settings: train and evaluate each texture category.

Runs the real command line for every category, exactly as a user would:

    adtr data demo --out ROOT                     (here: write_demo_dataset(ROOT))
    adtr-train --data ROOT --category brick --out RUNS/brick --quiet
    ... grass, gravel

and collects RUNS/<category>/metrics.json (image AUROC, pixel AUROC, PRO, F1-max), the training log and the time taken
(wall and CPU: the machines are shared, so CPU seconds / cores is the better estimate of time on an idle machine).

    python benchmarks/demo_accuracy.py                      # defaults: lite0 preset, default epochs, CPU
    python benchmarks/demo_accuracy.py --runs /tmp/runs -- --epochs 60      # extra adtr-train options after --
    python benchmarks/demo_accuracy.py --skip-train --diagnose               # reuse the runs, add the diagnosis

--diagnose explains the numbers: from each run's frozen backbone features it scores the test set with three reference
detectors that need no training (nearest training feature; the per-position mean of the training features; their global
mean), and compares the transformer's reconstruction error on its training features with the error of those means.

Writes benchmarks/results/demo_adtr.json and .md (override with --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adtr_deploy.bench.studies import command_line, machine, nearest_training_distance, pct, score_tokens, write_result

HERE = Path(__file__).resolve().parent


def child_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "adtr_demo_data"), help="demo data folder")
    ap.add_argument("--runs", default=str(Path(tempfile.gettempdir()) / "adtr_demo_runs"), help="run folders")
    ap.add_argument("--categories", default="brick,grass,gravel")
    ap.add_argument("--out", default=str(HERE / "results" / "demo_adtr.json"))
    ap.add_argument("--skip-train", action="store_true", help="reuse the runs in --runs (their metrics and logs)")
    ap.add_argument("--diagnose", action="store_true", help="add reference detectors on the same features")
    ap.add_argument("train_args", nargs="*", help="extra adtr-train options (after --)")
    args = ap.parse_args(argv)

    from adtr_deploy.data.demo import write_demo_dataset

    categories = [c for c in args.categories.split(",") if c]
    data = write_demo_dataset(args.data, tuple(categories))
    exe = str(Path(sys.executable).with_name("adtr-train"))
    rows, commands = {}, []
    for cat in categories:
        out = Path(args.runs) / cat
        cmd = ["adtr-train", "--data", str(data), "--category", cat, "--out", str(out), "--overwrite", "--quiet"]
        cmd += args.train_args
        commands.append(shlex.join(cmd))
        print("$", commands[-1], flush=True)
        timing_file = out / "benchmark_timing.json"
        if not args.skip_train:
            cpu0, t0 = child_cpu_seconds(), time.perf_counter()
            subprocess.run([exe, *cmd[1:]], check=True)
            wall, cpu = time.perf_counter() - t0, child_cpu_seconds() - cpu0
            timing_file.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
        timing = json.loads(timing_file.read_text())
        wall, cpu = timing["wall_s"], timing["cpu_s"]
        metrics = json.loads((out / "metrics.json").read_text())
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        rows[cat] = {
            **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro", "f1_max", "num_images")},
            "per_defect": {k: v["image_auroc"] for k, v in metrics["per_defect"].items()},
            "epochs": len(log),
            "final_loss": log[-1]["loss"],
            "train_images": sum(1 for _ in (data / cat / "train" / "good").iterdir()),
            "wall_s": wall,
            "cpu_s": cpu,
        }
        if args.diagnose:
            rows[cat]["diagnosis"] = diagnose(out, data, cat)
        print(json.dumps({cat: rows[cat]}), flush=True)
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max")}
    result = {
        "command": command_line("demo_accuracy.py", argv),
        "train_commands": commands,
        "categories": rows,
        "mean": mean,
        "machine": machine(),
    }
    return write_result(result, args.out, markdown)


def diagnose(run: Path, data_root: Path, category: str) -> dict:
    """Reference detectors on the run's own backbone features, and how well its transformer reconstructs them."""
    import numpy as np
    import torch

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.metrics import image_auroc, pixel_auroc
    from adtr_deploy.model.checkpoint import load_checkpoint
    from adtr_deploy.preprocess import load_mask
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import cache_features

    model, ckpt = load_checkpoint(run / "checkpoint.pt")
    data = open_dataset(data_root, category)
    trained = set(ckpt["train_state"]["data_order"]["train"])
    train = [s for s in data.train if str(s.path) in trained]
    cfg = TrainConfig(progress=False)
    cpu = torch.device("cpu")
    f_train = cache_features(model, train, cfg, cpu, progress=False)  # (N, C, h, w)
    f_test = cache_features(model, data.test, cfg, cpu, progress=False)
    size = model.cfg.input_size
    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s.mask, size) for s in data.test])

    def scores_of(err: torch.Tensor) -> dict:  # err (N, 1, h, w) -> scored by the model's own ADTR.map_and_score
        amap, score = score_tokens(model, err)
        return {"image_auroc": image_auroc(score, labels), "pixel_auroc": pixel_auroc(amap, masks)}

    knn = nearest_training_distance(f_train, f_test)
    pos_mean = f_train.mean(0, keepdim=True)  # (1, C, h, w)
    glob_mean = f_train.mean((0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    with torch.no_grad():
        rec_train = torch.cat([model.reconstruct(f) for f in f_train.split(16)])
        rec_test = torch.cat([model.reconstruct(f) for f in f_test.split(16)])
    l2 = lambda a, b: ((a - b) ** 2).sum(1, keepdim=True).sqrt()  # noqa: E731
    return {
        "reference_detectors": {
            "nearest_training_feature": scores_of(knn),
            "per_position_mean_feature": scores_of(l2(f_test, pos_mean)),
            "global_mean_feature": scores_of(l2(f_test, glob_mean)),
            "trained_transformer": scores_of(model.token_errors(f_test, rec_test)),  # the model's own error
        },
        "train_mse": {
            "transformer_reconstruction": float(((f_train - rec_train) ** 2).mean()),
            "per_position_mean": float(((f_train - pos_mean) ** 2).mean()),
            "global_mean": float(((f_train - glob_mean) ** 2).mean()),
        },
    }


def markdown(r: dict) -> str:
    lines = [
        "# ADTR on the built-in demo data (default settings)",
        "",
        f"Reproduce: `{r['command'].strip()}`, which runs for each category:",
        "",
        *[f"    {c}" for c in r["train_commands"]],
        "",
        "| category | image AUROC | pixel AUROC | PRO | F1-max | epochs | train wall s | train CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cat, row in r["categories"].items():
        lines.append(
            f"| {cat} | {pct(row['image_auroc'])} | {pct(row['pixel_auroc'])} | {pct(row['pro'])} | {pct(row['f1_max'])} "
            f"| {row['epochs']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} |"
        )
    m = r["mean"]
    lines += [
        f"| **mean** | **{pct(m['image_auroc'])}** | **{pct(m['pixel_auroc'])}** | {pct(m['pro'])} | {pct(m['f1_max'])} | | | |",
        "",
        "Image AUROC per defect type (good test images vs that defect):",
        "",
        "| category | " + " | ".join(next(iter(r["categories"].values()))["per_defect"]) + " |",
        "|---|" + "---|" * len(next(iter(r["categories"].values()))["per_defect"]),
    ]
    for cat, row in r["categories"].items():
        lines.append(f"| {cat} | " + " | ".join(pct(v) for v in row["per_defect"].values()) + " |")
    diag = {c: row["diagnosis"] for c, row in r["categories"].items() if "diagnosis" in row}
    if diag:
        lines += [
            "",
            "Diagnosis: image / pixel AUROC of reference detectors on the same frozen features (no training), and the mean",
            "squared error on the training features of the trained transformer's reconstruction vs. the features' means:",
            "",
            "| category | nearest training feature | per-position mean | global mean | trained transformer "
            "| train MSE: transformer / per-position mean / global mean |",
            "|---|---|---|---|---|---|",
        ]
        for cat, d in diag.items():
            ref = d["reference_detectors"]
            cells = [
                f"{pct(ref[k]['image_auroc'])} / {pct(ref[k]['pixel_auroc'])}"
                for k in (
                    "nearest_training_feature",
                    "per_position_mean_feature",
                    "global_mean_feature",
                    "trained_transformer",
                )
            ]
            mse = d["train_mse"]
            lines.append(
                f"| {cat} | " + " | ".join(cells) + f" | {mse['transformer_reconstruction']:.2f} / "
                f"{mse['per_position_mean']:.2f} / {mse['global_mean']:.2f} |"
            )
    lines += [
        "",
        f"Times include feature caching, calibration and the test-set evaluation. Machine: {r['machine']['cpus']} CPUs, "
        f"load average {r['machine']['loadavg_1m_at_end']:.1f} at the end (shared with other jobs: wall times are upper "
        "bounds; CPU seconds / 2 estimates an idle 2-core machine).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
