"""Live sources: a camera or a network stream (RTSP through OpenCV/FFmpeg, HTTP MJPEG parsed here).

A live source is read in its own thread that keeps only the NEWEST frame: when the consumer is slower than the camera,
older frames are replaced (dropped, and counted), so results stay current instead of lagging further and further
behind. A stream that drops is reopened with exponential backoff, and the gap (start, end, duration, attempts) is
recorded and attached to the first frame after it; every reopen attempt is counted (`reconnects`), so an outage shows.
Opening an HTTP stream (connect, request, headers) and receiving each frame have a total deadline of `timeout_s`: a
server that trickles bytes fails the open or counts as a stall in time, and close() cuts a reopen in progress short.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.frames import Frame, Source
from adtr_deploy.runtime.redaction import redact_url as redact  # the name sources.py and records use

MAX_GAPS = 1000  # outages kept with their details (a months-long run keeps the latest; `outages` counts every one)


class _Connection:
    """One open live stream: `frames()` yields encoded bytes or decoded BGR arrays until the stream ends or fails."""

    def frames(self) -> Iterator[bytes | np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        """Called from another thread to stop a blocked read soon; the reader thread still calls close()."""


class _CaptureConnection(_Connection):
    """A camera or FFmpeg-readable stream (RTSP, HTTP video) through cv2.VideoCapture."""

    def __init__(self, target: int | str, timeout_s: float):
        ms = int(timeout_s * 1000)
        if isinstance(target, int):
            self.cap = cv2.VideoCapture(target)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            self.cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        if not self.cap.isOpened():
            self.cap.release()
            raise OSError("OpenCV could not open it")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None

    def frames(self) -> Iterator[np.ndarray]:
        while True:
            ok, img = self.cap.read()
            if not ok:
                return
            yield img

    def close(self) -> None:
        self.cap.release()


class _MjpegConnection(_Connection):
    """An HTTP multipart/x-mixed-replace stream of JPEGs (IP cameras, MJPEG servers), parsed with the stdlib.

    Packets are handed out still encoded, so frames that are dropped as stale are never decoded. Without a
    Content-Length header a part ends at the next boundary, so each frame waits for the next one to begin. Each frame
    must arrive whole within timeout_s, however slowly its bytes trickle in: otherwise the stream counts as dropped."""

    def __init__(self, response, boundary: bytes, sock, reader, timeout_s: float):
        self.response = response
        self.boundary = b"--" + boundary
        self.sock = sock
        self.reader = reader  # a _DeadlineReader: each frame must arrive whole within timeout_s (a trickle is a stall)
        self.timeout_s = timeout_s
        self.fps = None

    def frames(self) -> Iterator[bytes]:
        fp = self.response
        pending: bytes | None = None
        while True:
            self.reader.deadline = time.monotonic() + self.timeout_s
            line = pending if pending is not None else fp.readline()
            pending = None
            if not line:
                return
            if not line.strip().startswith(self.boundary):
                continue
            if line.strip() == self.boundary + b"--":
                return  # the closing boundary: the server ended the stream
            headers = {}
            while True:
                h = fp.readline()
                if not h:
                    return
                h = h.strip()
                if not h:
                    break
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            length = headers.get(b"content-length")
            if length and length.isdigit():
                body = fp.read(int(length))
                if len(body) < int(length):
                    return  # cut off mid-frame
            else:  # no length: the body runs until the next boundary line
                chunks = []
                while True:
                    part = fp.readline()
                    if not part:
                        return
                    if part.strip().startswith(self.boundary):
                        pending = part
                        break
                    chunks.append(part)
                body = b"".join(chunks).rstrip(b"\r\n")
            if body:
                yield body

    def interrupt(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv(); close() alone does not
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        self.interrupt()
        self.response.close()


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes with a deadline on a whole read, not on each recv: a server that trickles one byte at a time
    cannot keep a read (the status line and headers, one frame) going past `deadline` (time.monotonic())."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("nothing complete arrived within the deadline")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _SocketShim:
    """What http.client.HTTPResponse needs from a socket: makefile() handing out our deadline-bound reader."""

    def __init__(self, fp):
        self.fp = fp

    def makefile(self, mode: str):
        return self.fp


class _Opening:
    """The connection being opened, so that close() on another thread can cut a slow open short."""

    def __init__(self):
        self.sock: socket.socket | None = None
        self.cancelled = False

    def interrupt(self) -> None:
        self.cancelled = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _open_url(url: str, timeout_s: float, opening: _Opening | None = None) -> _Connection:
    """HTTP(S): parse MJPEG ourselves (a total deadline on the open and on every frame, prompt shutdown); anything else
    goes to OpenCV/FFmpeg. Connecting, sending the request and receiving the answer's headers share one deadline of
    timeout_s, so a server that trickles its answer fails the open in time instead of holding it for minutes."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return _CaptureConnection(url, timeout_s)
    opening = opening or _Opening()
    deadline = time.monotonic() + timeout_s
    host, tls = parts.hostname or "", parts.scheme.lower() == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}", "User-Agent: adtr-run", "Accept: */*"]
    if parts.username is not None:  # IP cameras often take user:password@host
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        head.append("Authorization: Basic " + base64.b64encode(token.encode()).decode())
    request = ("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode()

    def left() -> float:
        remaining = deadline - time.monotonic()
        if opening.cancelled:
            raise OSError("the run is ending")
        if remaining <= 0:
            raise TimeoutError(f"no complete answer within {timeout_s:g} s")
        return remaining

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = opening.sock = socket.socket(family, kind, proto)
        sock.settimeout(left())
        sock.connect(address)
        if tls:
            sock.settimeout(left())
            sock = opening.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        sock.settimeout(left())
        sock.sendall(request)
        reader = _DeadlineReader(sock)
        reader.deadline = deadline
        response = http.client.HTTPResponse(_SocketShim(io.BufferedReader(reader)), method="GET")
        response.begin()
        left()  # close() may have cut the answer short
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if sock is not None:
            sock.close()
        if opening.cancelled:
            raise OSError("the run is ending") from None
        if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
            raise OSError(f"no complete answer within {timeout_s:g} s (--timeout)") from None
        raise OSError(str(exc) or type(exc).__name__) from None
    if response.status != 200:
        sock.close()
        raise OSError(f"HTTP {response.status} {response.reason}")
    ctype = response.getheader("Content-Type", "")
    m = re.search(r"multipart/x-mixed-replace.*boundary=\"?([^\";]+)\"?", ctype, re.IGNORECASE)
    if m:
        boundary = m.group(1).strip()
        boundary = boundary[2:] if boundary.startswith("--") else boundary
        return _MjpegConnection(response, boundary.encode(), sock, reader, timeout_s)
    sock.close()
    return _CaptureConnection(url, max(deadline - time.monotonic(), 0.5))  # HTTP video (MP4, HLS, ...) for FFmpeg


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
        self._conn: _Connection | None = None
        self._opening: _Opening | None = None
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.reconnects = 0  # attempts to reopen after a drop, the failed ones included
        self.outages = 0
        self.gaps: deque[dict] = deque(maxlen=MAX_GAPS)  # the latest outages; `outages` counts them all

    def _connect(self) -> _Connection:
        if isinstance(self.target, int):
            return _CaptureConnection(self.target, self.timeout_s)
        self._opening = _Opening()
        if self._stop.is_set():
            self._opening.cancelled = True
        return _open_url(self.target, self.timeout_s, self._opening)

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
