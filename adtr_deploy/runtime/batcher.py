"""Cross-camera batching: the frames of every camera that runs one model go into one backend call.

Each camera's pipeline runs on its own thread and calls `run(x)` on its CameraBackend as if it had the model to
itself; the call hands the frames to the model's Batcher and waits. The Batcher's thread takes what is waiting, up to
`max_batch` images, and runs them as one batch (one session, one copy of the weights in memory), then gives every
caller its own rows back. This is what DeepStream's stream muxer and Triton's dynamic batcher do.

When a batch goes: as soon as it is full; or as soon as no camera is expected, where a camera is expected while it has
just been given its last result (within `max_wait_ms`) and has not sent its next frame yet: it is decoding that frame
and will be back in a moment. That is what a busy model sees: every camera answered by one batch comes back at once,
and they go together. A camera that is waiting for its source (a slow camera, a dead one, a box with time to spare)
is not expected, so a frame never waits for it; and whatever happens, a frame waits at most `max_wait_ms`. Its
latency is therefore at most the wait bound plus the batch's inference time (plus the batch before it, if the model
was busy). A failing backend call fails every caller of that batch with its error.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class _Request:
    __slots__ = ("x", "client", "t", "done", "out", "error")

    def __init__(self, x: np.ndarray, client: str):
        self.x, self.client, self.t = x, client, time.monotonic()
        self.done = threading.Event()
        self.out: tuple[np.ndarray, np.ndarray] | None = None
        self.error: BaseException | None = None


class Batcher:
    """One model's batching thread; `client(name)` gives each camera its backend view."""

    def __init__(self, backend, max_batch: int = 8, max_wait_ms: float = 10.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_ms at least 0")
        self.backend = backend
        self.max_batch = min(max_batch, backend.max_batch or max_batch)
        self.max_wait_s = max_wait_ms / 1000
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._answered: dict[str, float] = {}  # client -> when its last result was given, until it sends again
        self._closed = False
        self.batches = 0
        self.images = 0
        # A backend with inference streams (--streams N: N sessions) runs N batches at once, one per worker.
        self.workers = max(1, int(getattr(backend, "concurrency", 1) or 1))
        self._threads = [
            threading.Thread(target=self._loop, name=f"adtr-batcher-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def client(self, name: str) -> CameraBackend:
        return CameraBackend(self, name)

    def stats(self) -> dict:
        """Batches run and their mean size, for the summary and the status page."""
        return {
            "batches": self.batches,
            "images": self.images,
            "mean_batch": round(self.images / self.batches, 3) if self.batches else None,
            "max_batch": self.max_batch,
            "max_wait_ms": round(self.max_wait_s * 1000, 3),
            "workers": self.workers,
        }

    def submit(self, x: np.ndarray, client: str) -> tuple[np.ndarray, np.ndarray]:
        """Called on a camera's thread: waits for its rows of the batch it joined."""
        req = _Request(x, client)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model's batcher is closed")
            self._queue.append(req)
            self._answered.pop(client, None)
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.out

    def forget(self, client: str) -> None:
        """A camera stopped (removed, paused, ended): the next batches no longer expect it."""
        with self._cond:
            self._answered.pop(client, None)
            self._cond.notify_all()

    def _wait_s(self, now: float) -> float:
        """How long the batch may still wait for cameras expected back: 0 to go now."""
        images = sum(len(r.x) for r in self._queue)
        if images >= self.max_batch:
            return 0.0
        bound = self._queue[0].t + self.max_wait_s - now
        expected = [t + self.max_wait_s - now for t in self._answered.values() if now - t < self.max_wait_s]
        return 0.0 if bound <= 0 or not expected else min(bound, max(expected))

    def _take(self) -> list[_Request]:
        """Whole requests in arrival order, up to max_batch images (a larger request goes alone)."""
        taken, images = [], 0
        while self._queue and (not taken or images + len(self._queue[0].x) <= self.max_batch):
            req = self._queue.popleft()
            taken.append(req)
            images += len(req.x)
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._queue:  # (another worker may have taken it while this one waited)
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    wait = 0.0 if self._closed else self._wait_s(time.monotonic())
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                taken = self._take()
            self._run(taken)

    def _run(self, taken: list[_Request]) -> None:
        try:
            x = taken[0].x if len(taken) == 1 else np.concatenate([r.x for r in taken])
            maps, scores = self.backend.run(x)
        except BaseException as exc:  # noqa: BLE001 -- handed to every caller of this batch, raised on its thread
            for req in taken:
                req.error = exc
                req.done.set()
            return
        start, now = 0, time.monotonic()
        with self._cond:
            self.batches += 1
            self.images += len(x)
            for req in taken:  # each is expected back for a moment: its camera decodes its next frame
                self._answered[req.client] = now
        for req in taken:
            n = len(req.x)
            req.out = (maps[start : start + n], scores[start : start + n])
            start += n
            req.done.set()

    def close(self) -> None:
        """Run what is waiting, then stop the workers (the backend itself is closed by its owner)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)


class CameraBackend:
    """What one camera's Pipeline sees as its backend: the real one's spec and description, with `run` going through
    the shared Batcher. `concurrency` is 1: the batcher, not the pipeline, decides what runs together."""

    concurrency = 1

    def __init__(self, batcher: Batcher, name: str):
        self._batcher = batcher
        self._backend = batcher.backend
        self.name_in_line = name

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._batcher.submit(x, self.name_in_line)

    def describe(self) -> dict:
        return {**self._backend.describe(), "shared_batch": self._batcher.stats()}

    def close(self) -> None:
        self._batcher.forget(self.name_in_line)

    def __getattr__(self, attr: str):  # spec, max_batch, local, path, name, device, ...: the real backend's
        return getattr(self._backend, attr)
