"""The run loop: source -> decode + preprocess in worker threads -> batches -> backend -> postprocess -> outputs.

Decoding and resizing happen in a thread pool (OpenCV releases the GIL) with a bounded number of frames in flight, so
memory stays flat however long the source is. Results come out in source order. Every frame taken from the source gets
one line in results.jsonl, written and flushed as soon as its batch is done, so a crash or Ctrl-C loses nothing already
processed; the summary is written at the end whatever the reason the run stopped.

SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd) do not raise in the middle of a batch: they ask the loop to stop at
the next record boundary, so the summary counts exactly the records results.jsonl holds; frames taken but not yet
recorded are neither written nor counted (a --resume run picks them up). A second signal stops at once; the summary
then recounts what the file holds.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import write_json_atomic
from adtr_deploy.imageheader import DEFAULT_MAX_PIXELS
from adtr_deploy.preprocess import ImageDecodeError, resize, stack_batch
from adtr_deploy.runtime.base import Backend
from adtr_deploy.runtime.display import DEFAULT_VIDEO_FPS, VideoOut, Window
from adtr_deploy.runtime.frames import END, Frame, Source, decode_frame
from adtr_deploy.runtime.outdir import (
    OVERLAY_DIR,
    RESULTS_FILE,
    SUMMARY_FILE,
    check_out_dir,
    count_records,
    recorded_sources,
    write_image_atomic,
)
from adtr_deploy.runtime.postprocess import Postprocessor, Prediction, overlay

Batch = list[tuple[Frame, object]]  # frames in source order with (original, model input) or their error message


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # images declaring more pixels are refused from their header
    overwrite: bool = False  # replace the results of an earlier run in the same folder
    resume: bool = False  # append to them, skipping the inputs already recorded (image files only)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {
        "mean": round(float(a.mean()), 3),
        **{f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)},
    }


class Pipeline:
    """Runs one backend over one source and writes OUT_DIR/results.jsonl and OUT_DIR/summary.json.

    `on_record(record, counts)` is called after every record (for progress displays); `log(message)` receives notices.
    `observers` (the live view and alert sinks, adtr_deploy.runtime.serve) are called as
    `observer(record, picture, infer_ms)` after every record: `picture()` renders the annotated frame on demand (None for
    an error record) so nobody pays for pictures they do not use. While `pause` is set, no new frames are taken.
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
        observers: Sequence[Callable[..., None]] = (),
        pause: threading.Event | None = None,
    ):
        if options.batch_size < 1 or options.workers < 1:
            raise UserError("--batch-size and --workers must be at least 1")
        for name, value in (("--max-frames", options.max_frames), ("--duration", options.duration)):
            if value is not None and value <= 0:
                raise UserError(f"{name} must be positive; leave it out to run until the source ends")
        self.backend = backend
        self.source = source
        self.out_dir = Path(out_dir)
        self.options = options
        self.post = Postprocessor(backend.spec.calibration, options.threshold)
        self.batch_size = min(options.batch_size, backend.max_batch or options.batch_size)
        self.on_record = on_record
        self.observers = tuple(observers)
        self.pause = pause
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.counts = {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}
        self.skipped = 0  # inputs recorded by the earlier run that --resume continues
        self._signal: int | None = None
        self._latencies: list[float] = []
        self._infer_ms: list[float] = []
        self._keep_original = bool(options.save_overlays or options.save_video is not None or options.show or observers)

    # -- worker side -------------------------------------------------------------------------------------------------
    def _load(self, frame: Frame) -> tuple[np.ndarray | None, np.ndarray]:
        """Decode and preprocess one frame (in a worker thread): (original RGB if needed for pictures, model input)."""
        rgb = decode_frame(frame, self.options.max_pixels)
        return (rgb if self._keep_original else None), resize(rgb, self.backend.spec.input_size)

    # -- main loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Process the source until it ends, a limit is reached or the user interrupts; returns the summary."""
        opts = self.options
        check_out_dir(self.out_dir, overwrite=opts.overwrite, resume=opts.resume)
        done = recorded_sources(self.out_dir / RESULTS_FILE) if opts.resume else set()
        if opts.resume:
            if not hasattr(self.source, "skip"):
                raise UserError(
                    "--resume works for image files (a folder, a glob or a list); run videos and streams anew"
                )
            self.skipped = self.source.skip(done)
        # The source opens before anything is written: a source that fails leaves the folder as it was.
        self.source.start()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if opts.save_overlays:
                (self.out_dir / OVERLAY_DIR).mkdir(exist_ok=True)
            results = open(self.out_dir / RESULTS_FILE, "a" if opts.resume else "w", encoding="utf-8")
        except BaseException:
            self.source.close()
            raise
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t_start = time.perf_counter()
        deadline = t_start + opts.duration if opts.duration else None
        # Frames in flight: enough to keep every worker busy on files; one batch for live sources, so what is processed
        # is never older than one batch.
        window = self.batch_size if self.source.live else max(2 * self.batch_size, 2 * opts.workers)
        pending: deque[tuple[Frame, Future]] = deque()
        batch: Batch = []
        taken, exhausted, stopped = 0, False, "end of source"
        window_ui = Window(self.log) if opts.show else None
        video = None
        if opts.save_video:
            video = VideoOut(Path(opts.save_video), DEFAULT_VIDEO_FPS)
        pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="adtr-decode")
        self._in_flight = max(1, getattr(self.backend, "concurrency", 1) // self.batch_size)  # streams: batches at once
        self._streams_pool = ThreadPoolExecutor(self._in_flight, "adtr-infer") if self._in_flight > 1 else None
        self._running: deque[tuple[Batch, Future]] = deque()  # batches on the streams, oldest first
        start_offset = results.tell()
        self._results, self._video, self._window = results, video, window_ui
        restore = self._catch_signals()
        abrupt = False
        try:
            if video is not None and self.source.fps:
                video.fps = self.source.fps
            while True:
                if deadline is not None and time.perf_counter() >= deadline and not exhausted:
                    exhausted, stopped = True, "duration"
                # Keep the window full; block briefly on the source only when there is nothing else to do.
                paused = self.pause is not None and self.pause.is_set()
                while not exhausted and not paused and len(pending) < window:
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
                self._drain(keep=len(self._running))  # write what the streams have finished, without waiting
                if not pending:
                    if batch:
                        self._dispatch(batch)
                        batch = []
                    if exhausted or self._stop_requested or self._signal:
                        break
                    if paused:
                        time.sleep(0.05)
                    continue
                if self._signal:
                    break
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
                    self._dispatch(batch)
                    batch = []
                if self._stop_requested:
                    stopped = "window closed"
                    break
            self._drain()  # the batches still on a stream: finished, so recorded (a graceful stop included)
            if self._signal:
                stopped = "interrupted"
        except KeyboardInterrupt:
            stopped, abrupt = "interrupted", True
        except BaseException as exc:
            stopped, abrupt = f"error: {exc}", True
            raise
        finally:
            restore()
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if self._streams_pool is not None:  # batches still running finish; unrecorded ones are not counted
                self._streams_pool.shutdown(wait=True, cancel_futures=True)
            self.source.close()
            results.close()
            if video is not None:
                video.close()
            if window_ui is not None:
                window_ui.close()
            if abrupt:  # stopped between a write and its count: the file is the truth
                self.counts = count_records(self.out_dir / RESULTS_FILE, start_offset)
            summary = self._summary(started_at, time.perf_counter() - t_start, stopped)
            write_json_atomic(summary, self.out_dir / SUMMARY_FILE)
        return summary

    def _catch_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM ask the loop to stop at the next record boundary; a second one raises KeyboardInterrupt.
        Returns the function that restores the previous handlers. Only the main thread can set handlers; a SIGINT
        the process was started ignoring (a backgrounded job) stays ignored."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self._signal is not None:
                raise KeyboardInterrupt
            self._signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    _stop_requested = False
    _last_infer_ms = 0.0

    def _infer(self, batch: Batch) -> tuple[dict[int, Prediction], float | None]:
        """Predictions by id(frame) and inference ms per image (None: nothing to infer); safe on a stream's thread."""
        good = [(f, item) for f, item in batch if not isinstance(item, str)]
        if not good:
            return {}, None
        x = stack_batch([item[1] for _, item in good])  # (B, H, W, 3) uint8
        t0 = time.perf_counter()
        maps, scores = self.backend.run(x)
        infer_ms = (time.perf_counter() - t0) * 1000 / len(good)
        return {id(f): p for (f, _), p in zip(good, self.post(maps, scores), strict=True)}, infer_ms

    def _finish(self, batch: Batch) -> None:
        """Infer the decodable frames of a batch and write every frame's record, in order."""
        self._write_batch(batch, *self._infer(batch))

    def _dispatch(self, batch: Batch) -> None:
        """Infer and write a batch; with inference streams, start it and keep at most `_in_flight` in flight."""
        if self._streams_pool is None:
            self._finish(batch)
            return
        self._running.append((batch, self._streams_pool.submit(self._infer, batch)))
        self._drain(keep=self._in_flight - 1)

    def _drain(self, keep: int = 0) -> None:
        """Write finished batches in source order; block until at most `keep` remain in flight."""
        while self._running and (len(self._running) > keep or self._running[0][1].done()):
            batch, future = self._running.popleft()
            self._write_batch(batch, *future.result())

    def _write_batch(self, batch: Batch, predictions: dict[int, Prediction], infer_ms: float | None) -> None:
        if infer_ms is not None:
            self._infer_ms.append(infer_ms)
            self._last_infer_ms = infer_ms
        for frame, item in batch:
            if isinstance(item, str):
                self._write(self._record(frame, None, item))
                continue
            pred = predictions[id(frame)]
            record = self._record(frame, pred, None)
            original, picture = item[0], None
            drawn_here = self.options.save_overlays or self._video is not None or self._window is not None
            if original is not None and drawn_here:
                picture = overlay(original, pred, self.post.heat(pred.anomaly_map))
                if self.options.save_overlays:
                    target = self.out_dir / OVERLAY_DIR / f"{frame.key}.jpg"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_image_atomic(target, picture)
                    record["overlay"] = str(target.relative_to(self.out_dir))
                if self._video is not None:
                    self._video.write(picture)
                if self._window is not None and not self._stop_requested and not self._window.show(picture):
                    self._stop_requested = True
            self._write(record, original, pred, picture)

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
        return record

    def _write(self, record: dict, original=None, pred: Prediction | None = None, drawn=None) -> None:
        # One write call per line, then flush; the record is counted only once it is in the file.
        self._results.write(json.dumps(record) + "\n")
        self._results.flush()
        self.counts["images"] += 1
        if record["status"] == "ok":
            self.counts["ok"] += 1
            self.counts["anomalies"] += int(record["is_anomaly"])
            self._latencies.append(record["latency_ms"])
        else:
            self.counts["errors"] += 1
        if self.on_record is not None:
            self.on_record(record, self.counts)
        if self.observers:
            heat = self.post.heat

            def picture() -> np.ndarray | None:  # rendered later, on the observer's own thread, only if wanted
                if drawn is not None or original is None or pred is None:
                    return drawn
                return overlay(original, pred, heat(pred.anomaly_map))

            infer_ms = self._last_infer_ms if pred is not None else None
            for observe in self.observers:
                observe(record, picture, infer_ms)

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
            "signal": signal.Signals(self._signal).name if self._signal else None,
            "resumed_skipped": self.skipped,
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
