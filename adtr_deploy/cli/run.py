"""`adtr-run` / `adtr run`: run an exported model over images, folders, videos, cameras and streams (torch-free).

Only click is imported at module level, so `adtr-run --help` is instant and never imports torch or an inference engine.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

from adtr_deploy.cli.common import user_errors
from adtr_deploy.cli.run_options import (
    drift_options,
    engine_options,
    frames_options,
    io_options,
    line_options,
    loop_options,
    make_service,
    max_pixels_option,
    out_folder_options,
    quiet_option,
    serve_options,
    session_options,
    sink_options,
)


class _Progress:
    """One self-updating status line on a terminal; silent when stderr is not a terminal (logs, CI)."""

    def __init__(self, total: int | None, enabled: bool):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, record: dict, counts: dict) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        done = f"{counts['images']}/{self.total}" if self.total else str(counts["images"])
        rate = counts["ok"] / max(now - self.t0, 1e-9)
        line = f"\r{done} images  {counts['anomalies']} anomalies  {counts['errors']} errors  {rate:.1f} images/s"
        click.echo(line, nl=False, err=True)

    def end(self) -> None:
        if self.enabled and self.last:
            click.echo("", err=True)


def _raise_interrupt(signum, frame):
    # SIGTERM (docker stop, systemd) while the model loads ends like Ctrl-C; during the run the pipeline's own handlers
    # stop it at a record boundary (see adtr_deploy.runtime.pipeline).
    raise KeyboardInterrupt


def _owns_process() -> bool:
    """Started as the adtr-run program (adtr_deploy.cli.main): after the run, a late Ctrl-C or SIGTERM must not
    interrupt the interpreter's shutdown with a traceback, so the ignoring handlers stay until the process exits."""
    obj = click.get_current_context().find_root().obj
    return isinstance(obj, dict) and bool(obj.get("process_entry"))


