"""One camera of a multi-camera run: its own Pipeline on its own thread, writing the single-camera layout in OUT/<name>/.

Everything a single `adtr-run` promises holds per camera because each camera *is* a single-camera pipeline: its own
folder with results.jsonl, segments, summary.json, runs.jsonl, lock and --keep; --resume per folder; its live source
reconnecting by itself after a drop. What is shared is the model (adtr_deploy.runtime.batcher). Two things are added
here: every record carries `camera`, and a live camera whose source cannot be opened (or whose run fails) is recorded
(`state` "retrying", `error`, `failures`) and started again with backoff while the others go on. A file or video
camera whose run fails is not retried (it is "failed", with the error): a video cannot be resumed, and a file
that failed once fails again.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.frames import Source
from adtr_deploy.runtime.outdir import earlier_outputs
from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.sources import open_source

BACKOFF_S = 0.5
BACKOFF_MAX_S = 10.0
STATES = ("starting", "running", "paused", "retrying", "finished", "failed", "removed", "stopped")


class CameraPipeline(Pipeline):
    """A Pipeline whose records carry the camera's name and which another thread can stop at a record boundary."""

    def __init__(self, camera: str, *args, **kw):
        super().__init__(*args, **kw)
        self.camera = camera
        self._stop_signal: int | None = None
        self.stop_reason: str | None = None

    def request_stop(self, signum: int = signal.SIGTERM, reason: str = "interrupted") -> None:
        """Stop at the next record boundary, as a first SIGINT/SIGTERM does a single-camera run (seen by _maintain,
        which the loop calls between batches, paused or not)."""
        self.stop_reason = reason
        self._stop_signal = signum

    def _maintain(self, state) -> None:
        if self._stop_signal is not None and state.signal is None:
            state.signal = self._stop_signal
        super()._maintain(state)

    def _close(self, state, abrupt: bool) -> dict:
        if self.stop_reason not in (None, "interrupted") and state.signal == self._stop_signal:
            state.stopped, state.signal = self.stop_reason, None  # "removed": no signal was sent to anybody
        return super()._close(state, abrupt)

    def _write(self, state, record: dict, *args) -> None:
        record["camera"] = self.camera
        super()._write(state, record, *args)


def prestarted(source: Source) -> Source:
    """A source opened at the line's start (so a bad one is refused then, naming its camera); the pipeline's own
    start() must not open it a second time."""
    source.start()
    source.start = lambda: None  # type: ignore[method-assign]  -- this instance is open already
    return source


class Camera:
    """A camera's thread: runs its pipeline, retries a source that fails, stops when asked. `state` is one of STATES."""

    def __init__(
        self,
        spec,
        backend,
        out_dir: Path,
        options: RunOptions,
        *,
        timeout_s: float = 5.0,
        log: Callable[[str], None] = print,
        observers: Sequence[Callable] = (),
        source: Source | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.out_dir = Path(out_dir)
        self.options = options
        self.timeout_s = timeout_s
        self.log = log
        self.observers = list(observers)
        self.pause = threading.Event()
        if spec.paused:
            self.pause.set()
        self._source = source
        self._stop = threading.Event()
        self._stop_args: tuple[int, str] = (signal.SIGTERM, "stopped")
        self.pipeline: CameraPipeline | None = None
        self.state = "starting"
        self.error: str | None = None
        self.failures = 0
        self.summary: dict | None = None
        self.on_end: Callable[[Camera], None] | None = None
        self.drift = None  # its DriftMonitor, when the line watches drift
        self._thread = threading.Thread(target=self._run, name=f"adtr-camera-{self.name}", daemon=True)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "removed", "stopped")

    def start(self) -> None:
        self._thread.start()

    def set_paused(self, paused: bool) -> None:
        if paused:
            self.pause.set()
        else:
            self.pause.clear()
        if not self.done and self.state != "retrying":
            self.state = "paused" if paused else "running"
        if paused:
            self.backend.close()  # the batcher stops expecting this camera's frames

    def stop(self, reason: str = "stopped", signum: int = signal.SIGTERM) -> None:
        """Ask the camera to stop at its next record boundary (`reason`: "removed", "interrupted", ...); the first
        reason given stands."""
        if self._stop.is_set():
            return
        self._stop_args = (signum, reason)
        self._stop.set()
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.request_stop(signum, reason)

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _open_source(self) -> Source:
        opts = self.options
        try:
            return open_source(
                self.spec.source,
                timeout_s=self.timeout_s,
                queue_size=max(16, 2 * opts.batch_size),
                max_pixels=opts.max_pixels,
            )
        except UserError as exc:
            raise UserError(f"camera {self.name!r}: {exc}") from None

    def _run(self) -> None:
        delay = BACKOFF_S
        options = self.options
        try:
            while not self._stop.is_set():
                source, self._source = self._source, None
                pipeline = None
                try:
                    source = source or self._open_source()
                    pipeline = self.pipeline = CameraPipeline(
                        self.name, self.backend, source, self.out_dir, options,
                        log=self.log, observers=self.observers, pause=self.pause,
                    )  # fmt: skip
                    if self._stop.is_set():
                        pipeline.request_stop(*self._stop_args)
                    self.state = "paused" if self.pause.is_set() else "running"
                    self.summary = pipeline.run()
                except Exception as exc:  # noqa: BLE001 -- recorded and retried; the other cameras go on
                    if source is not None:
                        source.close()
                    self.failures += 1
                    self.error = str(exc) or type(exc).__name__
                    if source is not None and not source.live:
                        self.state = "failed"
                        self.log(f"camera {self.name}: {self.error}; not retried (a file or video source)")
                        return
                    self.state = "retrying"
                    self.log(f"camera {self.name}: {self.error}; retrying in {delay:g} s")
                    if earlier_outputs(self.out_dir):  # what it wrote is kept: the next attempt continues it
                        options = dataclasses.replace(options, resume=True, overwrite=False)
                    if self._stop.wait(delay):
                        break
                    delay = min(2 * delay, BACKOFF_MAX_S)
                    continue
                self.error = None
                stopped = self.summary.get("stopped")
                if self._stop.is_set():
                    self.state = "removed" if self._stop_args[1] == "removed" else "stopped"
                else:
                    self.state = "failed" if str(stopped).startswith("error") else "finished"
                return
            self.state = "removed" if self._stop_args[1] == "removed" else "stopped"
        finally:
            self.backend.close()
            if self.on_end is not None:
                self.on_end(self)

    def status(self) -> dict:
        """What the line's API and page show about this camera."""
        counts = self.pipeline.counts if self.pipeline is not None else {}
        return {
            "name": self.name,
            "source": redact_url(self.spec.source),
            "state": self.state,
            "paused": self.pause.is_set(),
            "error": self.error,
            "failures": self.failures,
            "counts": dict(counts),
            "folder": self.out_dir.name,
            "at": time.time(),
        }
