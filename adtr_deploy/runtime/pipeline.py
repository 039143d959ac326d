"""The run loop: source -> decode + preprocess in worker threads -> batches -> backend -> postprocess -> outputs.

Decoding and resizing happen in a thread pool (OpenCV releases the GIL) with a bounded number of frames in flight, so
memory stays flat however long the source is. Results come out in source order. Every frame taken from the source gets
one line in results.jsonl, written and flushed as soon as its batch is done, so a crash or Ctrl-C loses nothing already
processed; the summary is written at the end whatever the reason the run stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.preprocess import ImageDecodeError, resize, stack_batch
from adtr_deploy.runtime.base import Backend
from adtr_deploy.runtime.postprocess import Postprocessor, Prediction, overlay
from adtr_deploy.runtime.sources import END, Frame, Source, decode_frame

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
OVERLAY_DIR = "overlays"
DEFAULT_VIDEO_FPS = 10.0  # for --save-video when the source has no frame rate (images, most streams)


@dataclass(frozen=True)
class RunOptions:
    """What `adtr-run` does besides inference. Limits of None mean: until the source ends (or Ctrl-C for live ones)."""

    batch_size: int = 1
    workers: int = 2
    threshold: float | None = None
    save_overlays: bool = False
    save_video: str | Path | None = None
    show: bool = False
    max_frames: int | None = None
    duration: float | None = None  # seconds of wall-clock time


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {
        "mean": round(float(a.mean()), 3),
        **{f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)},
    }


class _Window:
    """--show: a cv2.imshow window, or a one-time notice when there is no display or OpenCV is the headless build."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.enabled = True
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            self._disable("there is no display (DISPLAY is not set)")

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.log(f"--show is ignored: {why}; results and overlays are still written")

    def show(self, image_bgr: np.ndarray) -> bool:
        """Show one frame; False when the user closed the window or pressed q / Esc."""
        if not self.enabled:
            return True
        try:
            cv2.imshow("adtr-run", image_bgr)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error:
            self._disable("this OpenCV has no GUI support (opencv-python-headless); install opencv-python for a window")
            return True
        return key not in (ord("q"), 27)

    def close(self) -> None:
        if self.enabled:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass


