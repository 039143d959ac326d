"""ADTR vs ADTR+ on the built-in demo data, at the same training budget, same seed, same data.

For every category (brick, grass, gravel) it runs the real command line:

    adtr-train --data ROOT --category C --out RUNS/C/adtr_N   --epochs N          ADTR, N epochs (the starting point)
    adtr-train --data ROOT --category C --out RUNS/C/adtr_NM  --epochs N+M        ADTR, N+M epochs
    adtr-train --data ROOT --category C --out RUNS/C/plus_M   --epochs M --mode adtr+ --init-from RUNS/C/adtr_N
                                                                                   ADTR N + ADTR+ M (confetti + cutpaste)

and compares image and pixel AUROC (and PRO) of "ADTR N+M" with "ADTR N + ADTR+ M": the same number of epochs in total.
An ADTR+ epoch costs more than an ADTR epoch (twice the images: one synthetic anomaly per good image, and the backbone
runs on every batch since the anomalies change every epoch), so the wall/CPU seconds are reported too.

    python benchmarks/adtr_plus_vs_adtr.py                                  # lite0, N=10, M=2
    python benchmarks/adtr_plus_vs_adtr.py --preset tiny-lite0 --base-epochs 20 --plus-epochs 5

Writes benchmarks/results/adtr_plus_vs_adtr.json and .md (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = ("brick", "grass", "gravel")
KEYS = ("image_auroc", "pixel_auroc", "pro")


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def train(args: list[str]) -> dict:
    """One adtr-train run -> its metrics.json plus wall and CPU seconds."""
    cmd = [str(Path(sys.executable).with_name("adtr-train")), *args, "--quiet", "--overwrite"]
    w, c = time.perf_counter(), child_cpu()
    subprocess.run(cmd, check=True)
    out = Path(args[args.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        **{k: metrics.get(k) for k in KEYS},
        "wall_s": round(time.perf_counter() - w, 1),
        "cpu_s": round(child_cpu() - c, 1),
        "command": "adtr-train " + shlex.join(args),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="demo data root (default: written to a temp folder)")
    ap.add_argument("--runs", default=None, help="run folders (default: a temp folder)")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--preset", default="lite0")
    ap.add_argument("--base-epochs", type=int, default=10, help="N")
    ap.add_argument("--plus-epochs", type=int, default=2, help="M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "adtr_plus_vs_adtr.json"))
    args = ap.parse_args(argv)

    from adtr_deploy.data.demo import write_demo_dataset

    cats = [c for c in args.categories.split(",") if c]
    tmp = Path(tempfile.gettempdir())
    root = Path(args.data or tmp / "adtr_demo_data")
    if not all((root / c / "train" / "good").is_dir() for c in cats):
        write_demo_dataset(root, cats, seed=0)
    runs = Path(args.runs or tmp / "adtr_plus_vs_adtr_runs")
    n, m = args.base_epochs, args.plus_epochs
    common = ["--data", str(root), "--seed", str(args.seed)]
    rows = {}
    for cat in cats:
        base = runs / cat
        c = [*common, "--category", cat]
        r = {}
        r["adtr_N"] = train([*c, "--out", str(base / "adtr_N"), "--preset", args.preset, "--epochs", str(n)])
        r["adtr_NM"] = train([*c, "--out", str(base / "adtr_NM"), "--preset", args.preset, "--epochs", str(n + m)])
        r["plus"] = train(
            [*c, "--out", str(base / "plus_M"), "--epochs", str(m), "--mode", "adtr+"]
            + ["--init-from", str(base / "adtr_N" / "checkpoint.pt")]
        )
        rows[cat] = r
        print(json.dumps({cat: {k: {q: v[q] for q in (*KEYS, "wall_s")} for k, v in r.items()}}), flush=True)
    result = {
        "preset": args.preset,
        "base_epochs": n,
        "plus_epochs": m,
        "seed": args.seed,
        "command": "python benchmarks/adtr_plus_vs_adtr.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, shared (other processes running)",
        "categories": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def to_markdown(r: dict) -> str:
    n, m = r["base_epochs"], r["plus_epochs"]
    lines = [
        f"# ADTR vs ADTR+ on the demo data ({r['preset']}, seed {r['seed']})",
        "",
        f"`{r['command']}` ({r['machine']})",
        "",
        f"Same total budget of {n + m} epochs: ADTR {n + m} epochs vs ADTR {n} + ADTR+ {m} (fine-tuned from the ADTR "
        f"{n}-epoch checkpoint, confetti + cutpaste, alpha 0.003, k 20). ADTR {n} is the common starting point.",
        "",
        "| category | model | image AUROC | pixel AUROC | PRO | wall s | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"adtr_N": f"ADTR {n}", "adtr_NM": f"ADTR {n + m}", "plus": f"ADTR {n} + ADTR+ {m}"}
    for cat, rows in r["categories"].items():
        for key, label in names.items():
            v = rows[key]
            lines.append(
                f"| {cat} | {label} | {_f(v['image_auroc'])} | {_f(v['pixel_auroc'])} | {_f(v['pro'])} | "
                f"{v['wall_s']} | {v['cpu_s']} |"
            )
    lines += ["", "Commands of each run:", ""]
    for rows in r["categories"].values():
        lines += [f"- `{v['command']}`" for v in rows.values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
