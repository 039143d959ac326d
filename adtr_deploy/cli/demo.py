"""`adtr demo`: the main job end to end on the built-in demo data, with one report at the end.

data -> adtr-train -> adtr-export (ONNX, verified) -> adtr-run (torch-free runtime, overlays) -> adtr-eval (of the exported
model) -> adtr-bench (against the PyTorch reference) -> OUT/report.md. Each step is the real command a user would run, invoked
in-process with the arguments printed, so the demo doubles as a transcript of the workflow.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import click

from adtr_deploy.cli.common import CONTEXT, user_errors
from adtr_deploy.fileio import atomic_write_text

DEMO_PRESETS = (
    "lite0",
    "lite0-small",
    "accurate",
    "lite1",
    "lite2",
    "lite0-plain",
    "lite0-classic",
    "tiny-lite0",
    "tiny",
)


def _step(index: int, total: int, title: str, argv: list[str]) -> None:
    click.secho(f"\n[{index}/{total}] {title}", bold=True)
    click.echo("  $ " + " ".join(shlex.quote(a) for a in argv))


def _invoke(name: str, args: list[str]) -> None:
    """Run `adtr <name> ARGS` in this process; a failing step stops the demo with that step's own error sentence."""
    from adtr_deploy.cli.main import load_command

    try:
        load_command(name).main(args=args, prog_name=f"adtr-{name}", standalone_mode=False)
    except click.ClickException as exc:
        raise click.ClickException(f"step 'adtr {name}' failed: {exc.format_message()}") from None


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pick_overlays(results: Path, overlays: Path, count: int) -> list[tuple[dict, Path]]:
    """The most and least anomalous images with an overlay: what a person wants to look at first.

    Each record names its own overlay (its "overlay" field, relative to the results folder): file names repeat across
    defect folders (scratch/003.png, hole/003.png), so matching by name would show one image beside another's score."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["score"], reverse=True)
    chosen = []
    for r in ok[: count - 1] + ok[-1:]:
        path = results.parent / str(r.get("overlay") or "")
        if r.get("overlay") and path.is_file() and overlays in path.parents:
            chosen.append((r, path))
    return chosen


def write_report(out: Path, category: str, seconds: dict[str, float], argv: dict[str, list[str]]) -> Path:
    """OUT/report.md: metrics of the checkpoint and of the exported model, the benchmark table, overlays and plots."""
    train_metrics = json.loads((out / "run" / "metrics.json").read_text())
    export_metrics = json.loads((out / "eval" / "metrics.json").read_text())
    verification = json.loads((out / "export" / "verification.json").read_text())
    bench = json.loads((out / "bench" / "report.json").read_text())
    summary = json.loads((out / "results" / "summary.json").read_text())

    lines = [
        f"# adtr-deploy demo: category `{category}`",
        "",
        "Everything below was produced by this run; the commands are in the last section.",
        "",
        "## Accuracy (test split of the demo data)",
        "",
        "| model | image AUROC | pixel AUROC | PRO (FPR<=0.3) | F1-max | images |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in (("PyTorch checkpoint", train_metrics), ("exported ONNX (torch-free runtime)", export_metrics)):
        lines.append(
            f"| {name} | {_fmt(m.get('image_auroc'))} | {_fmt(m.get('pixel_auroc'))} | {_fmt(m.get('pro'))} | "
            f"{_fmt(m.get('f1_max'))} | {m.get('num_images')} |"
        )
    v_map, v_score = verification.get("map", {}), verification.get("score", {})
    lines += [
        "",
        f"Export parity on {verification.get('images')} real images: map max |diff| {v_map.get('max_abs', 0):.2e}, "
        f"score max |diff| {v_score.get('max_abs', 0):.2e}, decisions agree "
        f"{100 * verification.get('decision_agreement', 0):.0f}% -> {'PASS' if verification.get('passed') else 'FAIL'}.",
        "",
        "## adtr-run over the test images",
        "",
        f"- {summary.get('images', summary.get('frames'))} images, {summary.get('anomalies')} flagged anomalous, "
        f"{summary.get('errors')} errors, {_fmt(summary.get('throughput_fps'), 1)} images/s "
        "end to end (decode, preprocess, inference, postprocess)",
        "",
        "## Speed (measured side by side in one run)",
        "",
        "| backend | batch | p50 ms | p90 ms | images/s | speed-up vs PyTorch eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in bench.get("results", []):
        ratio = r.get("speedup_vs_reference")
        lines.append(
            f"| {r['runner']} | {r['batch_size']} | {_fmt(r.get('p50_ms'), 1)} | {_fmt(r.get('p90_ms'), 1)} | "
            f"{_fmt(r.get('throughput_ips'), 1)} | {f'{ratio:.2f}x' if ratio else '-'} |"
        )
    lines += ["", "Full benchmark report: [bench/report.md](bench/report.md)", ""]
    for title, path in (bench.get("plots") or {}).items():
        rel = Path(path)
        rel = rel.relative_to(out) if rel.is_absolute() and out in rel.parents else Path("bench") / rel.name
        lines.append(f"![{title}]({rel.as_posix()})")
    overlays = _pick_overlays(out / "results" / "results.jsonl", out / "results" / "overlays", 4)
    if overlays:
        lines += ["", "## Overlays (most anomalous first, then the least)", ""]
        for record, path in overlays:
            lines.append(
                f"![{Path(str(record['source'])).parent.name}/{Path(str(record['source'])).name}]"
                f"({path.relative_to(out).as_posix()}) "
                f"score {record['score']:.3f}, {'ANOMALY' if record.get('is_anomaly') else 'good'}"
            )
            lines.append("")
    lines += ["## Steps, commands and time", "", "| step | seconds | command |", "|---|---:|---|"]
    for step, secs in seconds.items():
        lines.append(f"| {step} | {secs:.0f} | `{' '.join(shlex.quote(a) for a in argv.get(step, []))}` |")
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


@click.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", default="adtr_demo", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--category",
    type=click.Choice(["brick", "grass", "gravel"]),
    default="brick",
    show_default=True,
    help="Demo texture category to train and evaluate.",
)
@click.option("--preset", type=click.Choice(DEMO_PRESETS), default="lite0", show_default=True, help="Model preset.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: adtr-train's).")
@click.option(
    "--bench-seconds",
    type=click.FloatRange(min=0.1),
    default=3.0,
    show_default=True,
    help="Minimum timed seconds per backend and batch size in the benchmark.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Benchmark ONNX Runtime only, without per-process memory (for smoke tests; the full demo times every backend).",
)
@click.option("--overwrite", is_flag=True, help="Replace a previous demo run in --out.")
@user_errors
def command(
    out_dir: str, category: str, preset: str, epochs: int | None, bench_seconds: float, quick: bool, overwrite: bool
) -> None:
    """Run the main job end to end on the built-in demo data (no download) and write OUT/report.md.

    \b
    Steps (each is the real command, printed as it runs):
      1. adtr data demo     the built-in demo data set (MVTec-AD layout)
      2. adtr-train         train ADTR (default preset lite0) on the good images, calibrate the threshold
      3. adtr-export        ONNX, verified against the PyTorch reference on real images
      4. adtr-run           the torch-free runtime over the test images, with overlays
      5. adtr-eval          accuracy of the EXPORTED model
      6. adtr-bench         latency/throughput against PyTorch eager, measured side by side
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise click.ClickException(f"{out} is not empty; pass --overwrite to replace it or choose another --out")
        for sub in ("run", "export", "results", "eval", "bench", "report.md"):
            target = out / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    steps = {
        "data": ["data", "demo", "--out", str(data), "--categories", category],
        "train": ["train", "--data", str(data), "--category", category, "--out", str(out / "run"), "--preset", preset]
        + (["--epochs", str(epochs)] if epochs else []),
        "export": ["export", "--model", str(out / "run"), "--format", "onnx", "--out", str(out / "export")],
        "run": [
            "run",
            "--model",
            str(out / "export" / "model.onnx"),
            "--source",
            str(data / category / "test"),
            "--out",
            str(out / "results"),
            "--save-overlays",
            "--batch-size",
            "8",
        ],
        "eval": [
            "eval",
            "--model",
            str(out / "export" / "model.onnx"),
            "--data",
            str(data),
            "--category",
            category,
            "--out",
            str(out / "eval" / "metrics.json"),
        ],
        "bench": [
            "bench",
            "--model",
            str(out / "export" / "model.onnx"),
            "--reference",
            str(out / "run" / "checkpoint.pt"),
            "--batch-sizes",
            "1,8",
            "--images",
            str(data / category / "test" / "good"),
            "--min-seconds",
            str(bench_seconds),
            "--min-iters",
            "10",
            "--out",
            str(out / "bench"),
        ]
        + (["--no-memory", "--backends", "onnxruntime-cpu"] if quick else []),
    }
    titles = {
        "data": "Writing the built-in demo data",
        "train": f"Training ADTR ({preset}) on {category}/train/good",
        "export": "Exporting to ONNX and verifying against PyTorch",
        "run": "Running the torch-free runtime over the test images",
        "eval": "Evaluating the exported model",
        "bench": "Benchmarking against the PyTorch reference",
    }
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for i, (name, args) in enumerate(steps.items(), 1):
        _step(i, len(steps), titles[name], ["adtr", *args])
        t0 = time.perf_counter()
        _invoke(args[0], args[1:])
        seconds[name] = time.perf_counter() - t0
    report = write_report(out, category, seconds, {k: ["adtr", *v] for k, v in steps.items()})
    click.secho(f"\nDone in {time.perf_counter() - started:.0f} s. Report: {report}", bold=True, fg="green")
