"""`adtr-bench` / `adtr bench`: latency, throughput, memory and FLOPs of an exported model against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import click

from adtr_deploy.cli.common import CONTEXT, streams_option, user_errors
from adtr_deploy.errors import UserError

BACKEND_NAMES = (
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "tensorrt",
    "torchscript-cpu",
    "torchscript-cuda",
    "pt2-cpu",
    "pt2-cuda",
)


@click.command(context_settings=CONTEXT)
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Exported model file or export folder.")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="checkpoint.pt of the PyTorch eager reference (default: the one beside/recorded in the export; "
    "without one, speed-up ratios are unavailable).",
)
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Report folder (report.json, report.md, plots)."
)
@click.option(
    "--backends",
    default=None,
    help=f"Comma-separated subset of {', '.join(BACKEND_NAMES)} (default: every one available here).",
)
@click.option("--warmup", default=3, show_default=True, type=int, help="Untimed calls per backend before timing.")
@click.option("--min-iters", default=20, show_default=True, type=int, help="Minimum timed calls per backend.")
@click.option("--min-seconds", default=5.0, show_default=True, type=float, help="Minimum timed seconds per backend.")
@click.option(
    "--pipeline/--no-pipeline", default=True, show_default=True, help="Time the end-to-end pipeline's stages."
)
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of image files for the pipeline and as timing input (default: the built-in demo images).",
)
@click.option(
    "--threads", default=None, type=int, help="Threads for PyTorch and ONNX Runtime (default: physical cores)."
)
@click.option(
    "--spinning",
    type=click.Choice(("off", "on", "both")),
    default="off",
    show_default=True,
    help="onnxruntime-cpu: let idle intra-op threads spin-wait (adtr-run --spin). 'both' times a second row, "
    "onnxruntime-cpu (spinning), beside the default one: on idle cores spinning is faster at batch 1, on a loaded "
    "machine slower, so measure it on the target box.",
)
@streams_option(
    "onnxruntime-cpu: N > 1 adds a row, onnxruntime-cpu (N streams), with N concurrent streams sharing the "
    "threads, timed as adtr-run --streams runs: below N images per batch, N // batch batches at once (images/s counts "
    "them all; p50 is per batch), larger batches split over the streams.",
)
@click.option(
    "--profile/--no-profile", default=False, show_default=True, help="Add per-operator profiles to the report."
)
@click.option(
    "--memory/--no-memory", default=True, show_default=True, help="Measure each backend's memory in its own process."
)
@click.option(
    "--choose-fastest",
    is_flag=True,
    help="Pick this machine's fastest verified CPU path: --model is a folder of exports (ONNX FP32 and INT8, OpenVINO "
    "BF16 and INT8, ...); each runs on ONNX Runtime and/or OpenVINO, is checked here on real images against the FP32 "
    "export with its precision's bounds, and those that pass are timed interleaved. Writes OUT/choice.json and "
    "OUT/choice.md (the CPU's flags, every candidate, the choice and why, the adtr-run line).",
)
@user_errors
def command(
    model: Path,
    reference: Path | None,
    batch_sizes: str,
    out: Path,
    backends: str | None,
    warmup: int,
    min_iters: int,
    min_seconds: float,
    pipeline: bool,
    images: Path | None,
    threads: int | None,
    spinning: str,
    streams: int,
    profile: bool,
    memory: bool,
    choose_fastest: bool = False,
) -> None:
    """Benchmark an exported model on every backend available here, side by side with the PyTorch eager reference.

    Writes OUT/report.json, OUT/report.md and PNG plots: p50/p90/p99 latency, images/s, peak memory, speed-up against
    PyTorch, counted FLOPs per image against the measured matmul peak, and the pipeline's stage breakdown.
    """
    from adtr_deploy.bench import BenchConfig, TimingPlan, parse_batch_sizes, run_benchmark

    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads} must be at least 1")
    chosen = None
    if backends:
        chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
        unknown = [b for b in chosen if b not in BACKEND_NAMES]
        if unknown:
            raise UserError(
                f"unknown backend {', '.join(unknown)} in --backends; choose from {', '.join(BACKEND_NAMES)}"
            )
    if choose_fastest:
        from adtr_deploy.bench.choose import run_choice

        return run_choice(model, out, images, parse_batch_sizes(batch_sizes), warmup, min_iters, min_seconds, threads, streams)
    cfg = BenchConfig(
        model=model,
        out=out,
        reference=reference,
        batch_sizes=parse_batch_sizes(batch_sizes),
        backends=chosen,
        plan=TimingPlan(warmup=warmup, min_iters=min_iters, min_seconds=min_seconds),
        threads=threads,
        spinning=spinning,
        streams=streams,
        pipeline=pipeline,
        images=images,
        profile=profile,
        memory=memory,
        peak_seconds=min(1.0, max(0.2, min_seconds / 5)),
    )
    report = run_benchmark(cfg, log=lambda msg: click.echo(msg, err=True))
    click.echo(str(out / "report.md"))
    if report["reference"]["checkpoint"] is None:
        click.echo(
            "No reference checkpoint: speed-up ratios are unavailable (pass --reference checkpoint.pt).", err=True
        )
