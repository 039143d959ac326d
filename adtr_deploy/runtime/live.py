"""Live sources: a camera or a network stream (RTSP through OpenCV/FFmpeg, HTTP MJPEG parsed in connections.py).

A live source is read in its own thread that keeps only the NEWEST frame: when the consumer is slower than the camera,
older frames are replaced (dropped, and counted), so results stay current instead of lagging further and further
behind. A stream that drops is reopened with exponential backoff, and the gap (start, end, duration, attempts) is
recorded and attached to the first frame after it; every reopen attempt is counted (`reconnects`), so an outage shows.
Opening an HTTP stream (connect, request, headers) and receiving each frame have a total deadline of `timeout_s`: a
server that trickles bytes fails the open or counts as a stall in time, and close() cuts a reopen in progress short.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.connections import CaptureConnection, Connection, Opening, open_url
from adtr_deploy.runtime.frames import Frame, Source
from adtr_deploy.runtime.redaction import redact_url as redact  # the name sources.py and records use

MAX_GAPS = 1000  # outages kept with their details (a months-long run keeps the latest; `outages` counts every one)


class LiveSource(Source):
    """A camera or stream read in its own thread, newest frame only, reconnecting with exponential backoff.

    The first connection happens in `start()`, so a wrong address fails at once with a clear message; after that the
    stream is reopened for as long as the run lasts (the user stops it with Ctrl-C, --max-frames or --duration).
    """

    live = True

    def __init__(
        self, target: int | str, *, timeout_s: float = 5.0, backoff_s: float = 0.5, backoff_max_s: float = 10.0
    ):
        name = f"camera:{target}" if isinstance(target, int) else redact(str(target))
        super().__init__(name)
        self.target = target
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._slot: Frame | None = None
        self._count = 0  # frames received from the stream, dropped ones included
        self._last_frame_time: float | None = None
        self._last_frame_mono: float | None = None
        self._open_gap: dict | None = None
        self._down_since: float | None = None  # time.monotonic() when the current outage began
        self._last_error: str | None = None
        self._conn: Connection | None = None
        self._opening: Opening | None = None
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.reconnects = 0  # attempts to reopen after a drop, the failed ones included
        self.outages = 0
        self.gaps: deque[dict] = deque(maxlen=MAX_GAPS)  # the latest outages; `outages` counts them all

    def _connect(self) -> Connection:
        if isinstance(self.target, int):
            return CaptureConnection(self.target, self.timeout_s)
        self._opening = Opening()
        if self._stop.is_set():
            self._opening.cancelled = True
        return open_url(self.target, self.timeout_s, self._opening)

    def start(self) -> None:
        try:
            self._conn = self._connect()
        except OSError as exc:
            what = f"camera {self.target}" if isinstance(self.target, int) else f"stream {self.name}"
            raise UserError(
                f"cannot open {what} ({exc}); check the address or index and that it is reachable"
            ) from None
        self.fps = getattr(self._conn, "fps", None)
        self._thread = threading.Thread(target=self._loop, name="adtr-live", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        conn, delay = self._conn, self.backoff_s
        while not self._stop.is_set():
            if conn is None:
                with self._cond:
                    self.reconnects += 1  # every attempt counts, the ones that fail too: an outage is visible
                try:
                    conn = self._connect()
                    self._conn = conn
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    self._note_outage(f"reconnect failed: {exc}")
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max_s)
                    continue
            reason = "stream ended"
            try:
                for item in conn.frames():
                    if self._stop.is_set():
                        break
                    self._publish(item)
                    delay = self.backoff_s  # frames flow again: the next outage starts from the short delay
            except Exception as exc:  # socket timeouts, resets, decoder errors: all mean the stream is gone
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()
                conn = self._conn = None
            if self._stop.is_set():
                break
            self._note_outage(reason)
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)

    def _note_outage(self, reason: str) -> None:
        with self._cond:
            if self._open_gap is None:
                start = self._last_frame_time or time.time()
                self._open_gap = {"start": start, "end": None, "duration_s": None, "attempts": 0, "reason": reason}
                self.outages += 1
                self._down_since = time.monotonic()
            self._open_gap["attempts"] += 1
            self._last_error = reason

    def _publish(self, item: bytes | np.ndarray) -> None:
        now = time.time()
        with self._cond:
            index = self._count
            self._count += 1
            self._last_frame_time = now
            self._last_frame_mono = time.monotonic()
            gap = None
            if self._open_gap is not None:
                gap = self._open_gap
                gap["end"] = now
                gap["duration_s"] = round(now - gap["start"], 3)
                self.gaps.append(gap)
                self._open_gap = None
                self._down_since = None
            if self._slot is not None:
                self.dropped += 1  # the consumer never took it: stale now
                gap = gap or self._slot.gap  # keep a gap notice even when its frame is dropped
            frame = Frame(source=self.name, frame=index, key=f"frame_{index:06d}", timestamp=now, gap=gap)
            if isinstance(item, bytes):
                frame.data = item
            else:
                frame.image = item
            self._slot = frame
            self._cond.notify_all()

    def read(self, timeout: float) -> Frame | None:
        with self._cond:
            if self._slot is None and timeout > 0:
                self._cond.wait(timeout)
            frame, self._slot = self._slot, None
        if frame is not None:
            frame.acquired = time.perf_counter()
        return frame

    @property
    def received(self) -> int:
        return self._count

    def close(self) -> None:
        self._stop.set()
        opening = self._opening
        if opening is not None:
            opening.interrupt()  # a reconnect in progress ends now, not at its deadline
        conn = self._conn
        if conn is not None:
            # Only interrupt here: VideoCapture is not thread-safe, so the reader thread releases its own connection
            # once its current read returns (within the read timeout).
            conn.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)

    def stats(self) -> dict:
        """Counters and the source's state now: `up` (no outage in progress), `last_frame_age_s` (since a frame was
        last received, dropped ones included), `outage_start` (unix time the current outage began, else None)."""
        with self._cond:
            gaps = list(self.gaps)
            if self._open_gap is not None:  # still down when the run ended
                gaps.append(
                    {**self._open_gap, "end": None, "duration_s": round(time.time() - self._open_gap["start"], 3)}
                )
            mono = time.monotonic()
            return {
                "dropped": self.dropped,
                "gaps": gaps,
                "reconnects": self.reconnects,
                "outages": self.outages,
                "received": self._count,
                "up": self._open_gap is None,
                "last_frame_age_s": None if self._last_frame_mono is None else round(mono - self._last_frame_mono, 3),
                "outage_start": None if self._open_gap is None else self._open_gap["start"],
                "last_error": self._last_error,
            }
