"""`adtr-bench --choose-fastest`: which verified CPU path is fastest on this box, measured here, with the reason.

Candidates are the exports under one folder (each with the model.json and the passing verification.json adtr-export
wrote): every ONNX export on ONNX Runtime and on OpenVINO, every OpenVINO IR on OpenVINO. Each one is first checked
here, on real images, against the FP32 ONNX export on ONNX Runtime (verified against the checkpoint to 1e-4 of the map
range) with the bounds of its own precision (export/verify.py's compare and PRECISIONS): a BF16 export verified on
another CPU is re-checked on this one. Then every candidate that passed is timed in one process, blocks interleaved
(bench/timing.py), at each batch size; the fastest by the geometric mean of its per-image times over the batch sizes
wins. The CPU's model and flags (runtime/cpu.py) go with every figure: they are why BF16 or INT8 win or not.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import write_json_atomic
from adtr_deploy.preprocess import load_image, stack_batch
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec

VERIFICATION_FILENAME = "verification.json"
# (model file suffix) -> the runtimes that run it on the CPU
CHECK_IMAGES = 32  # at most this many of the images check each candidate here
RUNTIMES: dict[str, tuple[str, ...]] = {".onnx": ("onnxruntime", "openvino"), ".xml": ("openvino",)}


@dataclass
class Candidate:
    runtime: str  # onnxruntime | openvino
    path: Path
    precision: str
    export_verified: bool | None
    export_note: str
    label: str = ""

    def __post_init__(self) -> None:
        kind = "IR" if self.path.suffix == ".xml" else "ONNX"
        self.label = f"{self.runtime} {self.precision} ({kind}, {self.path.parent.name})"


def find_candidates(root: Path) -> list[Candidate]:
    """Every export folder at or one level under `root` (model.json beside a model.onnx or model.xml)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--model {root} is not a folder; with --choose-fastest give the folder holding the exports")
    found = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if not (folder / SPEC_FILENAME).is_file():
            continue
        spec = ModelSpec.load(folder / SPEC_FILENAME)
        verification = _read_json(folder / VERIFICATION_FILENAME)
        passed = verification.get("passed") if verification else None
        note = (
            "no verification.json"
            if verification is None
            else f"export verification: {verification.get('reason') or ('skipped' if passed is None else passed)}"
        )
        for suffix, runtimes in RUNTIMES.items():
            model = folder / ("model" + suffix)
            if model.is_file():
                found += [Candidate(rt, model, spec.precision, passed, note) for rt in runtimes]
    if not found:
        raise UserError(
            f"{root} holds no exports (model.json beside model.onnx or model.xml, in it or its sub-folders); "
            "export the candidates with adtr-export first (docs/bench.md#choosing-the-cpu-path)"
        )
    return found


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open(c: Candidate, threads: int, streams: int):
    from adtr_deploy.runtime.backends import open_model

    return open_model(c.path, "cpu", backend=c.runtime, threads=threads, streams=streams)


