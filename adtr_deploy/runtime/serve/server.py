"""The HTTP side of `adtr-run --serve`: one event-loop thread owns every socket; small pools compute the answers.

A thread per connection (the stdlib's ThreadingHTTPServer, used before) let held connections -- MJPEG viewers, a
retrying dashboard, clients that send their headers slowly -- take every slot, and /healthz then answered 503 to a
watchdog that restarted a healthy service. Here, as in the event-driven servers (nginx and the like), a waiting client
costs a socket and a few bytes, never a thread, and each kind of work has a budget of its own:

- Accepting and reading: one selector loop that never blocks. A request (headers and body) must arrive whole within
  HEADER_DEADLINE_S of its connection, or of its first byte on a kept-alive connection, else the socket is closed; an
  idle keep-alive connection closes after KEEPALIVE_IDLE_S.
- Sockets: MAX_CONNECTIONS in all, MAX_PER_CLIENT per client address. At a cap the oldest socket that is only waiting
  for its request (that client's, or anyone's at the global cap) is closed to make room; a newcomer is refused (503)
  only when no socket is waiting.
- /healthz and /readyz are answered by the loop itself, from memory: never queued behind anything.
- /metrics has its own worker; everything else a small pool whose queue is bounded (503 when full).
- MJPEG: at most MAX_STREAMS viewers, MAX_STREAMS_PER_CLIENT per address, all fed by the loop from the one shared JPEG
  (encoded once by the render thread, state.py): 200 viewers are 200 sockets, not 200 threads. A viewer that cannot
  keep up skips frames.
- Answers are written by the loop without blocking: a client that does not read its answer within WRITE_DEADLINE_S
  (STREAM_STALL_S for a viewer) is closed.

TLS (--tls-cert/--tls-key) is the standard library's ssl; the handshake counts against the request deadline.

Routes: GET / (the page), /static/*, /api/status, /frame.jpg, /gallery/ID.jpg, /stream.mjpg, /metrics, /healthz,
/readyz; POST /api/pause, /api/resume and /api/recalibrate. Control (POST) checks Host and Origin, then the token (header X-ADTR-Token,
which a plain cross-site form cannot send). With auth "all", every route but /healthz and /readyz needs the token
(X-ADTR-Token, `Authorization: Bearer TOKEN`, or HTTP Basic with the token as password, so a browser asks for it).
"""

from __future__ import annotations

import base64
import binascii
import email.message
import hmac
import http.client
import io
import json
import math
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources

from adtr_deploy.errors import UserError

HEADER_DEADLINE_S = 5.0  # a whole request (TLS handshake, headers, body) must arrive within this
KEEPALIVE_IDLE_S = 5.0  # an idle kept-alive connection closes after this (the page polls every 0.5 s)
WRITE_DEADLINE_S = 10.0  # a client must take its answer within this
STREAM_STALL_S = 30.0  # a viewer that takes nothing for this long is closed
MAX_CONNECTIONS = 512
MAX_PER_CLIENT = 128
MAX_STREAMS = 256
MAX_STREAMS_PER_CLIENT = 64
WORKERS = 4  # threads answering /api/status, frames, the page, control
WORK_QUEUE = 64  # requests waiting for those threads at most; more get 503 at once
METRICS_QUEUE = 8
MAX_HEADER_BYTES = 16384
MAX_BODY_BYTES = 65536
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
# Everything the page needs comes from this server; nothing inline, nothing from elsewhere.
CSP = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
TOKEN_HEADER = "X-ADTR-Token"
PROBES = ("/healthz", "/readyz")
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
WAITING = ("handshake", "read")  # phases in which a socket holds nothing but itself: evicted first


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: email.message.Message
    body: bytes
    client: str
    tls: bool


@dataclass
class Response:
    code: int
    body: bytes = b""
    ctype: str = "application/json"
    headers: dict = field(default_factory=dict)
    cache: bool = False
    close: bool = False


def json_response(code: int, data: dict, **kw) -> Response:
    try:
        body = json.dumps(data, allow_nan=False, default=str)
    except ValueError:  # a model that produced NaN: JSON has no NaN, the page gets null
        body = json.dumps(_finite(data), allow_nan=False, default=str)
    return Response(code, body.encode(), "application/json", **kw)


def error(code: int, message: str, **kw) -> Response:
    return json_response(code, {"error": message}, **kw)


