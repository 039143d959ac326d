"""Cross-camera batching: the frames of every camera that runs one model go into one backend call.

Each camera's pipeline runs on its own thread and calls `run(x)` on its CameraBackend as if it had the model to
itself; the call hands the frames to the model's Batcher and waits. The Batcher's thread takes what is waiting, up to
`max_batch` images, and runs them as one batch (one session, one copy of the weights in memory), then gives every
caller its own rows back. This is what DeepStream's stream muxer and Triton's dynamic batcher do.

When a batch goes: as soon as it is full; or when every camera that has been sending frames lately (within
ACTIVE_S) is waiting in it, since nobody else will come; or at the latest `max_wait_ms` after its first frame arrived.
A slow or dead camera sends nothing, so it never holds the others longer than that bound, and after ACTIVE_S of
silence not at all. A frame's latency is therefore at most the wait bound plus the batch's inference time (plus the
batch before it, if the model was busy). A failing backend call fails every caller of that batch with its error.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

ACTIVE_S = 1.0  # a camera that sent a frame within this many seconds is expected to send the next one soon


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
        self._last_seen: dict[str, float] = {}  # client -> monotonic time of its last request
        self._closed = False
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="adtr-batcher", daemon=True)
        self._thread.start()

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
        }

    def submit(self, x: np.ndarray, client: str) -> tuple[np.ndarray, np.ndarray]:
        """Called on a camera's thread: waits for its rows of the batch it joined."""
        req = _Request(x, client)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model's batcher is closed")
            self._queue.append(req)
            self._last_seen[client] = req.t
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.out

    def forget(self, client: str) -> None:
        """A camera stopped (removed, paused, ended): the next batches no longer expect it."""
        with self._cond:
            self._last_seen.pop(client, None)
            self._cond.notify_all()

    def _ready(self, now: float) -> bool:
        images = sum(len(r.x) for r in self._queue)
        if images >= self.max_batch or now - self._queue[0].t >= self.max_wait_s:
            return True
        waiting = {r.client for r in self._queue}
        expected = {c for c, t in self._last_seen.items() if now - t <= ACTIVE_S}
        return expected <= waiting

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
                while not self._closed and not self._queue:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                while not self._closed:
                    now = time.monotonic()
                    if self._ready(now):
                        break
                    self._cond.wait(max(self._queue[0].t + self.max_wait_s - now, 0.0005))
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
        self.batches += 1
        self.images += len(x)
        start = 0
        for req in taken:
            n = len(req.x)
            req.out = (maps[start : start + n], scores[start : start + n])
            start += n
            req.done.set()

    def close(self) -> None:
        """Run what is waiting, then stop the thread (the backend itself is closed by its owner)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


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
