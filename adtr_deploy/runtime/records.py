"""What a run writes about each frame and about itself: the results record and the summary.

The record (one JSON line per image or frame in results.jsonl) is a contract: users, --resume, the sinks and the drift
monitor read it, so its keys are added, never renamed (docs/architecture.md, "Where each contract lives"). The summary
is written at the end of every start and checkpointed while it runs (`"running": true`, every CHECKPOINT_S), so the
next start can finish one that was killed (adtr_deploy.runtime.outdir.finish_previous). Both are strict JSON: a NaN
(from a model's output or a video's timestamp) becomes null. Both carry the run id and the model's sha256, which
--resume compares before it continues a folder (check_same_run).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import dumps_strict, sha256_file, strict_json, write_json_atomic
from adtr_deploy.runtime.base import Backend
from adtr_deploy.runtime.cpu import cpu_info
from adtr_deploy.runtime.frames import Frame, Source
from adtr_deploy.runtime.outdir import NO_SPACE, RESULTS_FILE, SUMMARY_FILE, disk_full
from adtr_deploy.runtime.postprocess import Prediction
from adtr_deploy.runtime.runstate import RunState, bounded_gaps

if TYPE_CHECKING:
    from adtr_deploy.runtime.pipeline import Pipeline

CHECKPOINT_S = 30.0  # summary.json is rewritten (running: true) this often while a run lasts


def source_identity(source: Source) -> str:
    """What --resume compares: a local path resolved (so `imgs` and `/abs/imgs` match), a URL or camera as named."""
    name = str(source.name)
    if "://" in name or name.startswith("camera:") or name.isdigit():
        return name
    return os.path.realpath(name)


def model_sha256(backend: Backend) -> str | None:
    """The sha256 model.json records, else the file's own (None for a served model)."""
    sha = backend.spec.extra.get("sha256") if isinstance(backend.spec.extra, dict) else None
    if not sha and backend.local and backend.path.is_file():
        sha = sha256_file(backend.path)
    return sha


def check_same_run(
    previous: dict | None, out_dir: Path, sha256: str | None, source: Source, repo: str | None = None
) -> None:
    """--resume continues the same model on the same source, or refuses: records of two models never mix. Versions of
    one versioned model folder (`repo`, runtime/rollout.py) count as the same model: a rollout changes the version a
    service runs, and its restart continues the folder (each record names its `model_version`)."""
    if not previous:
        return
    theirs = previous.get("model_sha256")
    same_repo = repo is not None and previous.get("model_repo") == repo
    if theirs and sha256 and theirs != sha256 and not same_repo:
        raise UserError(
            f"--resume: {out_dir} holds results of another model (sha256 {theirs[:16]}…, this one is "
            f"{sha256[:16]}…); choose another --out for this model, or --overwrite to replace them"
        )
    source_id = previous.get("source_id")
    if source_id and source_id != source_identity(source):
        raise UserError(
            f"--resume: {out_dir} holds results of another source ({previous.get('source')}); "
            "choose another --out for this source, or --overwrite to replace them"
        )


def build_record(
    frame: Frame,
    pred: Prediction | None,
    error: str | None,
    run_id: str,
    sha256: str | None,
    version: int | None = None,
    saturated: float | None = None,
) -> dict:
    """One frame's record; `latency_ms` runs from the moment the frame was taken from the source until now;
    `model_version`: the version of a versioned model folder that scored it (None for a plain model path);
    `saturated`: the share of the model input's pixel values clipped at 255 (scored frames; the drift monitor's)."""
    latency = (time.perf_counter() - frame.acquired) * 1000
    record = {
        "source": frame.source,
        "frame": frame.frame,
        "timestamp": round(frame.timestamp, 6),
        "score": None if pred is None else strict_json(pred.score),
        "normalized_score": None if pred is None else strict_json(round(pred.normalized_score, 6)),
        "is_anomaly": None if pred is None else pred.is_anomaly,
        "status": "ok" if pred is not None else "error",
        "error": error,
        "latency_ms": round(latency, 3),
        "run": run_id,
        "model_sha256": sha256[:16] if sha256 else None,
        "model_version": version,
    }
    if saturated is not None:
        record["saturated"] = round(saturated, 4)
    if frame.gap is not None:
        record["gap"] = frame.gap
    return record


def encode_record(record: dict) -> bytes:
    """The record's line in results.jsonl, newline included."""
    return (dumps_strict(record) + "\n").encode("utf-8")


def build_summary(state: RunState, pipeline: Pipeline, *, running: bool) -> dict:
    """summary.json of one start as it stands (`running`: a checkpoint, not the end), from its state and the pipeline
    that runs it (its source, postprocessor, backend, batch size, workers, model sha256 and video)."""
    source, post, backend = pipeline.source, pipeline.post, pipeline.backend
    video = pipeline.video
    src = source.stats()
    wall_s = time.perf_counter() - state.t_start
    gaps, gaps_total = bounded_gaps(src.get("gaps", []))
    return {
        **state.counts,
        "throughput_fps": round(state.counts["ok"] / wall_s, 3) if wall_s > 0 else None,
        "wall_s": round(wall_s, 3),
        "latency_ms": state.latency.summary(),
        "inference_ms_per_image": state.infer_ms_mean,
        "dropped_frames": src.get("dropped", 0),
        "reconnects": src.get("reconnects", 0),
        "gaps": gaps,
        "gaps_total": gaps_total,
        "running": running,
        "stopped": None if running else state.stopped,
        "signal": signal.Signals(state.signal).name if state.signal else None,
        "resumed_skipped": state.skipped,
        "threshold": strict_json(post.threshold),
        "calibration": post.calibration.method,
        "source": source.name,
        "source_id": source_identity(source),
        "live": source.live,
        "batch_size": pipeline.batch_size,
        "workers": pipeline.options.workers,
        "backend": backend.describe(),
        "cpu": cpu_info(),  # the CPU's model and flags: what the figures above were measured on
        "model_sha256": pipeline.model_sha256,
        "model_version": pipeline.model_version,  # at this checkpoint; each record names its own
        "model_repo": pipeline.model_repo,
        "run": state.run_id,
        "started_at": state.started_at,
        "results": RESULTS_FILE,
        "video": None if video is None or not video.frames else str(video.path),
    }


def write_summary(summary: dict, out_dir: Path) -> None:
    """OUT/summary.json, renamed into place; a full disk raises DiskFullError."""
    try:
        write_json_atomic(summary, out_dir / SUMMARY_FILE)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise disk_full(exc, out_dir / SUMMARY_FILE) from None
        raise
