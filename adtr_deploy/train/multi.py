"""Training many categories: one run folder per category (OUT/<category>/) and a summary table (OUT/summary.md/.json).

Categories run one after another in this process, or spread over several GPUs (`--devices cuda:0,cuda:1`): one worker
per device takes every len(devices)-th category (round-robin) and trains them in turn, each in its own `adtr-train`
child process that sees only its GPU (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adtr_deploy import metrics
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_text, write_json_atomic

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def parse_categories(data_root: str | Path, category: str | None) -> list[str] | None:
    """The categories of a multi-category request ('a,b' or 'all'), or None for a single category (or none).

    'all' is every folder of the MVTec-layout root with a train/good folder, sorted by name.
    """
    if category is None or ("," not in category and category != "all"):
        return None
    root = Path(data_root)
    if category == "all":
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist; check --data")
        found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
        if not found:
            raise UserError(
                f"{root} has no category folders with train/good images; --category all needs an MVTec root"
            )
        return found
    names = [c.strip() for c in category.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise UserError(f"--category {category} names a category twice; list each once")
    missing = [c for c in names if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"category folder {root / missing[0]} does not exist; check --category and --data")
    return names


def parse_devices(devices: str | None) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1']; every entry must be cuda:N (one worker process per GPU)."""
    if not devices:
        return []
    names = [d.strip() for d in devices.split(",") if d.strip()]
    for d in names:
        if not (d.startswith("cuda:") and d[5:].isdigit()):
            raise UserError(f"--devices entry {d!r} is not cuda:N; list GPUs like cuda:0,cuda:1 (omit it on the CPU)")
    if len(set(names)) != len(names):
        raise UserError(f"--devices {devices} names a GPU twice; list each once")
    return names


def round_robin(categories: Sequence[str], devices: Sequence[str]) -> dict[str, list[str]]:
    """Category i goes to device i % len(devices)."""
    return {d: list(categories[i :: len(devices)]) for i, d in enumerate(devices)}


def run_sequential(categories: Sequence[str], train_one: Callable[[str], Any]) -> dict[str, str | None]:
    """Train each category in turn; a category that fails is recorded (its error) and the others still run."""
    errors: dict[str, str | None] = {}
    for cat in categories:
        try:
            train_one(cat)
            errors[cat] = None
        except (ValueError, RuntimeError, FileNotFoundError, PermissionError, OSError) as exc:
            errors[cat] = str(exc) or type(exc).__name__
            print(f"category {cat} failed: {errors[cat]}", file=sys.stderr)
    return errors


def run_on_devices(
    assignment: dict[str, list[str]], child_args: Callable[[str], list[str]], out_dir: Path
) -> dict[str, str | None]:
    """One worker thread per GPU runs its categories in turn, each as `python -m adtr_deploy.train <child_args(cat)>`
    with CUDA_VISIBLE_DEVICES set to that GPU; the child's output goes to OUT/<category>/train_stdout.log."""
    errors: dict[str, str | None] = {}

    def worker(device: str, cats: list[str]) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device.split(":")[1])
        for cat in cats:
            folder = out_dir / cat
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "train_stdout.log", "w") as log:
                cmd = [sys.executable, "-m", "adtr_deploy.train", *child_args(cat)]
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            errors[cat] = None if rc == 0 else f"exit code {rc}; see {folder / 'train_stdout.log'}"
            print(f"category {cat} on {device}: {'done' if rc == 0 else errors[cat]}", file=sys.stderr)

    threads = [threading.Thread(target=worker, args=(d, cats)) for d, cats in assignment.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def summarize(out_dir: str | Path, categories: Sequence[str], errors: dict[str, str | None]) -> dict[str, Any]:
    """Collect OUT/<category>/metrics.json into OUT/summary.json and OUT/summary.md (per category and the mean, which
    covers the categories that produced metrics), with each category's status: ok, or why it has no metrics."""
    out_dir = Path(out_dir)
    found = {}
    for cat in categories:
        path = out_dir / cat / "metrics.json"
        found[cat] = json.loads(path.read_text()) if path.is_file() and not errors.get(cat) else {}
    rows, mean = metrics.per_category_table(found)
    for row in rows:
        cat = row["category"]
        row["status"] = "ok" if found[cat] else (errors.get(cat) or "no metrics.json (no test split or --no-eval)")
    num_ok = sum(r["status"] == "ok" for r in rows)
    mean["status"] = f"{num_ok} ok"
    summary = {"categories": rows, "mean": mean, "num_ok": num_ok}
    write_json_atomic(summary, out_dir / SUMMARY_JSON)
    atomic_write_text(out_dir / SUMMARY_MD, summary_markdown(summary))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (metrics.format_table with a status column)."""
    return metrics.format_table(summary["categories"], summary["mean"], extra=("status",)) + "\n"