def _static_files() -> dict[str, bytes]:
    """The page's files, shipped as package data, read once."""
    root = resources.files("adtr_deploy.runtime.serve") / "static"
    return {f"/static/{p.name}": p.read_bytes() for p in root.iterdir() if p.suffix in STATIC_TYPES}


class Routes:
    """What each route answers, and who may ask; no sockets here (the loop below does the I/O)."""

    def __init__(self, service):
        self.service = service
        self.static = _static_files()

    # -- who may ask -------------------------------------------------------------------------------------------------
    def token_ok(self, req: Request) -> bool:
        token = self.service.token
        if token is None:
            return True
        given = [req.headers.get(TOKEN_HEADER, "")]
        scheme, _, value = req.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        elif scheme.lower() == "basic":  # a browser's own prompt: any user name, the token as password
            try:
                given.append(base64.b64decode(value.strip(), validate=True).decode().partition(":")[2])
            except (binascii.Error, UnicodeDecodeError):
                pass
        return any(hmac.compare_digest(g.encode(), token.encode()) for g in given if g)

    def read_denied(self, req: Request) -> Response | None:
        """With --serve-auth all, reading needs the token too (health probes excepted: they show no names)."""
        if self.service.auth != "all" or req.path in PROBES or self.token_ok(req):
            return None
        return error(
            401,
            f"this server needs its token to be read: send it in the {TOKEN_HEADER} header, as "
            "'Authorization: Bearer TOKEN', or as the password when the browser asks",
            headers={"WWW-Authenticate": 'Basic realm="adtr-run", charset="UTF-8"'},
        )

    def write_denied(self, req: Request) -> Response | None:
        """Control requests: a Host this server is not known by (DNS rebinding) or another site's Origin is refused
        first, whatever the token; then the X-ADTR-Token header must be there, and right when a token is set."""
        host = req.headers.get("Host", "")
        if not self.service.host_allowed(host):
            return error(403, f"refused: Host {host!r} is not a name this server is known by (see --serve-host)")
        origin = req.headers.get("Origin")
        if origin is not None and not _same_origin(origin, host):
            return error(403, f"refused: a page from {origin!r} may not control this server")
        if req.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return error(403, "refused: a cross-site request may not control this server")
        if req.headers.get(TOKEN_HEADER) is None:
            # A custom header cannot be sent by a plain HTML form of another site: this also stops cross-site posts.
            return error(
                403, f"control requests need the {TOKEN_HEADER} header (any value when the server has no token)"
            )
        if not self.token_ok(req):
            return error(403, "wrong or missing token; pass the --serve-token value in the X-ADTR-Token header")
        return None

    # -- answers ---------------------------------------------------------------------------------------------------
    def probe(self, req: Request) -> Response:
        """/healthz: the process lives and answers. /readyz: inspecting now (source up, frames flowing, model loaded)."""
        if req.path == "/healthz":
            return json_response(200, self.service.health())
        ready = self.service.ready()
        return json_response(200 if ready["ready"] else 503, ready)

    def handle(self, req: Request) -> Response:
        denied = self.read_denied(req)
        if denied is not None:
            return denied
        if req.method == "POST":
            return self.post(req)
        path, service, state = req.path, self.service, self.service.state
        if path in ("/", "/index.html"):
            return Response(200, self.static["/static/index.html"], STATIC_TYPES[".html"])
        if path in self.static:
            return Response(200, self.static[path], STATIC_TYPES["." + path.rsplit(".", 1)[-1]], cache=True)
        if path == "/api/status":
            if req.query.get("view"):
                state.watched()
            return json_response(200, service.status(since=_int(req.query.get("since"), 0)))
        if path == "/frame.jpg":
            state.watched()
            with state.cond:
                jpeg, seq, info = state.frame_jpeg, state.frame_seq, state.frame_info
            if jpeg is None:
                return Response(204, b"", "image/jpeg")
            # the record this very picture belongs to, so the page's caption always matches it
            about = urllib.parse.quote(json.dumps(info, default=str))
            return Response(200, jpeg, "image/jpeg", headers={"X-Frame-Seq": str(seq), "X-Frame-Info": about})
        if path.startswith("/gallery/") and path.endswith(".jpg"):
            jpeg = state.thumbnail(_int([path[len("/gallery/") : -4]], -1))
            if jpeg is None:
                return error(404, "no such gallery image (it has left the gallery)")
            return Response(200, jpeg, "image/jpeg", cache=True)
        if path == "/stream.mjpg":  # HEAD only: a GET is turned into a stream by the loop
            return Response(200, b"", "multipart/x-mixed-replace; boundary=frame")
        if path == "/metrics":
            body, ctype = service.metrics()
            return Response(200, body, ctype)
        return error(404, f"no such page: {path}")

    def post(self, req: Request) -> Response:
        if req.path not in ("/api/pause", "/api/resume", "/api/recalibrate"):
            return error(404, f"no such action: {req.path}")
        denied = self.write_denied(req)
        if denied is not None:
            return denied
        if req.path == "/api/recalibrate":
            return self.recalibrate(req)
        self.service.set_paused(req.path == "/api/pause")
        return json_response(200, {"state": self.service.state.state})

    def recalibrate(self, req: Request) -> Response:
        """The operator confirms the last frames were good parts: recalibrate on them (adtr_deploy.runtime.recalibrate).
        Body (optional): {"frames": N, "by": NAME, "allow_flagged": false}. A refusal (too few frames, flagged parts,
        another model) is a 409 with its sentence."""
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(400, 'the body is not a JSON object; send e.g. {"frames": 100, "by": "operator name"} or none')
        try:
            return json_response(200, self.service.recalibrate(body))
        except UserError as exc:
            return error(409, str(exc))