def check_here(c: Candidate, engine, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """The candidate's outputs on real images against the FP32 ONNX Runtime export's, with its precision's bounds."""
    from adtr_deploy.export.verify import compare, criteria_of

    amap, score = engine.run(images)
    if reference is None:  # only the reference itself comes before the reference (choose_fastest's order)
        is_reference = c.runtime == "onnxruntime" and c.precision == "fp32" and c.export_verified is True
        why = (
            "the reference itself (FP32 ONNX on ONNX Runtime)" if is_reference else "no FP32 reference to check against"
        )
        return {"passed": is_reference, "reason": why}
    result = compare(*reference, amap, score, threshold=engine.spec.calibration.threshold, **criteria_of(c.precision))
    keep = ("passed", "reason", "decision_agreement", "unexplained_flips")
    out = {k: result[k] for k in keep}
    out.update(
        map_max_rel=result["map"]["max_rel"],
        min_image_correlation=result["map"]["min_image_correlation"],
        score_max_rel=result["score"]["max_rel_to_score"],
    )
    return out


def choose_fastest(
    root: Path,
    out: Path,
    files: list[Path],
    *,
    batch_sizes: tuple[int, ...],
    plan: TimingPlan,
    threads: int,
    streams: int = 1,
    log: Callable[[str], None] = print,
    time_refused: bool = False,
) -> dict:
    """Check every candidate here, time those that pass interleaved, pick the fastest; write OUT/choice.json and
    OUT/choice.md. Returns the choice record. `time_refused` (benchmarks): time the candidates that failed a check
    too, beside the others, marked not eligible (the choice is still among those that passed)."""
    from adtr_deploy.bench.machine import load_average, machine_info
    from adtr_deploy.errors import UserError as _UserError

    candidates = find_candidates(root)
    machine = machine_info()
    rows: list[dict] = []
    engines = {}
    reference, reference_label = None, None
    # the reference (a verified FP32 ONNX export on ONNX Runtime) first, so every other candidate is checked against it
    ordered = sorted(
        candidates, key=lambda c: (c.export_verified is not True, c.runtime != "onnxruntime", c.precision != "fp32")
    )
    size = None
    images = None
    for c in ordered:
        row = {"label": c.label, "runtime": c.runtime, "precision": c.precision, "path": str(c.path)}
        row["export_verification"] = c.export_note
        rows.append(row)
        if c.export_verified is not True:
            row.update(eligible=False, why=f"not verified at export ({c.export_note})")
            if not time_refused:
                continue
        try:
            engine = _open(c, threads, streams)
        except _UserError as exc:
            row.update(eligible=False, why=str(exc))
            continue
        if images is None:
            size = engine.spec.input_size
            step = max(1, -(-len(files) // CHECK_IMAGES))  # spread over the folder: good and defective alike
            images = stack_batch([load_image(f, size) for f in files[::step]])
        here = check_here(c, engine, images, reference)
        if reference is None and c.runtime == "onnxruntime" and c.precision == "fp32" and c.export_verified is True:
            reference, reference_label = engine.run(images), c.label
        row["check_here"] = here
        row["describe"] = engine.describe()
        row["eligible"] = bool(here["passed"]) and row.get("eligible", True)
        if not here["passed"]:
            row["why"] = f"failed the check on this box against the FP32 ONNX export: {here['reason']}"
        if not row["eligible"] and not time_refused:
            engine.close()
            continue
        engines[c.label] = engine
    if reference is None:
        raise UserError(
            f"{root} has no verified FP32 ONNX export to check the others against; export one with "
            "adtr-export --format onnx into that folder"
        )
    if not any(r.get("eligible") for r in rows):
        raise UserError(
            "no candidate passed verification here: " + "; ".join(f"{r['label']}: {r['why']}" for r in rows)
        )
    pool = [images[i % len(images)] for i in range(max(batch_sizes))]
    timed: dict[str, dict[int, dict]] = {label: {} for label in engines}
    for bs in batch_sizes:
        batch = np.ascontiguousarray(np.stack(pool[:bs]))
        calls = {label: (lambda e=e, b=batch: e.run(b)) for label, e in engines.items()}
        log(f"batch {bs}: timing {', '.join(calls)} interleaved")
        samples = measure_interleaved(calls, plan)
        for label in engines:
            stats = summarize(samples[label], bs)
            timed[label][bs] = {"ms_per_image": 1e3 / stats["throughput_ips"], **stats}
            log(f"  {label:<44} {timed[label][bs]['ms_per_image']:7.2f} ms/img  p50 {stats['p50_ms']:8.2f} ms")
    for e in engines.values():
        e.close()
    machine["load_average_end"] = load_average()
    base = reference_label
    for row in rows:
        if row["label"] in timed:
            per = {bs: timed[row["label"]][bs]["ms_per_image"] for bs in batch_sizes}
            row["timing"] = {str(bs): timed[row["label"]][bs] for bs in batch_sizes}
            row["ms_per_image"] = {str(bs): per[bs] for bs in batch_sizes}
            row["geomean_ms_per_image"] = math.exp(sum(math.log(v) for v in per.values()) / len(per))
            row["speedup_vs_onnxruntime_fp32"] = {
                str(bs): timed[base][bs]["ms_per_image"] / per[bs] for bs in batch_sizes
            }
    best = min(
        (r for r in rows if "geomean_ms_per_image" in r and r["eligible"]), key=lambda r: r["geomean_ms_per_image"]
    )
    choice = {
        "chosen": best["label"],
        "runtime": best["runtime"],
        "precision": best["precision"],
        "model": best["path"],
        "why": _why(best, rows, machine["cpu_info"], batch_sizes),
        "adtr_run": "adtr-run "
        + " ".join(shlex.quote(a) for a in ("--model", best["path"], "--backend", best["runtime"]))
        + (f" --threads {threads}" if threads else "")
        + (f" --streams {streams}" if streams > 1 else "")
        + " --source SOURCE --out OUT",
        "machine": machine,
        "settings": {
            "batch_sizes": list(batch_sizes),
            "threads": threads,
            "streams": streams,
            "images": [str(f) for f in files],
            "warmup": plan.warmup,
            "min_iters": plan.min_iters,
            "min_seconds": plan.min_seconds,
            "interleaved": True,
        },
        "candidates": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(choice, out / "choice.json", sort_keys=True)
    (out / "choice.md").write_text(render(choice))
    return choice


def _why(best: dict, rows: list[dict], cpu: dict, batch_sizes: tuple[int, ...]) -> str:
    from adtr_deploy.runtime.cpu import describe_flags

    speed = ", ".join(f"{v:.2f}x at batch {bs}" for bs, v in best["speedup_vs_onnxruntime_fp32"].items())
    refused = [r for r in rows if not r.get("eligible")]
    text = (
        f"fastest of the {sum(bool(r.get('eligible')) for r in rows)} verified candidates on {describe_flags(cpu)}: "
        f"{speed} ONNX Runtime FP32 per image"
    )
    if refused:
        text += "; not eligible: " + ", ".join(r["label"] for r in refused) + " (reasons in the table)"
    return text


def render(choice: dict) -> str:
    sizes = choice["settings"]["batch_sizes"]
    cpu = choice["machine"]["cpu_info"]
    lines = [
        "# Fastest verified CPU path on this machine",
        "",
        f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags']) or 'unknown'}; threads {choice['settings']['threads']}, "
        f"streams {choice['settings']['streams']}; one process, blocks interleaved.",
        "",
        "| candidate | checked here | " + " | ".join(f"batch {b} ms/img (vs ORT FP32)" for b in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for r in choice["candidates"]:
        check = "yes" if r.get("eligible") else f"no: {r.get('why', '')}"
        cells = [
            f"{r['ms_per_image'][str(b)]:.1f} ({r['speedup_vs_onnxruntime_fp32'][str(b)]:.2f}x)"
            if "ms_per_image" in r
            else "-"
            for b in sizes
        ]
        lines.append(f"| {r['label']} | {check} | " + " | ".join(cells) + " |")
    lines += ["", f"**Chosen: {choice['chosen']}**: {choice['why']}.", "", f"Run it: `{choice['adtr_run']}`", ""]
    return "\n".join(lines)


def run_choice(model, out, images, batch_sizes, warmup, min_iters, min_seconds, threads, streams) -> None:
    """The CLI's --choose-fastest: images from --images (else the demo images), then choose_fastest; prints it."""
    import click

    from adtr_deploy.bench.core import BenchConfig, image_files
    from adtr_deploy.bench.runners import default_threads

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    files, _ = image_files(BenchConfig(model=Path(model), out=Path(out), images=images), log)
    plan = TimingPlan(warmup=warmup, min_iters=min_iters, min_seconds=min_seconds)
    choice = choose_fastest(
        Path(model),
        Path(out),
        files,
        batch_sizes=batch_sizes,
        plan=plan,
        threads=threads or default_threads(),
        streams=streams,
        log=log,
    )
    click.echo(f"Chosen: {choice['chosen']}: {choice['why']}")
    click.echo(f"Run it: {choice['adtr_run']}")
    click.echo(str(Path(out) / "choice.md"))