def _quiet_opencv() -> None:
    """OpenCV's and FFmpeg's own warnings ("[ WARN:0@...] global cap_ffmpeg...") would reach the terminal beside our
    sentences; every problem they warn about is reported in results.jsonl instead. Set before cv2 is imported."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@io_options
@line_options
@engine_options
@loop_options
@session_options
@max_pixels_option
@out_folder_options
@quiet_option
@serve_options
@sink_options
@drift_options
@click.option(
    "--model-poll",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="With --model MODELS/NAME (a versioned model folder, written by adtr promote): look for a new active version "
    "this often; it is loaded beside the running one, verified, and switched in between two batches (no frame "
    "dropped). GET /api/model shows it; POST /api/model/rollback goes back.",
)
@user_errors
def command(
    model: Path,
    source: tuple[str, ...],
    out_dir: Path,
    max_batch: int,
    max_wait_ms: float,
    device: str | None,
    backend: str,
    url: str | None,
    protocol: str,
    spec_path: Path | None,
    batch_size: int,
    threshold: float | None,
    save_overlays: bool,
    save_video: Path | None,
    show: bool,
    max_frames: int | None,
    duration: float | None,
    workers: int,
    timeout_s: float,
    allow_fallback: bool,
    threads: int | None,
    spin: bool,
    streams: int,
    max_pixels: int,
    overwrite: bool,
    resume: bool,
    keep: tuple[str, ...],
    keep_frames: str | None,
    review_sample: float | None,
    quiet: bool,
    serve: str | None,
    serve_token: str | None,
    serve_linger: float | None,
    serve_auth: str,
    serve_hosts: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    sinks: tuple[str, ...],
    sink_spool: Path | None,
    sink_spool_max: int | None,
    sink_token: str | None,
    sink_secret: str | None,
    line_name: str | None,
    drift_window: int,
    drift_sigmas: float,
    model_poll: float,
) -> None:
    """Run an exported ADTR model over images, a video, a camera or a stream; write OUT/results.jsonl (one record per
    image or frame) and OUT/summary.json.

    \b
    Examples:
      adtr-run --model export/model.onnx --source images/ --out runs/a --save-overlays
      adtr-run --model export/model.onnx --source images/ --out runs/a --resume      # after a stop: the rest only
      adtr-run --model export/model.onnx --source line.mp4 --out runs/b --batch-size 8 --save-video runs/b/annotated.avi
      adtr-run --model export/model.onnx --source rtsp://cam.local/stream --out runs/c --device cuda
      adtr-run --model export/model.onnx --source rtsp://cam.local/stream --out /var/lib/adtr/line3 --resume --keep 30d
      adtr-run --backend triton --url triton.local:8000 --model adtr --source images/ --out runs/d
      adtr-run --model export/model.onnx --source top=rtsp://cam1/s --source side=rtsp://cam2/s --out runs/line
      adtr-run --model export/model.onnx --line line.yaml --out /var/lib/adtr/line3 --resume --serve 0.0.0.0:8080
      adtr-run --model models/brick --source rtsp://cam.local/stream --out runs/e --resume --serve 0.0.0.0:8080
               # a versioned model folder: its active version runs, new versions are switched in while it runs
    """
    _quiet_opencv()
    from adtr_deploy.runtime.linefile import is_line_file, is_named

    if is_line_file(line_name) or len(source) > 1 or any(is_named(s) for s in source):
        from adtr_deploy.cli.run_line import run_line

        return run_line(click.get_current_context().params, log_quiet=quiet)
    if not source:
        from adtr_deploy.errors import UserError

        raise UserError("give --source (an image, folder, video, camera or URL), or --line with a line file")
    source = source[0]
    from adtr_deploy.runtime.backends import OnnxRuntimeBackend, TensorRTBackend, backend_class, open_model
    from adtr_deploy.runtime.outdir import (
        check_out_dir,
        check_out_outside_source,
        lock_out_dir,
        parse_keep,
        unlock_out_dir,
    )
    from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
    from adtr_deploy.runtime.sources import open_source
    from adtr_deploy.runtime.triton import TritonBackend

    log = (lambda msg: None) if quiet else (lambda msg: click.echo(f"Note: {msg}", err=True))
    service = make_service(out_dir, click.get_current_context().params)
    from adtr_deploy.errors import UserError
    from adtr_deploy.runtime.rollout import Rollout, versioned

    repo = versioned(model)  # MODELS/NAME: the active version runs, newer ones are switched in (runtime/rollout.py)
    if repo is not None and backend == "triton":
        raise UserError("--backend triton serves the versions of its own model repository; give --model NAME")
    cls = backend_class(repo.folder(repo.require_active()) if repo else model, backend)
    if device is None:
        device = "cuda" if cls is TensorRTBackend else "cpu"
    options: dict = {}
    if cls is OnnxRuntimeBackend:
        options = {"allow_fallback": allow_fallback, "threads": threads, "spinning": spin, "streams": streams}
    elif cls.name == "openvino":  # the same threads and streams, OpenVINO's own (runtime/openvino.py)
        options = {"threads": threads, "streams": streams}
        if spin:
            log("--spin sets ONNX Runtime's spin-waiting; OpenVINO has no such setting and ignores it")
    elif threads or spin or streams > 1:
        log(f"--threads, --spin and --streams set ONNX Runtime's sessions; {cls.__name__} ignores them")
    if cls is TritonBackend:
        options = {"protocol": protocol, "spec_path": spec_path, **({"url": url} if url else {})}
    # Before the model loads, so a wrong --out, or one another run is writing, fails at once.
    check_out_dir(out_dir, overwrite=overwrite, resume=resume)
    parse_keep(keep)
    lock_out_dir(out_dir)
    previous_term, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        src = open_source(
            source, timeout_s=timeout_s, queue_size=max(16, 2 * batch_size), max_pixels=max_pixels or None
        )
        check_out_outside_source(out_dir, getattr(src, "root", None))
        rollout = None
        if repo is not None:
            opener = lambda folder: open_model(folder, device, backend=backend, **options)  # noqa: E731
            rollout = Rollout(repo, opener, poll_s=model_poll, log=log)
            engine = rollout.open_first()
            log(f"{repo.path}: version {rollout.version} runs; new versions are taken up every {model_poll:g} s")
        else:
            engine = open_model(model, device, backend=backend, **options)
        run_options = RunOptions(
            batch_size=batch_size,
            workers=workers,
            threshold=threshold,
            save_overlays=save_overlays,
            save_video=save_video,
            show=show,
            max_frames=max_frames,
            duration=duration,
            max_pixels=max_pixels or None,
            overwrite=overwrite,
            resume=resume,
            keep=keep,
            **frames_options(keep_frames, review_sample, serve),
        )
        fallback = getattr(engine, "fallback", None)
        if fallback:
            log(fallback + "; running anyway because of --allow-fallback")
        if threshold is None and engine.spec.calibration.method == "uncalibrated":
            log(
                f"{model} carries no calibration, so its threshold ({engine.spec.threshold:g}) is a placeholder and "
                "is_anomaly means little; train with calibration images or pass --threshold"
            )
        total = min(src.total, max_frames) if src.total and max_frames else src.total
        progress = _Progress(total, enabled=not quiet)
        hooks = service.pipeline_hooks() if service else {}
        from adtr_deploy.runtime.drift import DriftMonitor, describe

        drift = DriftMonitor(engine.spec.calibration, window=drift_window, sigmas=drift_sigmas, threshold=threshold)
        drift.listeners.append(lambda event: log(describe(event)))
        hooks["observers"] = [drift.observe, *hooks.get("observers", ())]  # first: the state sees drift at once
        if service:
            service.attach_drift(drift)
        pipeline = Pipeline(engine, src, out_dir, run_options, on_record=progress, log=log, **hooks)
        if rollout is not None:
            rollout.attach(pipeline)
            rollout.listeners.append(lambda r, new: drift.restart(new.spec.calibration, threshold))
            if service:
                service.attach_rollout(rollout)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if service:
                service.start(pipeline, engine, rollout.folder if rollout else model)
            if rollout is not None:
                rollout.start()
            summary = pipeline.run()
            if service:
                progress.end()
                service.linger(serve_linger, summary)
        finally:
            # The run is over and its summary written: a late Ctrl-C or SIGTERM (the third of three quick ones) must
            # not cut the closing short (see _owns_process for after the command).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SIG_IGN, not a Python handler: the interpreter resets
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own handlers to the default during its shutdown
            progress.end()
            if service:
                service.close()
            if rollout is not None:
                rollout.close()
            pipeline.backend.close()  # the version running at the end (a rollout closed the earlier ones)
        if not quiet:
            _print_summary(summary, out_dir)
    finally:
        unlock_out_dir(out_dir)
        if not _owns_process():  # called from Python (tests, a script): give the caller its handlers back
            for sig, handler in ((signal.SIGTERM, previous_term), (signal.SIGINT, previous_int)):
                if handler is not None:
                    signal.signal(sig, handler)
    if summary["stopped"] == "interrupted" and not summary["live"]:
        raise SystemExit(130)  # a batch job cut short is not a success; for a live source Ctrl-C is the normal end


def _print_summary(s: dict, out_dir: Path) -> None:
    fps = f", {s['throughput_fps']:.1f} images/s" if s["throughput_fps"] else ""
    click.echo(
        f"{s['images']} images: {s['anomalies']} anomalous, {s['ok'] - s['anomalies']} normal, {s['errors']} errors{fps}."
    )
    if s["live"]:
        gaps = s["gaps"]
        down = sum(g["duration_s"] or 0 for g in gaps)
        click.echo(
            f"Live: {s['dropped_frames']} stale frames dropped, {len(gaps)} outages ({down:.1f} s), {s['reconnects']} reconnects."
        )
    if s.get("gaps_total", 0) > len(s.get("gaps", [])):
        click.echo(f"(summary.json lists the last {len(s['gaps'])} of the {s['gaps_total']} outages.)")
    if s.get("resumed_skipped"):
        click.echo(f"Resumed: {s['resumed_skipped']} inputs were already recorded and were skipped.")
    if s["stopped"] == "interrupted":
        by = "SIGTERM" if s.get("signal") == "SIGTERM" else "Ctrl-C"
        click.echo(
            f"Stopped by {by}; every record processed so far is in {out_dir / 'results.jsonl'}, and counted"
            + ("." if s["live"] else " (--resume continues the run).")
        )
    click.echo(f"Results: {out_dir / 'results.jsonl'}  Summary: {out_dir / 'summary.json'}")