class _Conn:
    """One client socket, owned by the loop thread."""

    __slots__ = (
        "sock", "ip", "tls", "phase", "inbuf", "out", "deadline", "since", "keep", "seq", "closed", "events", "served"
    )  # fmt: skip

    def __init__(self, sock, ip: str, tls: bool, now: float):
        self.sock = sock
        self.ip = ip
        self.tls = tls
        self.phase = "handshake" if tls else "read"
        self.inbuf = bytearray()
        self.out: deque[memoryview] = deque()
        self.deadline = now + HEADER_DEADLINE_S
        self.since = now  # when it began to wait (eviction takes the oldest waiting socket first)
        self.keep = True
        self.seq = 0  # streams: the frame last queued
        self.closed = False
        self.events = 0
        self.served = 0  # answers written (a fresh connection's deadline runs from its accept, not its first byte)


class HttpServer:
    """The loop: accept, read, parse, answer probes, hand the rest to the pools, write, feed the MJPEG viewers."""

    def __init__(self, host: str, port: int, service, ssl_context: ssl.SSLContext | None = None):
        self.service = service
        self.routes = Routes(service)
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=1024)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: set[_Conn] = set()
        self.per_client: Counter[str] = Counter()
        self.streams: set[_Conn] = set()
        self.streams_per_client: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # refused, evicted, request_timeout, write_timeout, busy, bad_request
        self._done: deque[tuple[_Conn, Request, Response]] = deque()  # answers from the pools
        self._lock = threading.Lock()
        self._queued = Counter()  # requests waiting for or in each pool
        self._pools = {
            "work": (ThreadPoolExecutor(WORKERS, "adtr-serve-work"), WORK_QUEUE + WORKERS),
            "metrics": (ThreadPoolExecutor(1, "adtr-serve-metrics"), METRICS_QUEUE + 1),
        }
        self._running = False
        self._stopped = threading.Event()
        self._frame_seq_fed = 0
        self._watched_at = 0.0
        self._logged_at = -math.inf
        self._raise_fd_limit()

    @staticmethod
    def _raise_fd_limit() -> None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = MAX_CONNECTIONS + 512  # sockets, plus what the run itself opens
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ImportError, ValueError, OSError):
            pass  # not on this platform, or not allowed: the caps still hold, accept() errors are handled

    # -- thread-safe entry points ----------------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake

    def stats(self) -> dict:
        return {"connections": len(self.conns), "streams": len(self.streams), "rejected": dict(self.rejected)}

    def serve_forever(self) -> None:
        self._running = True
        cpu_mark, next_expiry = time.thread_time(), 0.0
        try:
            while self._running:
                for key, mask in self.selector.select(timeout=0.1):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    else:
                        conn = key.data
                        try:
                            if mask & selectors.EVENT_READ and not conn.closed:
                                self._on_read(conn)
                            if mask & selectors.EVENT_WRITE and not conn.closed:
                                self._flush(conn)
                        except Exception as exc:  # noqa: BLE001 -- one connection's bug must not stop health
                            self._bug(exc)
                            self._close(conn)
                try:
                    self._take_answers()
                    self._feed_streams()
                    now = time.monotonic()
                    if now >= next_expiry:
                        next_expiry = now + 0.1
                        self._expire(now)
                        state = self.service.state
                        if state is not None:
                            cpu = time.thread_time()
                            state.add_http_cpu(cpu - cpu_mark)
                            cpu_mark = cpu
                except Exception as exc:  # noqa: BLE001 -- the loop is what answers /healthz: it keeps going
                    self._bug(exc)
        finally:
            self._stopped.set()

    def _bug(self, exc: Exception) -> None:
        """A bug in the loop: one line in the log a minute at most, and the loop goes on."""
        now = time.monotonic()
        if now - self._logged_at >= 60:
            self._logged_at = now
            self.service.log(f"the live view hit an error and goes on: {type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        """Stop the loop (from another thread) and wait for it."""
        self._running = False
        self.wake()
        self._stopped.wait(5)

    def server_close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        for pool, _ in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for s in (self.listener, self._wake_r, self._wake_w):
            try:
                self.selector.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        self.selector.close()

    # -- accept ----------------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):  # a burst of connections cannot starve the sockets already here
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: make room and try again on the next round
                self._evict(lambda c: True)
                self._bug(exc)
                return
            ip = address[0]
            if not self._admit(ip):
                self.rejected["refused"] += 1
                try:
                    sock.setblocking(False)
                    sock.send(BUSY)
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = _Conn(sock, ip, self.ssl_context is not None, time.monotonic())
            self.conns.add(conn)
            self.per_client[ip] += 1
            self._watch(conn, selectors.EVENT_READ)

    def _admit(self, ip: str) -> bool:
        if self.per_client[ip] >= MAX_PER_CLIENT and not self._evict(lambda c: c.ip == ip):
            return False
        return len(self.conns) < MAX_CONNECTIONS or self._evict(lambda c: True)

    def _evict(self, which) -> bool:
        """Close the oldest socket that only waits for its request (or sits idle) and matches `which`."""
        waiting = [c for c in self.conns if c.phase in WAITING and which(c)]
        if not waiting:
            return False
        self._close(min(waiting, key=lambda c: c.since))
        self.rejected["evicted"] += 1
        return True

    # -- read and parse --------------------------------------------------------------------------------------------
    def _on_read(self, conn: _Conn) -> None:
        if conn.phase == "handshake":
            self._handshake(conn)
            return
        try:
            for _ in range(16):  # bounded: other sockets get their turn
                data = conn.sock.recv(65536)
                if not data:
                    self._close(conn)
                    return
                if conn.phase == "stream":
                    continue  # a viewer has nothing to say: read and forget (it may only be closing)
                if not conn.inbuf and conn.served:  # a kept-alive connection's next request: its own deadline
                    conn.deadline = time.monotonic() + HEADER_DEADLINE_S
                conn.inbuf += data
                if len(conn.inbuf) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                    break
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:
            self._close(conn)
            return
        if conn.phase == "read":
            self._parse(conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError):
            self.rejected["bad_request"] += 1
            self._close(conn)
            return
        conn.phase = "read"
        self._watch(conn, selectors.EVENT_READ)
        self._on_read(conn)  # the request may already be waiting in the TLS buffers

    def _parse(self, conn: _Conn) -> None:
        buf = conn.inbuf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                self._fail(conn, 431, "request headers too large")
            return
        lines = bytes(buf[:end]).split(b"\r\n", 1)
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
            headers = http.client.parse_headers(io.BytesIO(lines[1] + b"\r\n\r\n" if len(lines) > 1 else b"\r\n"))
        except (ValueError, UnicodeDecodeError, http.client.HTTPException):
            self._fail(conn, 400, "malformed request")
            return
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self._fail(conn, 505, "HTTP/1.0 or HTTP/1.1 only")
            return
        if headers.get("Transfer-Encoding") is not None:
            self._fail(conn, 501, "chunked request bodies are not accepted; send Content-Length")
            return
        length = _int([headers.get("Content-Length", "0")], -1)
        if not 0 <= length <= MAX_BODY_BYTES:
            self._fail(conn, 413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
            return
        if len(buf) < end + 4 + length:
            return  # the body is still coming (within the same deadline)
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        connection = (headers.get("Connection") or "").lower()
        conn.keep = version == "HTTP/1.1" and "close" not in connection
        url = urllib.parse.urlsplit(target)
        req = Request(method, url.path, urllib.parse.parse_qs(url.query), headers, body, conn.ip, conn.tls)
        self._dispatch(conn, req)

    def _fail(self, conn: _Conn, code: int, message: str) -> None:
        self.rejected["bad_request"] += 1
        conn.keep = False
        req = Request("GET", "", {}, email.message.Message(), b"", conn.ip, conn.tls)
        self._respond(conn, req, error(code, message, close=True))

    # -- dispatch --------------------------------------------------------------------------------------------------
    def _dispatch(self, conn: _Conn, req: Request) -> None:
        conn.phase = "busy"
        self._watch(conn, 0)
        if req.method not in ("GET", "HEAD", "POST"):
            self._respond(
                conn, req, error(405, f"{req.method} is not served here", headers={"Allow": "GET, HEAD, POST"})
            )
        elif req.path in PROBES and req.method != "POST":
            self._respond(conn, req, self.routes.probe(req))  # from memory, on this thread: never queued
        elif req.path == "/stream.mjpg" and req.method == "GET":
            self._start_stream(conn, req)
        else:
            self._submit(conn, req, "metrics" if req.path == "/metrics" else "work")

    def _submit(self, conn: _Conn, req: Request, pool_name: str) -> None:
        pool, limit = self._pools[pool_name]
        with self._lock:
            full = self._queued[pool_name] >= limit
            if not full:
                self._queued[pool_name] += 1
        if full:
            self.rejected["busy"] += 1
            self._respond(
                conn, req, error(503, "busy: too many requests at once; try again", headers={"Retry-After": "1"})
            )
            return
        try:
            pool.submit(self._work, conn, req, pool_name)
        except RuntimeError:  # shutting down
            self._close(conn)

    def _work(self, conn: _Conn, req: Request, pool_name: str) -> None:
        cpu0 = time.thread_time()
        try:
            resp = self.routes.handle(req)
        except Exception as exc:  # noqa: BLE001 -- one bad answer must not take the server down
            self.service.log(f"the live view could not answer {req.path}: {type(exc).__name__}: {exc}")
            resp = error(500, "internal error; see the run's log")
        with self._lock:
            self._queued[pool_name] -= 1
            self._done.append((conn, req, resp))
        self.wake()
        state = self.service.state
        if state is not None:
            state.add_http_cpu(time.thread_time() - cpu0)

    def _take_answers(self) -> None:
        while True:
            with self._lock:
                if not self._done:
                    return
                conn, req, resp = self._done.popleft()
            if not conn.closed:
                self._respond(conn, req, resp)

    # -- write -----------------------------------------------------------------------------------------------------
    def _respond(self, conn: _Conn, req: Request, resp: Response) -> None:
        keep = conn.keep and not resp.close
        try:
            reason = HTTPStatus(resp.code).phrase
        except ValueError:
            reason = ""
        head = [
            f"HTTP/1.1 {resp.code} {reason}",
            f"Content-Type: {resp.ctype}",
            f"Content-Length: {len(resp.body)}",
            f"Cache-Control: {'max-age=300' if resp.cache else 'no-store'}",
            "X-Content-Type-Options: nosniff",
            f"Content-Security-Policy: {CSP}",
            "Referrer-Policy: no-referrer",
            "Server: adtr-run",
            f"Connection: {'keep-alive' if keep else 'close'}",
            *(f"{k}: {v}" for k, v in resp.headers.items()),
        ]
        conn.out.append(memoryview(("\r\n".join(head) + "\r\n\r\n").encode("latin-1")))
        if req.method != "HEAD" and resp.body:
            conn.out.append(memoryview(resp.body))
        conn.keep = keep
        conn.phase = "write"
        conn.deadline = time.monotonic() + WRITE_DEADLINE_S
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.phase == "handshake":
            self._handshake(conn)
            return
        while conn.out:
            chunk = conn.out[0]
            try:
                sent = conn.sock.send(chunk)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError:
                self._close(conn)
                return
            if sent < len(chunk):
                conn.out[0] = chunk[sent:]
            else:
                conn.out.popleft()
        now = time.monotonic()
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
        elif conn.phase == "write":
            conn.served += 1
            if not conn.keep:
                self._close(conn)
                return
            conn.phase, conn.since, conn.deadline = "read", now, now + KEEPALIVE_IDLE_S
            self._watch(conn, selectors.EVENT_READ)
            if conn.inbuf:  # a pipelined request is already here
                conn.deadline = now + HEADER_DEADLINE_S
                self._parse(conn)
        elif conn.phase == "stream":
            conn.deadline = math.inf
            self._watch(conn, selectors.EVENT_READ)  # readable: the viewer closed (or sent something to ignore)
            self._feed(conn)

    # -- MJPEG -----------------------------------------------------------------------------------------------------
    def _start_stream(self, conn: _Conn, req: Request) -> None:
        denied = self.routes.read_denied(req)
        if denied is not None:
            self._respond(conn, req, denied)
            return
        if len(self.streams) >= MAX_STREAMS or self.streams_per_client[conn.ip] >= MAX_STREAMS_PER_CLIENT:
            self.rejected["busy"] += 1
            cap = f"at most {MAX_STREAMS} in all and {MAX_STREAMS_PER_CLIENT} per client"
            self._respond(conn, req, error(503, f"too many live streams ({cap}); poll /frame.jpg instead", close=True))
            return
        conn.phase = "stream"
        conn.keep = False
        self.streams.add(conn)
        self.streams_per_client[conn.ip] += 1
        self.service.streams = len(self.streams)
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\nCache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\nServer: adtr-run\r\nConnection: close\r\n\r\n"
        )
        conn.out.append(memoryview(head.encode()))
        conn.deadline = time.monotonic() + STREAM_STALL_S
        self.service.state.watched()
        self._flush(conn)  # then _feed: the current frame comes at once

    def _feed(self, conn: _Conn) -> None:
        """Queue the newest frame for a viewer whose last one is out (a slow viewer skips frames, never queues them)."""
        state = self.service.state
        seq, jpeg = state.frame_seq, state.frame_jpeg  # read together enough: a newer pair is fed on the next wake
        if conn.out or jpeg is None or seq <= conn.seq:
            return
        conn.seq = seq
        conn.out.append(memoryview(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)))
        conn.out.append(memoryview(jpeg))
        conn.out.append(memoryview(b"\r\n"))
        conn.deadline = time.monotonic() + STREAM_STALL_S
        self._flush(conn)

    def _feed_streams(self) -> None:
        if not self.streams:
            return
        state = self.service.state
        now = time.monotonic()
        if now - self._watched_at >= 1.0:  # viewers keep the render thread drawing
            self._watched_at = now
            state.watched()
        if state.frame_seq != self._frame_seq_fed:
            self._frame_seq_fed = state.frame_seq
            for conn in list(self.streams):
                if not conn.closed and not conn.out:
                    self._feed(conn)

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def _watch(self, conn: _Conn, events: int) -> None:
        if conn.closed or events == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns if c.deadline < now and c.phase != "busy"]:
            if conn.phase in WAITING:
                if conn.inbuf or not conn.served:  # an idle kept-alive connection closing is no rejection
                    self.rejected["request_timeout"] += 1
            else:
                self.rejected["write_timeout"] += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        self._watch(conn, 0)
        conn.closed = True
        try:
            conn.sock.close()
        except OSError:
            pass
        conn.out.clear()
        self.conns.discard(conn)
        self.per_client[conn.ip] -= 1
        if self.per_client[conn.ip] <= 0:
            del self.per_client[conn.ip]
        if conn in self.streams:
            self.streams.discard(conn)
            self.streams_per_client[conn.ip] -= 1
            if self.streams_per_client[conn.ip] <= 0:
                del self.streams_per_client[conn.ip]
            self.service.streams = len(self.streams)


def _same_origin(origin: str, host: str) -> bool:
    """Origin (scheme://host[:port]) names the same host and port as the Host header."""
    try:
        o = urllib.parse.urlsplit(origin)
        h = urllib.parse.urlsplit("//" + host)
        default = {"http": 80, "https": 443}.get(o.scheme)
        return bool(o.hostname) and o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:
        return False  # "null" and other opaque origins included


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


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server-side TLS context from PEM files (key may live in the cert file), or None without a certificate."""
    if cert is None and key is None:
        return None
    if cert is None:
        raise UserError("--tls-key needs --tls-cert (the certificate, PEM); pass both or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        what = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
        raise UserError(
            f"cannot load {what} ({getattr(exc, 'strerror', None) or exc}); pass a PEM certificate and its private key"
        ) from None
    return context


def make_server(host: str, port: int, service, ssl_context: ssl.SSLContext | None = None) -> HttpServer:
    """Bind (errors now, before the model loads: a busy port is a clear sentence, not a late traceback)."""
    try:
        return HttpServer(host, port, service, ssl_context)
    except OSError as exc:
        raise UserError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --serve HOST:PORT"
        ) from None
