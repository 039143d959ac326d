"""What the sinks' at-least-once spool costs: offer() on the inference thread, the spool's write rate (one file per
message, fsync before the rename), and delivery to a local webhook receiver from a full spool.

    python benchmarks/sink_spool.py                 # 2000 messages, spool in a temporary folder
    python benchmarks/sink_spool.py --dir /var/lib/adtr/line3 --messages 5000   # on the disk the service will use

Reported: microseconds per offer() (what the inference thread pays per anomaly), messages per second written to the
spool while the receiver is down, and messages per second delivered (HTTP POST, acknowledged, file removed) once it is
up. Figures depend on the disk (fsync) and the CPU; run it on the box the line runs on.
"""

from __future__ import annotations

import argparse
import http.server
import tempfile
import threading
import time

from adtr_deploy.runtime.serve.webhook import WebhookSink

MESSAGE = {
    "event": "anomaly",
    "source": "rtsp://cam3.local/stream1",
    "score": 0.73,
    "normalized_score": 0.61,
    "is_anomaly": True,
    "line": "line 3",
    "threshold": 0.5,
    "time": "2026-12-03T05:00:00.000+00:00",
    "model": {"name": "export/model.onnx", "sha256": "ab" * 32},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="spool root (default: a temporary folder)")
    args = parser.parse_args()
    n = args.messages

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.server_close()  # the receiver is down while the spool fills

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        sink = WebhookSink(url, spool_root=root, queue_size=n, max_messages=n, log=lambda m: None, backoff_max_s=0.5)
        sink.start()
        t0 = time.perf_counter()
        for i in range(n):
            sink.offer({**MESSAGE, "event_id": f"bench-{i}", "frame": i})
        offer_s = time.perf_counter() - t0
        while sink.stats()["spooled"] < n:
            time.sleep(0.002)
        spool_s = time.perf_counter() - t0

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", httpd.server_address[1]), Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        while sink.sent == 0:
            time.sleep(0.001)
        t1 = time.perf_counter()
        while sink.sent < n:
            time.sleep(0.002)
        send_s = time.perf_counter() - t1
        sink.close()
        httpd.shutdown()
        httpd.server_close()
    print(
        f"{n} messages: offer() {offer_s / n * 1e6:.1f} us each on the calling thread; spooled {n / spool_s:.0f}/s "
        f"(fsync each); delivered from the spool to a local webhook {n / send_s:.0f}/s"
    )


if __name__ == "__main__":
    main()
