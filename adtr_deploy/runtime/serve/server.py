"""The HTTP side of `adtr-run --serve`: the socket loop (loop.py) with the routes (routes.py) and budgets per kind of work.

A thread per connection (the stdlib's ThreadingHTTPServer, used before) let held connections -- MJPEG viewers, a
retrying dashboard, clients that send their headers slowly -- take every slot, and /healthz then answered 503 to a
watchdog that restarted a healthy service. Here, as in the event-driven servers (nginx and the like), a waiting client
costs a socket, never a thread (the socket budgets and deadlines are in loop.py), and each kind of work has its own:

- /healthz and /readyz are answered by the loop itself, from memory: never queued behind anything.
- /metrics has its own worker; everything else WORKERS threads with a bounded queue (503 when full). Answers are
  computed in memory and written by the loop, so a client that does not read holds no worker.
- MJPEG: at most MAX_STREAMS viewers, MAX_STREAMS_PER_CLIENT per address, all fed by the loop from the one shared JPEG
  (encoded once by the render thread, state.py): 200 viewers are 200 sockets, not 200 threads. A viewer that cannot
  keep up skips frames; one that takes nothing for STREAM_STALL_S is closed.

TLS (--tls-cert/--tls-key) is the standard library's ssl; the handshake counts against the request deadline.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.serve.loop import HEADER_DEADLINE_S, MAX_CONNECTIONS, MAX_PER_CLIENT, Conn, SocketLoop
from adtr_deploy.runtime.serve.protocol import Request, Response, error
from adtr_deploy.runtime.serve.routes import PROBES, Routes

__all__ = ["HEADER_DEADLINE_S", "MAX_CONNECTIONS", "MAX_PER_CLIENT", "HttpServer", "make_server", "tls_context"]

MAX_STREAMS = 256
MAX_STREAMS_PER_CLIENT = 64
STREAM_STALL_S = 30.0  # a viewer that takes nothing for this long is closed
WORKERS = 4  # threads answering /api/status, frames, the page, control
WORK_QUEUE = 64  # requests waiting for those threads at most; more get 503 at once
METRICS_QUEUE = 8


class HttpServer(SocketLoop):
    """The live view's server: probes on the loop, the rest on the pools, MJPEG viewers fed by the loop."""

    def __init__(self, host: str, port: int, service, ssl_context: ssl.SSLContext | None = None):
        super().__init__(host, port, ssl_context, service.log)
        self.service = service
        self.routes = Routes(service)
        self.streams: dict[Conn, object] = {}  # each viewer and the LiveState it watches (a line: one per camera)
        self.streams_per_client: Counter[str] = Counter()
        self._done: deque[tuple[Conn, Request, Response]] = deque()  # answers from the pools
        self._lock = threading.Lock()
        self._queued = Counter()  # requests waiting for or in each pool
        self._pools = {
            "work": (ThreadPoolExecutor(WORKERS, "adtr-serve-work"), WORK_QUEUE + WORKERS),
            "metrics": (ThreadPoolExecutor(1, "adtr-serve-metrics"), METRICS_QUEUE + 1),
        }
        self._frame_seq_fed = 0
        self._watched_at = 0.0

    def stats(self) -> dict:
        return {"connections": len(self.conns), "streams": len(self.streams), "rejected": dict(self.rejected)}

    def server_close(self) -> None:
        super().server_close()
        for pool, _ in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop's hooks ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._take_answers()
        self._feed_streams()

    def cpu_used(self, seconds: float) -> None:
        if self.service.state is not None:
            self.service.state.add_http_cpu(seconds)

    def drained(self, conn: Conn) -> None:
        self._feed(conn)

    def closed(self, conn: Conn) -> None:
        if conn in self.streams:
            del self.streams[conn]
            self.streams_per_client[conn.ip] -= 1
            if self.streams_per_client[conn.ip] <= 0:
                del self.streams_per_client[conn.ip]
            self.service.streams = len(self.streams)

    def dispatch(self, conn: Conn, req: Request) -> None:
        if req.method not in ("GET", "HEAD", "POST"):
            self.respond(
                conn, req, error(405, f"{req.method} is not served here", headers={"Allow": "GET, HEAD, POST"})
            )
        elif req.path in PROBES and req.method != "POST":
            self.respond(conn, req, self.routes.probe(req))  # from memory, on this thread: never queued
        elif req.method == "GET" and req.path.endswith("/stream.mjpg") and self.routes.stream_state(req.path):
            self._start_stream(conn, req, self.routes.stream_state(req.path))
        else:
            self._submit(conn, req, "metrics" if req.path == "/metrics" else "work")

    def _submit(self, conn: Conn, req: Request, pool_name: str) -> None:
        pool, limit = self._pools[pool_name]
        with self._lock:
            full = self._queued[pool_name] >= limit
            if not full:
                self._queued[pool_name] += 1
        if full:
            self.rejected["busy"] += 1
            self.respond(
                conn, req, error(503, "busy: too many requests at once; try again", headers={"Retry-After": "1"})
            )
            return
        try:
            pool.submit(self._work, conn, req, pool_name)
        except RuntimeError:  # shutting down
            self._close(conn)

    def _work(self, conn: Conn, req: Request, pool_name: str) -> None:
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
                self.respond(conn, req, resp)

    def _start_stream(self, conn: Conn, req: Request, state) -> None:
        denied = self.routes.read_denied(req)
        if denied is not None:
            self.respond(conn, req, denied)
            return
        if len(self.streams) >= MAX_STREAMS or self.streams_per_client[conn.ip] >= MAX_STREAMS_PER_CLIENT:
            self.rejected["busy"] += 1
            cap = f"at most {MAX_STREAMS} in all and {MAX_STREAMS_PER_CLIENT} per client"
            self.respond(conn, req, error(503, f"too many live streams ({cap}); poll /frame.jpg instead", close=True))
            return
        conn.phase = "stream"
        conn.keep = False
        self.streams[conn] = state
        self.streams_per_client[conn.ip] += 1
        self.service.streams = len(self.streams)
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\nCache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\nServer: adtr-run\r\nConnection: close\r\n\r\n"
        )
        conn.out.append(memoryview(head.encode()))
        conn.deadline = time.monotonic() + STREAM_STALL_S
        state.watched()
        self._flush(conn)  # then _feed: the current frame comes at once

    def _feed(self, conn: Conn) -> None:
        """Queue the newest frame for a viewer whose last one is out (a slow viewer skips frames, never queues them)."""
        state = self.streams.get(conn)
        if state is None:
            return
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
        states = set(self.streams.values())
        now = time.monotonic()
        if now - self._watched_at >= 1.0:  # viewers keep the render threads drawing
            self._watched_at = now
            for state in states:
                state.watched()
        fed = sum(state.frame_seq for state in states)  # any new frame of any watched state changes it
        if fed != self._frame_seq_fed:
            self._frame_seq_fed = fed
            for conn in list(self.streams):
                if not conn.closed and not conn.out:
                    self._feed(conn)


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
