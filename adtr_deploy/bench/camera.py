"""A camera for benchmarks: an MJPEG stream on 127.0.0.1 (multipart/x-mixed-replace JPEG frames at a set rate), what
an IP camera serves. benchmarks/multicam.py feeds several `adtr-run`s from a looping one; benchmarks/feedback_loop.py
sends a fixed list once and counts what it sent, so frames dropped = frames sent - records written.
"""

from __future__ import annotations

import http.server
import threading
import time


class MjpegCamera:
    """`frames` (JPEG bytes) at `fps` to every client: in a loop (`loop=True`), or once in all (then the connection is
    held open, silent, like a camera with nothing new to show; `done` is set and `sent` counts what went out)."""

    def __init__(self, frames: list[bytes], fps: float, *, loop: bool = True):
        if not frames or fps <= 0:
            raise ValueError("a camera needs at least one frame and a positive rate")
        self.frames, self.interval, self.loop = list(frames), 1.0 / fps, loop
        self.sent = 0
        self.stop, self.done = threading.Event(), threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                owner._stream(self.wfile)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def _stream(self, out) -> None:
        i, t = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                if not self.loop and self.sent >= len(self.frames):
                    self.done.set()
                    self.stop.wait()  # stay connected, silent
                    return
                jpg = self.frames[(i if self.loop else self.sent) % len(self.frames)]
                out.write(
                    b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n"
                )
                out.flush()
                i, self.sent, t = i + 1, self.sent + 1, t + self.interval
                self.stop.wait(max(0.0, t - time.monotonic()))
        except OSError:  # the client went away
            pass

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