class _VideoOut:
    """--save-video: annotated frames at the first frame's size; the codec follows the suffix (.mp4 mp4v, else MJPG)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, image_bgr: np.ndarray) -> None:
        if self.writer is None:
            h, w = image_bgr.shape[:2]
            self.size = (w, h)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            codec = "mp4v" if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") else "MJPG"
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codec), self.fps, self.size)
            if not self.writer.isOpened():
                raise ValueError(f"cannot write the video {self.path} with codec {codec}; use a .avi or .mp4 path")
        if (image_bgr.shape[1], image_bgr.shape[0]) != self.size:
            image_bgr = cv2.resize(image_bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(image_bgr)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class Pipeline:
    """Runs one backend over one source and writes OUT_DIR/results.jsonl and OUT_DIR/summary.json.

    `on_record(record, counts)` is called after every record (for progress displays); `log(message)` receives notices.
    """

    def __init__(
        self,
        backend: Backend,
        source: Source,
        out_dir: str | Path,
        options: RunOptions = RunOptions(),
        *,
        on_record: Callable[[dict, dict], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if options.batch_size < 1 or options.workers < 1:
            raise ValueError("--batch-size and --workers must be at least 1")
        for name, value in (("--max-frames", options.max_frames), ("--duration", options.duration)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive; leave it out to run until the source ends")
        self.backend = backend
        self.source = source
        self.out_dir = Path(out_dir)
        self.options = options
        self.post = Postprocessor(backend.spec.calibration, options.threshold)
        self.batch_size = min(options.batch_size, backend.max_batch or options.batch_size)
        self.on_record = on_record
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.counts = {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}
        self._latencies: list[float] = []
        self._infer_ms: list[float] = []
        self._keep_original = options.save_overlays or options.save_video is not None or options.show

    # -- worker side -------------------------------------------------------------------------------------------------
    def _load(self, frame: Frame) -> tuple[np.ndarray | None, np.ndarray]:
        """Decode and preprocess one frame (in a worker thread): (original RGB if needed for pictures, model input)."""
        rgb = decode_frame(frame)
        return (rgb if self._keep_original else None), resize(rgb, self.backend.spec.input_size)

    # -- main loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Process the source until it ends, a limit is reached or the user interrupts; returns the summary."""
        opts = self.options
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if opts.save_overlays:
            (self.out_dir / OVERLAY_DIR).mkdir(exist_ok=True)
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t_start = time.perf_counter()
        deadline = t_start + opts.duration if opts.duration else None
        # Frames in flight: enough to keep every worker busy on files; one batch for live sources, so what is processed
        # is never older than one batch.
        window = self.batch_size if self.source.live else max(2 * self.batch_size, 2 * opts.workers)
        pending: deque[tuple[Frame, Future]] = deque()
        batch: list[tuple[Frame, object]] = []  # (frame, (original, input) or the error message), in source order
        taken, exhausted, stopped = 0, False, "end of source"
        window_ui = _Window(self.log) if opts.show else None
        video = None
        if opts.save_video:
            video = _VideoOut(Path(opts.save_video), DEFAULT_VIDEO_FPS)
        pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="adtr-decode")
        results = open(self.out_dir / RESULTS_FILE, "w", encoding="utf-8")
        self._results, self._video, self._window = results, video, window_ui
        try:
            self.source.start()
            if video is not None and self.source.fps:
                video.fps = self.source.fps
            while True:
                if deadline is not None and time.perf_counter() >= deadline and not exhausted:
                    exhausted, stopped = True, "duration"
                # Keep the window full; block briefly on the source only when there is nothing else to do.
                while not exhausted and len(pending) < window:
                    if opts.max_frames is not None and taken >= opts.max_frames:
                        exhausted, stopped = True, "max-frames"
                        break
                    frame = self.source.read(timeout=0.0 if pending or batch else 0.1)
                    if frame is END:
                        exhausted = True
                        break
                    if frame is None:
                        break
                    taken += 1
                    pending.append((frame, pool.submit(self._load, frame)))
                if not pending:
                    if batch:
                        self._finish(batch)
                        batch = []
                    if exhausted or self._stop_requested:
                        break
                    continue
                frame, future = pending.popleft()
                try:
                    batch.append((frame, future.result()))
                except (ImageDecodeError, OSError, ValueError, cv2.error) as exc:
                    batch.append((frame, str(exc) or type(exc).__name__))
                n_ok = sum(not isinstance(item, str) for _, item in batch)
                if (
                    n_ok >= self.batch_size
                    or len(batch) >= 4 * self.batch_size
                    or (not pending and (exhausted or self.source.live))
                ):
                    self._finish(batch)
                    batch = []
                if self._stop_requested:
                    stopped = "window closed"
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
        except BaseException as exc:
            stopped = f"error: {exc}"
            raise
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self.source.close()
            results.close()
            if video is not None:
                video.close()
            if window_ui is not None:
                window_ui.close()
            summary = self._summary(started_at, time.perf_counter() - t_start, stopped)
            (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    _stop_requested = False

    def _finish(self, batch: list[tuple[Frame, object]]) -> None:
        """Infer the decodable frames of a batch and write every frame's record, in order."""
        good = [(f, item) for f, item in batch if not isinstance(item, str)]
        predictions: dict[int, Prediction] = {}
        if good:
            x = stack_batch([item[1] for _, item in good])  # (B, H, W, 3) uint8
            t0 = time.perf_counter()
            maps, scores = self.backend.run(x)
            infer_ms = (time.perf_counter() - t0) * 1000
            self._infer_ms.append(infer_ms / len(good))
            for (f, _), p in zip(good, self.post(maps, scores), strict=True):
                predictions[id(f)] = p
        for frame, item in batch:
            if isinstance(item, str):
                self._write(self._record(frame, None, item))
                continue
            pred = predictions[id(frame)]
            record = self._record(frame, pred, None)
            original = item[0]
            if original is not None:
                picture = overlay(original, pred, self.post.heat(pred.anomaly_map))
                if self.options.save_overlays:
                    target = self.out_dir / OVERLAY_DIR / f"{frame.key}.jpg"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(target), picture)
                    record["overlay"] = str(target.relative_to(self.out_dir))
                if self._video is not None:
                    self._video.write(picture)
                if self._window is not None and not self._window.show(picture):
                    self._stop_requested = True
            self._write(record)

    def _record(self, frame: Frame, pred: Prediction | None, error: str | None) -> dict:
        latency = (time.perf_counter() - frame.acquired) * 1000
        record = {
            "source": frame.source,
            "frame": frame.frame,
            "timestamp": round(frame.timestamp, 6),
            "score": None if pred is None else pred.score,
            "normalized_score": None if pred is None else round(pred.normalized_score, 6),
            "is_anomaly": None if pred is None else pred.is_anomaly,
            "status": "ok" if pred is not None else "error",
            "error": error,
            "latency_ms": round(latency, 3),
        }
        if frame.gap is not None:
            record["gap"] = frame.gap
        self.counts["images"] += 1
        if pred is None:
            self.counts["errors"] += 1
        else:
            self.counts["ok"] += 1
            self.counts["anomalies"] += int(pred.is_anomaly)
            self._latencies.append(latency)
        return record

    def _write(self, record: dict) -> None:
        # One write call per line, then flush: an interrupted run never leaves half a record behind.
        self._results.write(json.dumps(record) + "\n")
        self._results.flush()
        if self.on_record is not None:
            self.on_record(record, self.counts)

    def _summary(self, started_at: str, wall_s: float, stopped: str) -> dict:
        src = self.source.stats()
        return {
            **self.counts,
            "throughput_fps": round(self.counts["ok"] / wall_s, 3) if wall_s > 0 else None,
            "wall_s": round(wall_s, 3),
            "latency_ms": _percentiles(self._latencies),
            "inference_ms_per_image": round(float(np.mean(self._infer_ms)), 3) if self._infer_ms else None,
            "dropped_frames": src.get("dropped", 0),
            "reconnects": src.get("reconnects", 0),
            "gaps": src.get("gaps", []),
            "stopped": stopped,
            "threshold": self.post.threshold,
            "calibration": self.post.calibration.method,
            "source": self.source.name,
            "live": self.source.live,
            "batch_size": self.batch_size,
            "workers": self.options.workers,
            "backend": self.backend.describe(),
            "started_at": started_at,
            "results": RESULTS_FILE,
            "video": None if self._video is None or not self._video.frames else str(self._video.path),
        }


def run_pipeline(
    backend: Backend, source: Source, out_dir: str | Path, options: RunOptions = RunOptions(), **kw
) -> dict:
    """Convenience wrapper: `Pipeline(...).run()`."""
    return Pipeline(backend, source, out_dir, options, **kw).run()
