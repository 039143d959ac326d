"""Real parts for the `adtr-run --serve` / `--sink` tests: a served adtr-run process, a webhook receiver, a mosquitto
broker. Everything listens on 127.0.0.1 only, and every wait is bounded."""

from __future__ import annotations

import http.server
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

URL_LINE = re.compile(r"live view on (https?://\S+/) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(
    url: str, *, headers: dict | None = None, method: str = "GET", timeout: float = 10, context=None
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too, not exceptions. `context`: an
    ssl.SSLContext for https:// URLs (e.g. one that trusts a test's self-signed certificate)."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str, **kw) -> tuple[int, dict]:
    code, _, body = get(url, **kw)
    return code, json.loads(body)


class ServedRun:
    """`adtr-run ... --serve 127.0.0.1:0` in its own process; `url` once it serves. Stopped with SIGTERM on exit."""

    def __init__(self, *args, env: dict | None = None, cwd: Path | None = None, start_timeout: float = 120):
        self.cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", *map(str, args)]
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.lines: list[str] = []
        self.url: str | None = None
        self._found = threading.Event()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = URL_LINE.search(line)
            if m and not self._found.is_set():
                self.url = m.group(1)
                self._found.set()
        self._found.set()  # the process ended: stop waiting

    def __enter__(self) -> ServedRun:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._found.wait(self.start_timeout)
        if self.url is None:
            self.stop()
            raise AssertionError(f"adtr-run did not start serving within {self.start_timeout} s:\n{self.log}")
        return self

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def status(self) -> dict:
        return get_json(self.url + "api/status")[1]

    def wait_for(self, predicate, timeout: float = 120, what: str = "condition") -> dict:
        """Poll the JSON status until predicate(status) holds; generous timeout so a loaded machine cannot fail it."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            s = self.status()
            if predicate(s):
                return s
            time.sleep(0.1)
        raise AssertionError(f"{what} not reached within {timeout} s; last status: {s}\n{self.log}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


class WebhookReceiver:
    """A local HTTP endpoint that records the JSON bodies POSTed to it. `fail_first` requests answer 503 first;
    `delay_s` makes every answer slow (a receiver that cannot keep up)."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0):
        self.messages: list[dict] = []
        self.requests = 0
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.stopped = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.requests += 1
                if owner.delay_s:
                    owner.stopped.wait(owner.delay_s)
                if owner.requests <= owner.fail_first:
                    self.send_response(503)
                else:
                    owner.messages.append(json.loads(body))
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


class Mosquitto:
    """A real mosquitto broker on a free 127.0.0.1 port, anonymous, no persistence."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    def __enter__(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [mosquitto_path(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()}") from None
                time.sleep(0.05)
        self.__exit__()
        raise AssertionError("mosquitto did not listen within 20 s")

    def subscribe(self, topic: str) -> queue.Queue:
        """Messages on `topic` as parsed JSON, collected by a paho client that is connected when this returns."""
        import paho.mqtt.client as mqtt

        got: queue.Queue = queue.Queue()
        ready = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="adtr-test-subscriber")
        client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = lambda c, u, msg: got.put(json.loads(msg.payload))
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert ready.wait(10), "the test subscriber could not subscribe"
        self.client = client
        return got

    def __exit__(self, *exc) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Camera:
    """A local MJPEG camera on a fixed 127.0.0.1 port that can be killed (server gone, open streams cut) and brought
    back on the same port, as a camera that loses power and reboots. Frames every `interval_s`, until stopped."""

    def __init__(self, interval_s: float = 0.04, size: tuple[int, int] = (96, 128)):
        from tests.runtime_fixtures import jpeg_frames

        self.port = free_port()
        self.interval_s = interval_s
        self.frames = jpeg_frames(8, size=size)
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.httpd = None
        self.stopped = threading.Event()
        self.sockets: list = []

    def start(self) -> Camera:
        owner, stopped = self, threading.Event()
        self.stopped = stopped

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.sockets.append(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not stopped.wait(owner.interval_s):  # ends with kill(): bounded
                        jpg = owner.frames[i % len(owner.frames)]
                        head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                        self.wfile.write(head + jpg + b"\r\n")
                        self.wfile.flush()
                        i += 1
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def kill(self) -> None:
        """The camera dies: nothing listens any more and every open stream is cut."""
        if self.httpd is None:
            return
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets.clear()
        self.httpd = None

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
