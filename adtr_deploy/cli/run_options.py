"""The options of `adtr-run`, declared in groups by what they set (each group is one decorator, applied in the order
--help lists them), and `make_service`, which turns the --serve and --sink options into the run's Service.

Only click is imported at module level, like cli/run.py, so `adtr-run --help` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from adtr_deploy.cli.common import streams_option
from adtr_deploy.imageheader import DEFAULT_MAX_PIXELS


def options(*decorators: Callable) -> Callable:
    """One decorator applying `decorators` as if stacked in the order written (the first is listed first by --help)."""

    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


# What to run, on what, and where the results go (the three required options).
io_options = options(
    click.option(
        "--model",
        required=True,
        type=click.Path(path_type=Path),
        help="Exported model: model.onnx, model.engine, model.torchscript, model.pt2 (or its folder), or a versioned "
        "model folder MODELS/NAME (its active version runs; see --model-poll).",
    ),
    click.option(
        "--source",
        multiple=True,
        help="IMAGE, FOLDER (recursive), GLOB ('imgs/*.png'), LIST (.txt, one path per line), VIDEO, CAMERA_INDEX (0) or URL (rtsp://, http:// MJPEG). Several cameras in one process: repeat it as NAME=SOURCE (--source top=rtsp://... --source side=1); results go to OUT/NAME/.",
    ),
    click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(path_type=Path),
        help="Output folder: results.jsonl, summary.json, runs.jsonl, overlays/ (one run writes here at a time).",
    ),
)

# Many cameras in one process (adtr_deploy.runtime.line): the shared batches (the line file is --line, below).
line_options = options(
    click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
                 help="Several cameras: at most this many frames (of all cameras sharing a model) in one inference call."),
    click.option("--max-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
                 help="Several cameras: a frame waits at most this long for others to join its batch."),
)  # fmt: skip

# Which inference engine runs the model: the device, the backend, and a Triton server's address.
engine_options = options(
    click.option(
        "--device",
        default=None,
        help="cpu, cuda[:N] or tensorrt[:N] (ONNX Runtime's TensorRT provider); with --backend openvino: cpu, gpu[.N] "
        "or npu. Default: cpu; cuda for .engine.",
    ),
    click.option(
        "--backend",
        default="auto",
        show_default=True,
        help="auto (by file suffix), onnxruntime, openvino (model.onnx or model.xml; each batch size is compiled once "
        "for its static shape, about a second at its first batch), tensorrt, torchscript, pt2, or triton (then --model "
        "is the served model's name).",
    ),
    click.option(
        "--url", default=None, help="Triton server HOST:PORT (with --backend triton). Default: localhost:8000 (http)."
    ),
    click.option(
        "--protocol",
        type=click.Choice(["http", "grpc"]),
        default="http",
        show_default=True,
        help="Triton client protocol.",
    ),
    click.option(
        "--spec",
        "spec_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="model.json to use with --backend triton when the served config carries no spec.",
    ),
)

# How the run goes: batching, the decision threshold, what is saved or shown, when it stops, and how inputs
# are decoded and waited for.
loop_options = options(
    click.option(
        "--batch-size",
        default=1,
        show_default=True,
        type=click.IntRange(1, 1024),
        help="Images per inference call (files and videos; live sources run the newest frame).",
    ),
    click.option(
        "--threshold",
        type=float,
        default=None,
        help="Raw score threshold; replaces the calibrated one in the model's metadata.",
    ),
    click.option(
        "--save-overlays", is_flag=True, help="Write heatmap overlays with score and decision to OUT/overlays/."
    ),
    click.option(
        "--save-video",
        type=click.Path(path_type=Path),
        default=None,
        help="Write the annotated frames as a video (.avi MJPG or .mp4).",
    ),
    click.option(
        "--show", is_flag=True, help="Show annotated frames in a window (q or Esc stops); skipped without a display."
    ),
    click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after this many images/frames."),
    click.option(
        "--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this many seconds."
    ),
    click.option(
        "--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Decode/preprocess threads."
    ),
    click.option(
        "--timeout",
        "timeout_s",
        default=5.0,
        show_default=True,
        type=click.FloatRange(min=0.1),
        help="Seconds a stream may stall before it counts as dropped and is reopened.",
    ),
)

# How ONNX Runtime's sessions are set up: a CPU fallback for a GPU that cannot load, threads, spinning,
# inference streams.
session_options = options(
    click.option(
        "--allow-fallback",
        is_flag=True,
        help="Run on the CPU (with a warning) when the requested GPU provider cannot load, instead of refusing.",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="ONNX Runtime intra-op threads, OpenVINO's INFERENCE_NUM_THREADS (default: the physical cores). On a box "
        "shared with other work, fewer threads than cores keep inference steady.",
    ),
    click.option(
        "--spin",
        is_flag=True,
        help="ONNX Runtime on the CPU: idle threads spin-wait between operators instead of sleeping. Faster at batch 1 on "
        "otherwise idle cores (1.2-1.3x measured on 2 cores), slower when other processes need the cores; "
        "`adtr-bench --spinning both` shows which wins on this machine.",
    ),
    streams_option(
        help="ONNX Runtime on the CPU: N sessions sharing --threads (OpenVINO: its NUM_STREAMS, one infer request "
        "each); batches of N or more images are split over them, smaller ones kept in flight (at batch 1: one frame per stream; records still in source order). 1.53x the frames "
        "per second at batch 1 on 2 cores, each frame ~1.4x later; streams of one thread share one copy of the weights.",
    ),
)

max_pixels_option = click.option(
    "--max-pixels",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse images (and video frames) larger than this many pixels, read from the file header before decoding "
    "(decompression bombs); the input gets an error record. 0: no limit.",
)

# What happens to an --out that holds an earlier run: refused, replaced, continued, and pruned.
out_folder_options = options(
    click.option(
        "--overwrite",
        is_flag=True,
        help="Replace the results of an earlier run in --out, its overlays included (otherwise such a folder is refused).",
    ),
    click.option(
        "--resume",
        is_flag=True,
        help="Continue an earlier run into the same --out (also fine when there is none yet): for image files the inputs "
        "already recorded are skipped; for cameras and streams a new segment starts and the earlier ones are kept (see "
        "--keep). The same model and source only. What a service's command line uses.",
    ),
    click.option(
        "--keep",
        "keep",
        multiple=True,
        metavar="AGE|SIZE",
        help="Live sources: remove the oldest closed segments (results and their overlays) older than AGE (30d, 12h) or "
        "beyond SIZE in all (5GB, 500MB); both may be given. Default: keep everything.",
    ),
    click.option(
        "--keep-frames",
        type=click.Choice(["flagged", "none"]),
        default=None,
        help="flagged: keep the original frame of every flagged part (lossless PNG, with its overlay) in OUT/frames/ "
        "for review (adtr review, POST /api/review); removed with its segment by --keep. Default: flagged with "
        "--serve, none without.",
    ),
    click.option(
        "--review-sample",
        type=click.FloatRange(0, 1),
        default=None,
        metavar="SHARE",
        help="With --keep-frames flagged: also keep this share of passed parts (seeded by run and frame), so review "
        "catches misses. Default: 0.01.",
    ),
)


def frames_options(keep_frames: str | None, review_sample: float | None, serve: str | None) -> dict:
    """RunOptions' keep_frames and review_sample from --keep-frames / --review-sample (defaults: see their help)."""
    mode = keep_frames or ("flagged" if serve is not None else "none")
    return {"keep_frames": mode, "review_sample": (0.01 if review_sample is None else review_sample) * (mode != "none")}


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress line and no summary on the terminal.")

