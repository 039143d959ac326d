"""The socket side of the live view's server: one selector loop, on one thread, owns every client socket.

It accepts, reads requests, writes answers and closes sockets without ever blocking, so a client that is slow -- to
send its request, to read its answer, or to do anything at all -- costs a socket and a few bytes, never a thread, and
cannot hold up anyone else. Its budgets:

- a request (TLS handshake, headers, body) must arrive whole within HEADER_DEADLINE_S of the connection, or of its first
  byte on a kept-alive connection; an idle kept-alive connection closes after KEEPALIVE_IDLE_S; an answer must be taken
  within WRITE_DEADLINE_S;
- MAX_CONNECTIONS sockets in all and MAX_PER_CLIENT per client address: at a cap the oldest socket that is only waiting
  for its request (that client's, or anyone's at the global cap) is closed to make room, and a newcomer is refused
  (503) only when no socket is waiting.

What to answer is the subclass's (server.py): dispatch() gets each whole request, respond() queues the answer.
"""

from __future__ import annotations

import email.message
import math
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from adtr_deploy.runtime.serve.protocol import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    Request,
    Response,
    parse_request,
    response_head,
)

HEADER_DEADLINE_S = 5.0  # a whole request (TLS handshake, headers, body) must arrive within this
KEEPALIVE_IDLE_S = 5.0  # an idle kept-alive connection closes after this (the page polls every 0.5 s)
WRITE_DEADLINE_S = 10.0  # a client must take its answer within this
MAX_CONNECTIONS = 512
MAX_PER_CLIENT = 128
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
WAITING = ("handshake", "read")  # phases in which a socket holds nothing but itself: evicted first


class Conn:
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


class SocketLoop:
    """The loop: accept (within the socket caps), read and parse requests, hand them to dispatch(), write answers,
    enforce the deadlines. Everything here runs on the thread that calls serve_forever(), except wake()."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, log: Callable[[str], None]):
        self.ssl_context = ssl_context
        self.log = log
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
        self.conns: set[Conn] = set()
        self.per_client: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # refused, evicted, request_timeout, write_timeout, busy, bad_request
        self._running = False
        self._stopped = threading.Event()
        self._logged_at = -math.inf
        self._raise_fd_limit()

    # -- what a server built on this loop provides -------------------------------------------------------------------
    def dispatch(self, conn: Conn, req: Request) -> None:
        """A whole request arrived: answer it with respond(), at once or later (on the loop thread)."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Called on the loop thread after every round of events (at least every 0.1 s)."""

    def cpu_used(self, seconds: float) -> None:
        """CPU seconds the loop thread used since the last call (about every 0.1 s)."""

    def drained(self, conn: Conn) -> None:
        """A streaming connection (phase "stream") has written all that was queued."""

    def closed(self, conn: Conn) -> None:
        """A connection was closed (by either side, or by a budget)."""

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

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake

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
                    now = time.monotonic()
                    self.tick(now)
                    if now >= next_expiry:
                        next_expiry = now + 0.1
                        self._expire(now)
                        cpu = time.thread_time()
                        self.cpu_used(cpu - cpu_mark)
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
            self.log(f"the live view hit an error and goes on: {type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        """Stop the loop (from another thread) and wait for it."""
        self._running = False
        self.wake()
        self._stopped.wait(5)

    def server_close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        for s in (self.listener, self._wake_r, self._wake_w):
            try:
                self.selector.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        self.selector.close()

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
            conn = Conn(sock, ip, self.ssl_context is not None, time.monotonic())
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

    def _on_read(self, conn: Conn) -> None:
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

    def _handshake(self, conn: Conn) -> None:
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

    def _parse(self, conn: Conn) -> None:
        got = parse_request(conn.inbuf, conn.ip, conn.tls)
        if isinstance(got, Response):  # a request this server cannot serve: answer why, then close
            self.rejected["bad_request"] += 1
            conn.keep = False
            got.close = True
            self.respond(conn, Request("GET", "", {}, email.message.Message(), b"", conn.ip, conn.tls), got)
        elif got is not None:
            conn.keep = got.keep
            conn.phase = "busy"
            self._watch(conn, 0)
            self.dispatch(conn, got)

    def respond(self, conn: Conn, req: Request, resp: Response) -> None:
        """Queue the answer (written without blocking); then the connection waits for its next request, or closes."""
        keep = conn.keep and not resp.close
        conn.out.append(memoryview(response_head(resp, keep)))
        if req.method != "HEAD" and resp.body:
            conn.out.append(memoryview(resp.body))
        conn.keep = keep
        conn.phase = "write"
        conn.deadline = time.monotonic() + WRITE_DEADLINE_S
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
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
            self.drained(conn)

    def _watch(self, conn: Conn, events: int) -> None:
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

    def _close(self, conn: Conn) -> None:
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
        self.closed(conn)
