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
from adtr_deploy.imageheader import DEFAULT_MAX_PIXELS


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
@click.option(
    "--model",
    required=True,
    type=click.Path(path_type=Path),
    help="Exported model: model.onnx, model.engine, model.torchscript, model.pt2 (or its folder).",
)
@click.option(
    "--source",
    required=True,
    help="IMAGE, FOLDER (recursive), GLOB ('imgs/*.png'), LIST (.txt, one path per line), VIDEO, CAMERA_INDEX (0) or URL (rtsp://, http:// MJPEG).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: results.jsonl, summary.json, runs.jsonl, overlays/ (one run writes here at a time).",
)
@click.option(
    "--device",
    default=None,
    help="cpu, cuda[:N] or tensorrt[:N] (ONNX Runtime's TensorRT provider). Default: cpu; cuda for .engine.",
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="auto (by file suffix), onnxruntime, tensorrt, torchscript, pt2, or triton (then --model is the served model's "
    "name).",
)
@click.option(
    "--url", default=None, help="Triton server HOST:PORT (with --backend triton). Default: localhost:8000 (http)."
)
@click.option(
    "--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True, help="Triton client protocol."
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="model.json to use with --backend triton when the served config carries no spec.",
)
@click.option(
    "--batch-size",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Images per inference call (files and videos; live sources run the newest frame).",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Raw score threshold; replaces the calibrated one in the model's metadata.",
)
@click.option("--save-overlays", is_flag=True, help="Write heatmap overlays with score and decision to OUT/overlays/.")
@click.option(
    "--save-video",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the annotated frames as a video (.avi MJPG or .mp4).",
)
@click.option(
    "--show", is_flag=True, help="Show annotated frames in a window (q or Esc stops); skipped without a display."
)
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many images/frames.")
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this many seconds."
)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Decode/preprocess threads.")
@click.option(
    "--timeout",
    "timeout_s",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a stream may stall before it counts as dropped and is reopened.",
)
@click.option(
    "--allow-fallback",
    is_flag=True,
    help="Run on the CPU (with a warning) when the requested GPU provider cannot load, instead of refusing.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="ONNX Runtime intra-op threads (default: the physical cores). On a box shared with other work, fewer threads "
    "than cores keep inference steady.",
)
@click.option(
    "--spin",
    is_flag=True,
    help="ONNX Runtime on the CPU: idle threads spin-wait between operators instead of sleeping. Faster at batch 1 on "
    "otherwise idle cores (1.2-1.3x measured on 2 cores), slower when other processes need the cores; "
    "`adtr-bench --spinning both` shows which wins on this machine.",
)
@click.option(
    "--streams",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="ONNX Runtime on the CPU: N sessions sharing --threads; batches of N or more images are split over them, "
    "smaller ones kept in flight (at batch 1: one frame per stream; records still in source order). 1.53x the frames "
    "per second at batch 1 on 2 cores, each frame ~1.4x later; streams of one thread share one copy of the weights.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse images (and video frames) larger than this many pixels, read from the file header before decoding "
    "(decompression bombs); the input gets an error record. 0: no limit.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the results of an earlier run in --out, its overlays included (otherwise such a folder is refused).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an earlier run into the same --out (also fine when there is none yet): for image files the inputs "
    "already recorded are skipped; for cameras and streams a new segment starts and the earlier ones are kept (see "
    "--keep). The same model and source only. What a service's command line uses.",
)
@click.option(
    "--keep",
    "keep",
    multiple=True,
    metavar="AGE|SIZE",
    help="Live sources: remove the oldest closed segments (results and their overlays) older than AGE (30d, 12h) or "
    "beyond SIZE in all (5GB, 500MB); both may be given. Default: keep everything.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress line and no summary on the terminal.")
