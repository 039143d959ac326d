"""The HTTP side of `adtr-run --serve`: the stdlib's threading HTTP server, bounded, with a handful of routes.

The stdlib server is enough here (a few viewers on a factory network, all data in memory) and adds no dependency. It is
bounded: at most MAX_CONNECTIONS connections are served at once (more get 503 at once), idle keep-alive connections
close after IDLE_TIMEOUT_S, and at most MAX_STREAMS MJPEG streams run at once.

Routes: GET / (the page), /static/*, /api/status, /frame.jpg, /gallery/ID.jpg, /stream.mjpg, /metrics, /healthz;
POST /api/pause and /api/resume (control: header X-ADTR-Token, checked when a token is set).
"""

from __future__ import annotations

import hmac
import http.server
import json
import math
import socket
import sys
import threading
import time
import urllib.parse
from importlib import resources

from adtr_deploy.errors import UserError

MAX_CONNECTIONS = 64
MAX_STREAMS = 16
IDLE_TIMEOUT_S = 30
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
# Everything the page needs comes from this server; nothing inline, nothing from elsewhere.
CSP = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
TOKEN_HEADER = "X-ADTR-Token"


def _static_files() -> dict[str, bytes]:
    """The page's files, shipped as package data, read once."""
    root = resources.files("adtr_deploy.runtime.serve") / "static"
    return {f"/static/{p.name}": p.read_bytes() for p in root.iterdir() if p.suffix in STATIC_TYPES}


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, but never more than MAX_CONNECTIONS of them: memory stays bounded whatever comes."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, handler, service):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.service = service
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        # A viewer that goes away mid-answer is normal; anything else is one line, never a traceback on the terminal.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.service.log(f"the live view could not answer {client_address[0]}: {type(exc).__name__}: {exc}")

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a polling page reuses its connection
    timeout = IDLE_TIMEOUT_S
    server_version = "adtr-run"
    sys_version = ""
    static: dict[str, bytes] = {}

    def log_message(self, *args):  # no access log on the terminal: the progress line lives there
        pass

    @property
    def service(self):
        return self.server.service

    def handle_one_request(self) -> None:
        cpu0 = time.thread_time()  # CPU only: a stream waiting for its next frame costs nothing here
        try:
            super().handle_one_request()
        finally:
            state = self.server.service.state
            if state is not None:
                state.add_http_cpu(time.thread_time() - cpu0)

    # -- responses ---------------------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, cache: bool = False, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data: dict) -> None:
        try:
            body = json.dumps(data, allow_nan=False, default=str)
        except ValueError:  # a model that produced NaN: JSON has no NaN, the page gets null
            body = json.dumps(_finite(data), default=str)
        self._send(code, body.encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": message})

    # -- routes ------------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        path, state = url.path, self.service.state
        if path in ("/", "/index.html"):
            self._send(200, self.static["/static/index.html"], STATIC_TYPES[".html"])
        elif path in self.static:
            self._send(200, self.static[path], STATIC_TYPES["." + path.rsplit(".", 1)[-1]], cache=True)
        elif path == "/api/status":
            if query.get("view"):
                state.watched()
            self._json(200, self.service.status(since=_int(query.get("since"), 0)))
        elif path == "/frame.jpg":
            state.watched()
            with state.cond:
                jpeg, seq, info = state.frame_jpeg, state.frame_seq, state.frame_info
            if jpeg is None:
                self._send(204, b"", "image/jpeg")
            else:  # the record this very picture belongs to, so the page's caption always matches it
                about = urllib.parse.quote(json.dumps(info, default=str))
                self._send(200, jpeg, "image/jpeg", extra={"X-Frame-Seq": str(seq), "X-Frame-Info": about})
        elif path.startswith("/gallery/") and path.endswith(".jpg"):
            jpeg = state.thumbnail(_int([path[len("/gallery/") : -4]], -1))
            if jpeg is None:
                self._error(404, "no such gallery image (it has left the gallery)")
            else:
                self._send(200, jpeg, "image/jpeg", cache=True)
        elif path == "/stream.mjpg":
            if self.command == "HEAD":
                self._send(200, b"", "multipart/x-mixed-replace; boundary=frame")
            else:
                self._stream()
        elif path == "/metrics":
            body, ctype = self.service.metrics()
            self._send(200, body, ctype)
        elif path == "/healthz":
            health = self.service.health()
            self._json(200 if health["ok"] else 503, health)
        else:
            self._error(404, f"no such page: {url.path}")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        length = _int([self.headers.get("Content-Length", "0")], 0)
        if 0 < length <= 65536:
            self.rfile.read(length)  # control requests carry no body; read what came so keep-alive stays in step
        if path not in ("/api/pause", "/api/resume"):
            self._error(404, f"no such action: {path}")
            return
        given = self.headers.get(TOKEN_HEADER)
        if given is None:
            # A custom header cannot be sent by a plain HTML form of another site: this also stops cross-site posts.
            self._error(403, f"control requests need the {TOKEN_HEADER} header (empty when the server has no token)")
            return
        token = self.service.token
        if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
            self._error(403, "wrong or missing token; pass the --serve-token value in the X-ADTR-Token header")
            return
        self.service.set_paused(path == "/api/pause")
        self._json(200, {"state": self.service.state.state})

    def _stream(self) -> None:
        service, state = self.service, self.service.state
        if not service.stream_slots.acquire(blocking=False):
            self._error(503, f"too many live streams (at most {MAX_STREAMS}); poll /frame.jpg instead")
            return
        service.stream_opened(+1)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            seq = 0
            while not service.closing:
                state.watched()
                new_seq, jpeg = state.wait_frame(seq, timeout=1.0)
                if new_seq == seq or jpeg is None:
                    if state.state == "finished" and jpeg is not None and seq:
                        break
                    continue
                seq = new_seq
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                self.wfile.write(head + jpeg + b"\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            service.stream_opened(-1)
            service.stream_slots.release()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _int(values: list[str] | None, default: int) -> int:
    try:
        return int(values[0]) if values else default
    except (TypeError, ValueError):
        return default


def make_server(host: str, port: int, service) -> BoundedHTTPServer:
    """Bind (errors now, before the model loads: a busy port is a clear sentence, not a late traceback)."""
    Handler.static = _static_files()
    try:
        return BoundedHTTPServer((host, port), Handler, service)
    except OSError as exc:
        raise UserError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --serve HOST:PORT"
        ) from None
