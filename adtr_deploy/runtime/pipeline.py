"""The run loop: source -> decode + preprocess in worker threads -> batches -> backend -> postprocess -> outputs.

Decoding and resizing happen in a thread pool (OpenCV releases the GIL) with a bounded number of frames in flight, and
everything a run keeps (adtr_deploy.runtime.runstate) is bounded, so memory stays flat however long the source is
(benchmarks/soak.py measures it over a million frames). Results come out in source order. Every frame taken from the
source gets one line in results.jsonl, written as soon as its batch is done, so a crash or Ctrl-C loses nothing
already processed; the summary is written at the end whatever the reason the run stopped, and checkpointed while it
runs (`"running": true`) so the next start can recount a start that was killed. The folder's layout, its lock and
its retention: adtr_deploy.runtime.outdir and adtr_deploy.runtime.segments; the record and the summary:
adtr_deploy.runtime.records.

SIGINT and SIGTERM stop the loop at the next record boundary (adtr_deploy.runtime.interrupts). A versioned model
folder's new version is switched in between two batches (`between_batches`, adtr_deploy.runtime.rollout).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.imageheader import DEFAULT_MAX_PIXELS
from adtr_deploy.preprocess import ImageDecodeError, resize, saturated_fraction
from adtr_deploy.runtime import outdir
from adtr_deploy.runtime.base import Backend
from adtr_deploy.runtime.display import DEFAULT_VIDEO_FPS, VideoOut, Window
from adtr_deploy.runtime.frames import END, Frame, Source, decode_frame
from adtr_deploy.runtime.interrupts import catch_signals
from adtr_deploy.runtime.outdir import OVERLAY_DIR
from adtr_deploy.runtime.postprocess import Postprocessor, Prediction, overlay
from adtr_deploy.runtime.records import (
    CHECKPOINT_S,
    build_record,
    build_summary,
    check_same_run,
    encode_record,
    model_sha256,
    write_summary,
)
from adtr_deploy.runtime.runstate import Batch, RunState
from adtr_deploy.runtime.segments import ResultsLog, apply_retention, open_results
from adtr_deploy.tiling import from_spec, run_frames


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
    overwrite: bool = False  # replace the results of an earlier run in the same folder (overlays included)
    resume: bool = False  # continue them: files skip the inputs already recorded; live sources start a new segment
    keep: tuple[str, ...] = ()  # live runs: retention of closed segments and their overlays, e.g. ("30d", "5GB")
    keep_frames: str = "none"  # "flagged": flagged parts' original frames in OUT/frames/, for review
    review_sample: float = 0.0  # with keep_frames: this share of passed parts too (seeded), to catch misses


class Pipeline:
    """Runs one backend over one source and writes OUT_DIR/results.jsonl and OUT_DIR/summary.json.

    `on_record(record, counts)` is called after every record (for progress displays); `log(message)` receives notices.
    `observers` (the live view and alert sinks, adtr_deploy.runtime.serve) are called as
    `observer(record, picture, infer_ms)` after every record: `picture()` renders the annotated frame on demand (None for
    an error record) so nobody pays for pictures they do not use. While `pause` is set, no new frames are taken.
    Each `run()` makes its own RunState (`self.state`, None before the first run).
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
        self.keep_age_s, self.keep_bytes = outdir.parse_keep(options.keep)
        self.post = Postprocessor(backend.spec.calibration, options.threshold)
        self.tiling = from_spec(backend.spec)  # a tiled model gets frames at their own size (adtr_deploy/tiling.py)
        self.batch_size = min(options.batch_size, backend.max_batch or options.batch_size)
        self.on_record = on_record
        self.observers = tuple(observers)
        self.pause = pause
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.state: RunState | None = None
        self.model_sha256 = self.model_repo = self.model_version = None  # repo and version: runtime/rollout.py
        self.between_batches: Callable[[RunState], None] = lambda state: None  # rollout.py's switch
        self._draws = bool(options.save_overlays or options.save_video is not None or options.show)
        self._keep_original = self._draws or bool(observers) or options.keep_frames != "none"  # frames kept for review
        self._results: ResultsLog | None = None
        self.video: VideoOut | None = None
        self._window: Window | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._streams_pool: ThreadPoolExecutor | None = None
        self._in_flight = 1
        self._segment_sizes: dict[str, int] = {}  # closed segments' bytes (with overlays), for --keep SIZE

    @property
    def counts(self) -> dict:
        """The current (or last) start's counts."""
        return self.state.counts if self.state else {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}

    @property
    def skipped(self) -> int:
        return self.state.skipped if self.state else 0

    # -- worker side -------------------------------------------------------------------------------------------------
    def _load(self, frame: Frame) -> tuple[np.ndarray | None, np.ndarray, float]:
        """Decode and preprocess one frame (worker thread): (original RGB or None, model input, share clipped at 255)."""
        rgb = decode_frame(frame, self.options.max_pixels)
        x = rgb if self.tiling else resize(rgb, self.backend.spec.input_size)
        return (rgb if self._keep_original else None), x, saturated_fraction(x)

    # -- one run -----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Process the source until it ends, a limit is reached or the user interrupts; returns the summary."""
        outdir.lock_out_dir(self.out_dir)
        try:
            state = self.state = self._open()
            restore = catch_signals(state)
            abrupt = False
            try:
                self._loop(state)
            except KeyboardInterrupt:
                state.stopped, abrupt = "interrupted", True
            except BaseException as exc:
                state.stopped, abrupt = f"error: {exc}", True
                raise
            finally:
                try:
                    summary = self._close(state, abrupt)
                finally:
                    restore()
        finally:
            outdir.unlock_out_dir(self.out_dir)
        return summary

    def _open(self) -> RunState:
        """Check and prepare --out, open the source, then the outputs; returns the new start's state."""
        opts, out = self.options, self.out_dir
        outdir.check_out_dir(out, overwrite=opts.overwrite, resume=opts.resume)
        outdir.check_out_outside_source(out, getattr(self.source, "root", None))
        if opts.resume and not (self.source.live or hasattr(self.source, "skip")):
            raise UserError(
                "--resume works for image files (a folder, a glob or a list) and live sources (a camera or a "
                "stream); run a video anew"
            )
        self.model_sha256 = model_sha256(self.backend)
        state = RunState(outdir.new_run_id(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if opts.resume:
            check_same_run(outdir.read_summary(out), out, self.model_sha256, self.source, self.model_repo)
        self._retention()  # before anything is written: on a full disk, the folder's own old segments make room
        if opts.resume:
            outdir.finish_previous(out, self.log)
            if not self.source.live:
                state.skipped = self.source.skip(outdir.recorded_sources(out))
        # The source opens before anything is replaced or started: a source that fails leaves the earlier results
        # as they were (a --resume has only added the previous start's summary to runs.jsonl).
        self.source.start()
        try:
            self._results = open_results(out, state.run_id, opts, live=self.source.live, max_bytes=self.keep_bytes)
            if opts.save_overlays:
                (out / OVERLAY_DIR).mkdir(exist_ok=True)
            if opts.keep and not self.source.live:
                self.log("--keep applies to the segments of live runs; this source is finite, so it removes nothing")
            self._retention()
            self._checkpoint(state)
        except BaseException:
            self.source.close()
            if self._results is not None:
                self._results.close()
            raise
        if opts.save_video:
            self.video = VideoOut(Path(opts.save_video), self.source.fps or DEFAULT_VIDEO_FPS)
        self._window = Window(self.log) if opts.show else None
        self._pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="adtr-decode")
        self._in_flight = max(1, getattr(self.backend, "concurrency", 1) // self.batch_size)  # streams: batches at once
        self._streams_pool = ThreadPoolExecutor(self._in_flight, "adtr-infer") if self._in_flight > 1 else None
        return state

    def _loop(self, state: RunState) -> None:
        opts = self.options
        deadline = state.t_start + opts.duration if opts.duration else None
        # Frames in flight: enough to keep every worker busy on files; one batch for live sources, so what is processed
        # is never older than one batch.
        window = self.batch_size if self.source.live else max(2 * self.batch_size, 2 * opts.workers)
        while True:
            if deadline is not None and time.perf_counter() >= deadline and not state.exhausted:
                state.exhausted, state.stopped = True, "duration"
            paused = self.pause is not None and self.pause.is_set()
            if not paused:
                self._fill(state, window)
            self._drain(state, keep=len(state.running))  # write what the streams have finished, without waiting
            self._maintain(state)
            if not state.pending:
                if state.batch:
                    self._dispatch(state, state.batch)
                    state.batch = []
                if state.exhausted or state.stop_requested or state.signal:
                    break
                if paused:
                    time.sleep(0.05)
                continue
            if state.signal:
                break
            self._collect(state)
            if state.stop_requested:
                state.stopped = "window closed"
                break
        self._drain(state)  # the batches still on a stream: finished, so recorded (a graceful stop included)
        if state.signal:
            state.stopped = "interrupted"

    def _fill(self, state: RunState, window: int) -> None:
        """Keep `window` frames decoding; block briefly on the source only when there is nothing else to do."""
        while not state.exhausted and len(state.pending) < window:
            if self.options.max_frames is not None and state.taken >= self.options.max_frames:
                state.exhausted, state.stopped = True, "max-frames"
                return
            frame = self.source.read(timeout=0.0 if state.pending or state.batch else 0.1)
            if frame is END:
                state.exhausted = True
                return
            if frame is None:
                return
            state.taken += 1
            state.pending.append((frame, self._pool.submit(self._load, frame)))

    def _collect(self, state: RunState) -> None:
        """Move the oldest decoded frame into the batch; dispatch the batch once it is full (or nothing more comes)."""
        frame, future = state.pending.popleft()
        try:
            state.batch.append((frame, future.result()))
        except (ImageDecodeError, OSError, ValueError, cv2.error) as exc:
            state.batch.append((frame, str(exc) or type(exc).__name__))
        n_ok = sum(not isinstance(item, str) for _, item in state.batch)
        if (
            n_ok >= self.batch_size
            or len(state.batch) >= 4 * self.batch_size
            or (not state.pending and (state.exhausted or self.source.live))
        ):
            self._dispatch(state, state.batch)
            state.batch = []

    def _maintain(self, state: RunState) -> None:
        """Between batches: switch in a new model version, close a full segment (and --keep), checkpoint now and then."""
        self.between_batches(state)
        if self._results.due():
            closed = self._results.next_segment()
            removed = self._retention()
            self._checkpoint(state)
            self.log(f"closed {closed}" + (f"; --keep removed {', '.join(removed)}" if removed else ""))
        elif time.perf_counter() >= state.next_checkpoint:
            self._checkpoint(state)

    def _retention(self) -> list[str]:
        """--keep, for live runs (a file run's results.jsonl is the run itself)."""
        if not self.source.live:
            return []
        return apply_retention(self.out_dir, self.keep_age_s, self.keep_bytes, self._segment_sizes)

    def _checkpoint(self, state: RunState) -> None:
        """summary.json as it stands, marked running: what a killed start leaves for the next one to finish."""
        state.next_checkpoint = time.perf_counter() + CHECKPOINT_S
        write_summary(build_summary(state, self, running=True), self.out_dir)

    def _close(self, state: RunState, abrupt: bool) -> dict:
        """Stop the threads, close the outputs, write the summary (and add it to runs.jsonl); returns it."""
        state.closing = True  # from here on a signal no longer raises: the summary gets written
        for _, future in state.pending:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._streams_pool is not None:  # batches still running finish; unrecorded ones are not counted
            self._streams_pool.shutdown(wait=True, cancel_futures=True)
        self.source.close()
        if self._results is not None:
            self._results.close()
        if self.video is not None:
            self.video.close()
        if self._window is not None:
            self._window.close()
        if abrupt:  # stopped between a write and its count: the files are the truth
            state.counts = outdir.recount(self.out_dir, state.run_id)
        summary = build_summary(state, self, running=False)
        try:
            outdir.append_history(self.out_dir, summary)
            write_summary(summary, self.out_dir)
        except (OSError, UserError) as exc:  # the disk is full: the run's own error is the one to report
            self.log(f"the summary could not be written ({exc}); the next start recounts this one from its records")
        return summary

    # -- batches -----------------------------------------------------------------------------------------------------
    def _infer(self, batch: Batch) -> tuple[dict[int, Prediction], float | None]:
        """Predictions by id(frame) and inference ms per image (None: nothing to infer); safe on a stream's thread."""
        good = [(f, item) for f, item in batch if not isinstance(item, str)]
        if not good:
            return {}, None
        t0 = time.perf_counter()
        maps, scores = run_frames(self.backend, [item[1] for _, item in good], self.tiling)  # frames never mix
        infer_ms = (time.perf_counter() - t0) * 1000 / len(good)
        return {id(f): p for (f, _), p in zip(good, self.post(maps, scores), strict=True)}, infer_ms

    def _dispatch(self, state: RunState, batch: Batch) -> None:
        """Infer and write a batch; with inference streams, start it and keep at most `_in_flight` in flight."""
        if self._streams_pool is None:
            self._write_batch(state, batch, *self._infer(batch))
            return
        state.running.append((batch, self._streams_pool.submit(self._infer, batch)))
        self._drain(state, keep=self._in_flight - 1)

    def _drain(self, state: RunState, keep: int = 0) -> None:
        """Write finished batches in source order; block until at most `keep` remain in flight."""
        while state.running and (len(state.running) > keep or state.running[0][1].done()):
            batch, future = state.running.popleft()
            self._write_batch(state, batch, *future.result())

    # -- records -----------------------------------------------------------------------------------------------------
    def _write_batch(
        self, state: RunState, batch: Batch, predictions: dict[int, Prediction], infer_ms: float | None
    ) -> None:
        if infer_ms is not None:
            state.add_inference(infer_ms)
        for frame, item in batch:
            if isinstance(item, str):
                self._write(state, build_record(frame, None, item, state.run_id, self.model_sha256, self.model_version))
                continue
            pred = predictions[id(frame)]
            record = build_record(frame, pred, None, state.run_id, self.model_sha256, self.model_version, item[2])
            original, picture = item[0], None
            if original is not None and self._draws:
                picture = overlay(original, pred, self.post.heat(pred.anomaly_map))
                if self.options.save_overlays:
                    record["overlay"] = self._results.save_overlay(frame.key, picture)
                if self.video is not None:
                    self.video.write(picture)
                if self._window is not None and not state.stop_requested and not self._window.show(picture):
                    state.stop_requested = True
            self._results.keep_frame(frame.key, record, original, picture, pred, self.post.heat)  # --keep-frames
            self._write(state, record, original, pred, picture)

    def _write(self, state: RunState, record: dict, original=None, pred: Prediction | None = None, drawn=None) -> None:
        # One write call per line; the record is counted only once it is in the file.
        self._results.write(encode_record(record))
        counts = state.counts
        counts["images"] += 1
        if record["status"] == "ok":
            counts["ok"] += 1
            counts["anomalies"] += int(record["is_anomaly"])
            state.latency.add(record["latency_ms"])
        else:
            counts["errors"] += 1
        if self.on_record is not None:
            self.on_record(record, counts)
        if self.observers:
            heat = self.post.heat

            def picture() -> np.ndarray | None:  # rendered later, on the observer's own thread, only if wanted
                if drawn is not None or original is None or pred is None:
                    return drawn
                return overlay(original, pred, heat(pred.anomaly_map))

            infer_ms = state.last_infer_ms if pred is not None else None
            for observe in self.observers:
                observe(record, picture, infer_ms)


def run_pipeline(
    backend: Backend, source: Source, out_dir: str | Path, options: RunOptions = RunOptions(), **kw
) -> dict:
    """Convenience wrapper: `Pipeline(...).run()`."""
    return Pipeline(backend, source, out_dir, options, **kw).run()
