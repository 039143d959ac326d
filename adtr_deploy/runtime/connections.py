"""Live stream connections for LiveSource (live.py): a camera or FFmpeg-readable stream through OpenCV, and HTTP MJPEG
parsed here with the standard library, so its deadlines hold: opening (connect, request, headers) and each frame must
complete within timeout_s, however slowly a server trickles bytes, and another thread can cut an open short.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator

import cv2
import numpy as np


class Connection:
    """One open live stream: `frames()` yields encoded bytes or decoded BGR arrays until the stream ends or fails."""

    def frames(self) -> Iterator[bytes | np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        """Called from another thread to stop a blocked read soon; the reader thread still calls close()."""


class CaptureConnection(Connection):
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


class MjpegConnection(Connection):
    """An HTTP multipart/x-mixed-replace stream of JPEGs (IP cameras, MJPEG servers), parsed with the stdlib.

    Packets are handed out still encoded, so frames that are dropped as stale are never decoded. Without a
    Content-Length header a part ends at the next boundary, so each frame waits for the next one to begin. Each frame
    must arrive whole within timeout_s, however slowly its bytes trickle in: otherwise the stream counts as dropped."""

    def __init__(self, response, boundary: bytes, sock, reader, timeout_s: float):
        self.response = response
        self.boundary = b"--" + boundary
        self.sock = sock
        self.reader = reader  # a DeadlineReader: each frame must arrive whole within timeout_s (a trickle is a stall)
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


class DeadlineReader(io.RawIOBase):
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


class Opening:
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


def open_url(url: str, timeout_s: float, opening: Opening | None = None) -> Connection:
    """HTTP(S): parse MJPEG ourselves (a total deadline on the open and on every frame, prompt shutdown); anything else
    goes to OpenCV/FFmpeg. Connecting, sending the request and receiving the answer's headers share one deadline of
    timeout_s, so a server that trickles its answer fails the open in time instead of holding it for minutes."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return CaptureConnection(url, timeout_s)
    opening = opening or Opening()
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
        reader = DeadlineReader(sock)
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
        return MjpegConnection(response, boundary.encode(), sock, reader, timeout_s)
    sock.close()
    return CaptureConnection(url, max(deadline - time.monotonic(), 0.5))  # HTTP video (MP4, HLS, ...) for FFmpeg
