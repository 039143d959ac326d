"""`adtr-run` with several cameras (`--source NAME=SOURCE` repeated, or `--line line.yaml`): one process, one model in
memory, frames of all cameras batched together (adtr_deploy.runtime.line). Called by cli/run.py with its options."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from adtr_deploy.cli.run import _owns_process, _raise_interrupt
from adtr_deploy.cli.run_options import frames_options
from adtr_deploy.errors import UserError


def _specs(params: dict):
    """(line name, cameras, line file): `--line FILE.yaml|.json` or repeated `--source NAME=SOURCE`."""
    from adtr_deploy.runtime.linefile import is_line_file, load_line, parse_source_args

    if is_line_file(params["line_name"]):
        if params["source"]:
            raise UserError("give the cameras either with --line FILE or with --source NAME=SOURCE, not both")
        return (*load_line(Path(params["line_name"])), Path(params["line_name"]))
    return params["line_name"], parse_source_args(params["source"]), None


def run_line(params: dict, *, log_quiet: bool) -> None:
    from adtr_deploy.runtime.backends import OnnxRuntimeBackend, TensorRTBackend, backend_class, open_model
    from adtr_deploy.runtime.line import Line
    from adtr_deploy.runtime.outdir import parse_keep
    from adtr_deploy.runtime.pipeline import RunOptions

    log = (lambda msg: None) if log_quiet else (lambda msg: click.echo(f"Note: {msg}", err=True))
    name, cameras, line_file = _specs(params)
    if params["show"]:
        raise UserError("--show opens one window for one camera; with several cameras use --serve for the grid view")
    if params["save_video"] is not None:
        raise UserError("--save-video with several cameras: give each camera its own save_video in the --line file")
    if params["backend"] == "triton":
        raise UserError("several cameras in one process run a local model; --backend triton is for one source")
    out_dir: Path = params["out_dir"]
    parse_keep(params["keep"])
    model = params["model"]
    from adtr_deploy.runtime.modelrepo import is_model_repo

    for m in (model, *(getattr(c, "model", None) for c in cameras)):
        if m and is_model_repo(m):
            raise UserError(
                f"{m} is a versioned model folder; several cameras in one process run a model path: give --model "
                f"{m}/N/model.onnx (rollout of new versions works with one --source)"
            )
    cls = backend_class(model, params["backend"])
    device = params["device"] or ("cuda" if cls is TensorRTBackend else "cpu")
    backend_options: dict = {}
    if cls is OnnxRuntimeBackend:
        backend_options = {
            "allow_fallback": params["allow_fallback"],
            "threads": params["threads"],
            "spinning": params["spin"],
            "streams": params["streams"],
        }
    options = RunOptions(
        batch_size=params["batch_size"],
        workers=params["workers"],
        threshold=params["threshold"],
        save_overlays=params["save_overlays"],
        max_frames=params["max_frames"],
        duration=params["duration"],
        max_pixels=params["max_pixels"] or None,
        overwrite=params["overwrite"],
        resume=params["resume"],
        keep=params["keep"],
        **frames_options(params["keep_frames"], params["review_sample"], params["serve"]),
    )
    view = None
    if params["serve"] is not None or params["sinks"]:
        from adtr_deploy.cli.run_options import make_service

        view = make_service(out_dir, {**params, "line_name": name}, line=True)
    engine = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine = open_model(model, device, backend=params["backend"], **backend_options)
        fallback = getattr(engine, "fallback", None)
        if fallback:
            log(fallback + "; running anyway because of --allow-fallback")
        line = Line(
            engine, cameras, out_dir, options,
            device=device, backend_options=backend_options, max_batch=params["max_batch"],
            max_wait_ms=params["max_wait_ms"], timeout_s=params["timeout_s"], line_file=line_file,
            name=name, log=log, drift={"window": params["drift_window"], "sigmas": params["drift_sigmas"]}, view=view,
        )  # fmt: skip
        if view is not None:
            view.start_line(line, engine, model)
        signal.signal(signal.SIGTERM, _raise_interrupt)  # as for one camera: after the run (--serve-linger) SIGTERM
        summary = line.run(params["duration"])  # ends the lingering like Ctrl-C; during it the line stops its cameras
        if view is not None:
            view.linger(params["serve_linger"], {"stopped": "interrupted" if line.interrupted else "end"})
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the summaries are written: a late signal must not cut closing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if view is not None:
                view.close()
            if engine is not None:
                engine.close()
        finally:
            if not _owns_process():  # called from Python (tests, a script): give the caller its handlers back
                for sig, handler in previous.items():
                    if handler is not None:
                        signal.signal(sig, handler)
    if not log_quiet:
        _print_line_summary(summary, out_dir)
    failed = [name for name, state in summary["states"].items() if state == "failed"]
    if failed:  # the others ran to their end; the exit status still says that one did not
        error = summary["errors"].get(failed[0], "see its summary.json")
        raise UserError(f"camera {failed[0]!r} failed ({error}); the other cameras' results are complete")


def _print_line_summary(summary: dict, out_dir: Path) -> None:
    for name, s in summary["cameras"].items():
        state = summary["states"][name]
        if s is None:
            click.echo(f"{name}: {state}, no records ({summary['errors'].get(name, 'never started')})")
            continue
        fps = f", {s['throughput_fps']:.1f} images/s" if s.get("throughput_fps") else ""
        p = s["latency_ms"]
        lat = f", latency p50 {p['p50']:.1f} ms p99 {p['p99']:.1f} ms" if p.get("p50") is not None else ""
        click.echo(
            f"{name}: {s['images']} images, {s['anomalies']} anomalous, {s['errors']} errors{fps}{lat} ({state})"
        )
    for model, b in summary["batching"].items():
        if b["batches"]:
            click.echo(f"Batches ({model}): {b['batches']}, {b['mean_batch']} frames each on average")
    click.echo(f"Results: {out_dir}/<camera>/results.jsonl  Line: {out_dir / 'line-summary.json'}")