# --serve: the live view and its endpoints, who may use them, and HTTPS.
serve_options = options(
    click.option(
        "--serve",
        default=None,
        metavar="HOST:PORT",
        help="Serve a live view, /metrics, /healthz, /readyz and /api/status on HOST:PORT (e.g. 127.0.0.1:8080). Needs the "
        "serve extra.",
    ),
    click.option(
        "--serve-token",
        envvar="ADTR_SERVE_TOKEN",
        default=None,
        help="Token for pause/resume (header X-ADTR-Token); required when --serve is not a loopback address. "
        "Env: ADTR_SERVE_TOKEN.",
    ),
    click.option(
        "--serve-linger",
        type=click.FloatRange(min=0),
        default=None,
        help="With --serve: seconds to keep serving after a finite source ends. Default: until Ctrl-C.",
    ),
    click.option(
        "--serve-auth",
        type=click.Choice(["write", "all"]),
        default="write",
        show_default=True,
        help="With --serve: who needs the token. write: pause/resume only; all: every page and endpoint too (the browser "
        "asks for it; /healthz and /readyz stay open for probes).",
    ),
    click.option(
        "--serve-host",
        "serve_hosts",
        multiple=True,
        metavar="NAME",
        help="With --serve: a DNS name the server is reached by (repeatable). Control requests are refused when their "
        "Host is a name not listed (DNS rebinding); IP addresses, localhost and this machine's names always pass.",
    ),
    click.option(
        "--tls-cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="With --serve: serve HTTPS with this PEM certificate (chain); the key too unless --tls-key is given.",
    ),
    click.option(
        "--tls-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="With --tls-cert: the PEM private key.",
    ),
)