@click.option(
    "--serve",
    default=None,
    metavar="HOST:PORT",
    help="Serve a live view, /metrics, /healthz, /readyz and /api/status on HOST:PORT (e.g. 127.0.0.1:8080). Needs the "
    "serve extra.",
)
@click.option(
    "--serve-token",
    envvar="ADTR_SERVE_TOKEN",
    default=None,
    help="Token for pause/resume (header X-ADTR-Token); required when --serve is not a loopback address. "
    "Env: ADTR_SERVE_TOKEN.",
)
@click.option(
    "--serve-linger",
    type=click.FloatRange(min=0),
    default=None,
    help="With --serve: seconds to keep serving after a finite source ends. Default: until Ctrl-C.",
)
@click.option(
    "--serve-auth",
    type=click.Choice(["write", "all"]),
    default="write",
    show_default=True,
    help="With --serve: who needs the token. write: pause/resume only; all: every page and endpoint too (the browser "
    "asks for it; /healthz and /readyz stay open for probes).",
)
@click.option(
    "--serve-host",
    "serve_hosts",
    multiple=True,
    metavar="NAME",
    help="With --serve: a DNS name the server is reached by (repeatable). Control requests are refused when their "
    "Host is a name not listed (DNS rebinding); IP addresses, localhost and this machine's names always pass.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --serve: serve HTTPS with this PEM certificate (chain); the key too unless --tls-key is given.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --tls-cert: the PEM private key.",
)
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="SINK",
    help="Send each anomaly as JSON to http[s]://HOST/PATH (a webhook) or mqtt[s]://HOST[:PORT]/TOPIC (repeatable): "
    "at least once, from a spool on disk that outlasts receiver outages and restarts; never blocks inference.",
)
@click.option(
    "--sink-spool",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Where each sink keeps the messages its receiver has not acknowledged yet. Default: OUT/spool.",
)
@click.option(
    "--sink-spool-max",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Messages each sink's spool holds (also at most 100 MB); when full, new anomalies are dropped, counted and "
    "logged. Default: 20000.",
)
@click.option(
    "--sink-token",
    envvar="ADTR_SINK_TOKEN",
    default=None,
    help="Webhooks: send `Authorization: Bearer TOKEN`. Env: ADTR_SINK_TOKEN (better: not shown in ps).",
)
@click.option(
    "--sink-secret",
    envvar="ADTR_SINK_SECRET",
    default=None,
    help="Webhooks: sign each body with HMAC-SHA256 (headers X-ADTR-Signature, X-ADTR-Timestamp). "
    "Env: ADTR_SINK_SECRET (better: not shown in ps).",
)
@click.option(
    "--line",
    "line_name",
    default=None,
    metavar="NAME",
    help="The camera or line name each sink message carries (field `line`). Default: the source.",
)
@click.option(
    "--drift-window",
    type=click.IntRange(min=20),
    default=100,
    show_default=True,
    help="Drift: the last N good scores whose median is compared with the calibration; DRIFT only when more than half "
    "of them moved (one bad part never does). Shown in the live view, /api/status, /metrics and sent to the sinks.",
)
@click.option(
    "--drift-sigmas",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="Drift: DRIFT when that median is this many calibration sigmas from the good mean; it clears below half of "
    "it. The threshold never changes by itself: recalibrate with POST /api/recalibrate or adtr recalibrate.",
)
@user_errors
def command(
    model: Path,
    source: str,
    out_dir: Path,
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
    """
    _quiet_opencv()
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
    service = None
    if serve is not None or sinks:  # checked and bound before the model loads; imported only when asked for
        from adtr_deploy.runtime.serve import Service

        sink_options = {
            "spool_root": sink_spool or out_dir / "spool",
            **({"max_messages": sink_spool_max} if sink_spool_max else {}),
            "token": sink_token,
            "secret": sink_secret,
            "line": line_name,
            "out_dir": out_dir,
        }
        service = Service(
            serve,
            serve_token,
            sinks,
            log=lambda msg: click.echo(f"Note: {msg}", err=True),
            auth=serve_auth,
            hosts=serve_hosts,
            tls_cert=tls_cert and str(tls_cert),
            tls_key=tls_key and str(tls_key),
            sink_options=sink_options,
        )
    cls = backend_class(model, backend)
    if device is None:
        device = "cuda" if cls is TensorRTBackend else "cpu"
    options: dict = {}
    if cls is OnnxRuntimeBackend:
        options = {"allow_fallback": allow_fallback, "threads": threads, "spinning": spin, "streams": streams}
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
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if service:
                service.start(pipeline, engine, model)
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
            engine.close()
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