# --sink: where anomalies are sent, the spool that holds them until acknowledged, webhook credentials, and the
# line name each message carries.
sink_options = options(
    click.option(
        "--sink",
        "sinks",
        multiple=True,
        metavar="SINK",
        help="Send each anomaly as JSON to http[s]://HOST/PATH (a webhook) or mqtt[s]://HOST[:PORT]/TOPIC (repeatable): "
        "at least once, from a spool on disk that outlasts receiver outages and restarts; never blocks inference.",
    ),
    click.option(
        "--sink-spool",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        metavar="DIR",
        help="Where each sink keeps the messages its receiver has not acknowledged yet. Default: OUT/spool.",
    ),
    click.option(
        "--sink-spool-max",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Messages each sink's spool holds (also at most 100 MB); when full, new anomalies are dropped, counted and "
        "logged. Default: 20000.",
    ),
    click.option(
        "--sink-token",
        envvar="ADTR_SINK_TOKEN",
        default=None,
        help="Webhooks: send `Authorization: Bearer TOKEN`. Env: ADTR_SINK_TOKEN (better: not shown in ps).",
    ),
    click.option(
        "--sink-secret",
        envvar="ADTR_SINK_SECRET",
        default=None,
        help="Webhooks: sign each body with HMAC-SHA256 (headers X-ADTR-Signature, X-ADTR-Timestamp). "
        "Env: ADTR_SINK_SECRET (better: not shown in ps).",
    ),
    click.option(
        "--line",
        "line_name",
        default=None,
        metavar="NAME",
        help="The camera or line name each sink message carries (field `line`). Default: the source. A name ending "
        "in .yaml, .yml or .json is a line file instead: several cameras in one process, each with name, source and "
        "its own threshold, save_overlays, save_video, keep, max_frames, model, paused (README: many cameras).",
    ),
)

# The drift monitor's window and sensitivity.
drift_options = options(
    click.option(
        "--drift-window",
        type=click.IntRange(min=20),
        default=100,
        show_default=True,
        help="Drift: the last N good scores whose median is compared with the calibration; DRIFT only when more than half "
        "of them moved (one bad part never does). Shown in the live view, /api/status, /metrics and sent to the sinks.",
    ),
    click.option(
        "--drift-sigmas",
        type=click.FloatRange(min=0, min_open=True),
        default=2.0,
        show_default=True,
        help="Drift: DRIFT when that median is this many calibration sigmas from the good mean; it clears below half of "
        "it. The threshold never changes by itself: recalibrate with POST /api/recalibrate or adtr recalibrate.",
    ),
)


def make_service(out_dir: Path, params: dict, *, line: bool = False):
    """The Service for --serve and --sink (None when neither is given), checked and bound before the model loads; the
    serve package is imported only when asked for. Its notes go to stderr even with --quiet. `params`: the command's
    options by name (click's ctx.params; a caller may give only some: serve, serve_token, serve_auth, serve_hosts,
    tls_cert, tls_key, sinks, sink_spool, sink_spool_max, sink_token, sink_secret, line_name). `line`: the service of
    several cameras (adtr_deploy.runtime.serve.lineview.LineService)."""
    p = {"serve_auth": "write", "serve_hosts": (), "sinks": (), **params}
    serve, sinks = p.get("serve"), p["sinks"]
    if serve is None and not sinks:
        return None
    from adtr_deploy.runtime.serve import Service

    if line:
        from adtr_deploy.runtime.serve.lineview import LineService as Service

    sink_options = {
        "spool_root": p.get("sink_spool") or out_dir / "spool",
        **({"max_messages": p["sink_spool_max"]} if p.get("sink_spool_max") else {}),
        "token": p.get("sink_token"),
        "secret": p.get("sink_secret"),
        "line": p.get("line_name"),
        "out_dir": out_dir,
    }
    return Service(
        serve,
        p.get("serve_token"),
        sinks,
        log=lambda msg: click.echo(f"Note: {msg}", err=True),
        auth=p["serve_auth"],
        hosts=p["serve_hosts"],
        tls_cert=p.get("tls_cert") and str(p["tls_cert"]),
        tls_key=p.get("tls_key") and str(p["tls_key"]),
        sink_options=sink_options,
    )
