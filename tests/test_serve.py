"""`adtr-run --serve`: the real server on 127.0.0.1 during a real run over a video file (torch made unimportable)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.runtime.serve.server import HEADER_DEADLINE_S, MAX_PER_CLIENT, MAX_STREAMS_PER_CLIENT
from tests import runtime_fixtures as rf
from tests.serve_helpers import Camera, ServedRun, WebhookReceiver, get, get_json
from tests.test_runtime import poisoned_torch_env
from tests.test_sources import write_video

pytest.importorskip("prometheus_client", reason="the serve extra is not installed: pip install 'adtr-deploy[serve]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ANY_TOKEN = {"X-ADTR-Token": "-"}  # no token set: any value passes, but the header must be there


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


def metrics(url: str) -> dict[str, list]:
    code, headers, body = get(url + "metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def sample(families: dict, name: str, **labels) -> float:
    for family in families.values():
        for s in family:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels} not in /metrics")


def read_mjpeg_part(sock_file) -> bytes:
    """One JPEG from a multipart/x-mixed-replace body: boundary line, headers, Content-Length bytes."""
    line = sock_file.readline()
    while line.strip() != b"--frame":
        line = sock_file.readline()
    length = 0
    while (line := sock_file.readline().strip()) != b"":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return sock_file.read(length)


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    return host, int(port)


def connect(url: str, source: str = "127.0.0.1", timeout: float = 20) -> socket.socket:
    """A TCP connection to the server from `source`: any 127.x.y.z is this machine, seen by the server as another
    client address (per-client limits are per address)."""
    return socket.create_connection(address(url), timeout=timeout, source_address=(source, 0))


def open_stream(url: str, source: str = "127.0.0.1") -> tuple[socket.socket, object, bytes]:
    sock = connect(url, source)
    sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
    f = sock.makefile("rb")
    status = f.readline()
    return sock, f, status


def test_page_status_metrics_health_stream_and_pause_resume_during_a_video_run(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 400, fps=25.0, size=(120, 160))
    out = tmp_path / "out"
    spec = json.loads(model_path.with_name("model.json").read_text())
    with WebhookReceiver() as hook, ServedRun(
        "--model", model_path, "--source", clip, "--out", out, "--serve", "127.0.0.1:0", "--serve-linger", "120",
        "--sink", f"webhook:{hook.url}", env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        url = run.url
        assert url.startswith("http://127.0.0.1:")
        run.wait_for(lambda s: s["counts"]["images"] >= 3, what="first records")

        # Pause: no new frame is taken (the few in flight finish), the count stands still.
        code, body = get_json(url + "api/pause", method="POST", headers=ANY_TOKEN)
        assert code == 200 and body["state"] == "paused"
        time.sleep(1.0)
        n = run.status()["counts"]["images"]
        time.sleep(1.5)
        paused = run.status()
        assert paused["state"] == "paused" and paused["counts"]["images"] == n and n < 400

        # The page and its files, all from this server.
        code, headers, page = get(url)
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<script src="/static/app.js"' in page and b"http" not in page  # nothing from another host
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        code, _, js = get(url + "static/app.js")
        assert code == 200 and b"textContent" in js and b"innerHTML" not in js
        assert get(url + "no/such/page")[0] == 404

        # Health while paused: alive; not ready (nothing is inspected), and the reason says why; the line is PAUSED.
        code, health = get_json(url + "healthz")
        assert code == 200 and health["ok"] and health["uptime_s"] > 0
        code, ready = get_json(url + "readyz")
        assert code == 503 and not ready["ready"] and ready["line"] == "PAUSED" and "paused" in ready["reason"]
        assert ready["model_loaded"] and ready["source_up"] and ready["last_frame_age_s"] >= 1.0
        assert run.status()["line"]["state"] == "PAUSED"

        # The JSON status: counters, model identity, timeline, latency, the last record.
        s = run.wait_for(lambda s: s["gallery"] or not s["counts"]["anomalies"], what="a gallery thumbnail")
        assert s["model"]["sha256"] == spec["extra"]["sha256"] and s["model"]["backend"] == "onnxruntime"
        assert s["model"]["threshold"] == pytest.approx(rf.calibration().threshold)
        assert s["model"]["input_size"] == [rf.INPUT_SIZE, rf.INPUT_SIZE] and s["model"]["device"] == "cpu"
        assert s["source"]["name"] == str(clip) and s["counts"]["images"] == n
        assert len(s["timeline"]) == s["counts"]["ok"] == n and s["latency_ms"]["p50"] > 0
        assert [p[0] for p in s["timeline"]] == list(range(1, n + 1))
        # decisions agree with the threshold line (a score rounded onto the line may be either)
        assert all(p[2] >= 0.5 if p[3] else p[2] <= 0.5 for p in s["timeline"])
        assert get_json(url + f"api/status?since={n - 1}")[1]["timeline"] == s["timeline"][-1:]
        assert s["last"]["frame"] == n - 1 and s["control"]["needs_token"] is False

        # The latest annotated frame, drawn on demand for a viewer (the run is paused: the last one).
        t0 = time.monotonic()
        while (answer := get(url + "frame.jpg"))[0] != 200 and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        code, headers, jpg = answer
        frame = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
        assert code == 200 and frame.shape == (120, 160, 3) and frame.std() > 5
        assert int(headers["X-Frame-Seq"]) >= 1
        about = json.loads(urllib.parse.unquote(headers["X-Frame-Info"]))  # the record this picture belongs to
        assert about["frame"] == n - 1 and about["score"] == s["last"]["score"] and about["status"] == "ok"
        for g in s["gallery"]:
            code, _, thumb = get(url + f"gallery/{g['id']}.jpg")
            assert code == 200 and cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR) is not None
            assert g["normalized_score"] >= 0.5 and g["source"] == str(clip)

        # MJPEG: the current frame comes at once; streams are capped per client (the next one gets 503, the run goes on).
        streams = [open_stream(url) for _ in range(MAX_STREAMS_PER_CLIENT)]
        try:
            assert all(b" 200 " in status for _, _, status in streams)
            part = read_mjpeg_part(streams[0][1])
            assert cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)
            _, extra_f, extra_status = open_stream(url)
            assert b" 503 " in extra_status
            _, _, other_client = open_stream(url, source="127.0.0.2")  # another client still gets its stream
            assert b" 200 " in other_client
            assert sample(metrics(url), "adtr_mjpeg_streams") == MAX_STREAMS_PER_CLIENT + 1
        finally:
            for sock, f, _ in streams:
                f.close()
                sock.close()

        # /metrics, read with prometheus-client's own parser.
        m = metrics(url)
        assert sample(m, "adtr_images_total") == n and sample(m, "adtr_paused") == 1
        assert sample(m, "adtr_anomalies_total") == s["counts"]["anomalies"]
        assert sample(m, "adtr_errors_total") == 0 and sample(m, "adtr_dropped_frames_total") == 0
        for stage in ("before_inference", "inference", "end_to_end"):
            assert sample(m, "adtr_stage_latency_seconds_count", stage=stage) == n
        assert sample(m, "adtr_model_info", sha256=spec["extra"]["sha256"]) == 1
        assert sample(m, "adtr_serve_cpu_seconds_total", part="http") > 0  # what serving itself costs, measured
        assert sample(m, "adtr_serve_cpu_seconds_total", part="observe") > 0

        # Resume: the run goes on to the end of the video; then health says the source is gone.
        code, body = get_json(url + "api/resume", method="POST", headers=ANY_TOKEN)
        assert code == 200 and body["state"] == "running"
        final = run.wait_for(lambda s: s["state"] == "finished", what="the end of the video")
        assert final["counts"]["images"] == 400 and final["line"]["state"] == "FINISHED"
        assert get_json(url + "healthz")[0] == 200  # the process still lives and serves the results
        code, ready = get_json(url + "readyz")
        assert code == 503 and not ready["ready"] and ready["line"] == "FINISHED"
        anomalies = final["counts"]["anomalies"]
        m = metrics(url)
        t0 = time.monotonic()
        while sample(m, "adtr_sink_messages_total", outcome="sent") < anomalies and time.monotonic() - t0 < 60:
            time.sleep(0.2)
            m = metrics(url)
        assert sample(m, "adtr_sink_messages_total", outcome="sent") == anomalies == len(hook.messages)
        assert run.stop() == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["images"] == len(records) == 400 and summary["anomalies"] == anomalies
    assert "torch" not in run.log and "Traceback" not in run.log


def test_control_needs_the_token_when_one_is_set_and_never_shows_it(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 20, fps=25.0)
    env = {**poisoned_torch_env(tmp_path), "ADTR_SERVE_TOKEN": "s3cret-token"}
    with ServedRun(
        "--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", env=env,
    ) as run:  # fmt: skip
        url = run.url
        for headers in ({}, {"X-ADTR-Token": ""}, {"X-ADTR-Token": "s3cret-toke"}, {"X-ADTR-Token": "S3CRET-TOKEN"}):
            code, body = get_json(url + "api/pause", method="POST", headers=headers)
            assert code == 403 and "token" in body["error"], headers
        assert get(url + "api/pause")[0] == 404  # control is POST-only: a GET (a link, an <img>) does nothing
        status = run.status()
        assert status["state"] != "paused" and status["control"]["needs_token"] is True
        code, body = get_json(url + "api/pause", method="POST", headers={"X-ADTR-Token": "s3cret-token"})
        assert code == 200 and body["state"] in ("paused", "finished")
        for path in ("", "api/status", "metrics", "healthz", "static/app.js"):
            assert b"s3cret" not in get(url + path)[2]


def test_serving_beyond_loopback_without_a_token_is_refused_before_anything_runs(model_path, tmp_path, monkeypatch):
    monkeypatch.delenv("ADTR_SERVE_TOKEN", raising=False)
    clip = tmp_path / "line.avi"
    write_video(clip, 3)
    out = tmp_path / "out"
    for serve, message in (
        ("0.0.0.0:0", "reachable from the network, so control needs a token"),
        ("camera-box.local:8080", "reachable from the network, so control needs a token"),
        ("127.0.0.1:http", "is not HOST:PORT"),
    ):
        result = CliRunner().invoke(command, ["--model", model_path, "--source", clip, "--out", out, "--serve", serve])
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.startswith("Error:") and "Traceback" not in result.output
        assert not out.exists()  # refused before the model or the source was touched


def test_a_busy_port_is_one_clear_sentence(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", f"127.0.0.1:{port}"]
        result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 1 and f"cannot serve on 127.0.0.1:{port}" in result.output, result.output


def test_a_hostile_source_name_is_data_in_the_status_and_never_markup_in_the_page(model_path, tmp_path):
    """The page only ever sets textContent; the name reaches it as a JSON string, unchanged (the browser test checks
    the rendered DOM)."""
    name = '<img src=x onerror="alert(1)">.avi'
    clip = tmp_path / name
    write_video(clip, 5)
    with ServedRun(
        "--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        s = run.wait_for(lambda s: s["state"] == "finished", what="the end of the video")
        assert s["source"]["name"] == str(clip) and s["last"]["source"] == str(clip)
        code, headers, raw = get(run.url + "api/status")
        assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
        _, _, page = get(run.url)
        assert b"onerror" not in page  # the page is static: data never reaches the HTML from the server
    js = (Path(__file__).parents[1] / "adtr_deploy/runtime/serve/static/app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


def test_the_plain_runtime_never_imports_the_serve_code_and_a_missing_extra_is_one_sentence(model_path, tmp_path):
    env = poisoned_torch_env(tmp_path)
    fake = tmp_path / "no_torch" / "prometheus_client"  # beside the fake torch: `import prometheus_client` fails
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('prometheus_client is not installed')\n")
    code = (
        "import sys, adtr_deploy.cli.run, adtr_deploy.runtime.pipeline; "
        "print(sorted(m for m in sys.modules if m.startswith(('adtr_deploy.runtime.serve', 'paho', 'http.server'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    clip = tmp_path / "line.avi"
    write_video(clip, 3)
    run = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", "--model", str(model_path)]
    run += ["--source", str(clip), "--out", str(tmp_path / "out"), "--serve", "127.0.0.1:0"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--serve needs the serve extra: pip install 'adtr-deploy[serve]'" in done.stderr
    assert "Traceback" not in done.stderr


# -- health under load, source state, Host/Origin, TLS, read auth, deploy files (issue 23) ------------------------------


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    result = fn(*args, **kw)
    return result, time.monotonic() - t0


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count in /proc")


def cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def live_run(camera_url: str, tmp_path: Path, *extra, env: dict | None = None) -> ServedRun:
    return ServedRun(
        "--model", rf.onnx_model(), "--source", camera_url, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--timeout", "2", *extra, env=env or poisoned_torch_env(tmp_path),
    )  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts the server's threads in /proc (Linux)")
def test_health_answers_within_a_second_under_200_viewers_and_100_slow_header_sockets(tmp_path):
    viewers, slow = [], []
    with Camera() as camera, live_run(camera.url, tmp_path) as run:
        url, pid = run.url, run.proc.pid
        run.wait_for(lambda s: s["line"]["state"] in ("OK", "ALARM"), what="frames from the camera")
        threads_before = threads_of(pid)
        try:
            # 200 viewers from four client addresses (the per-client cap is MAX_STREAMS_PER_CLIENT): all served.
            for i in range(200):
                viewers.append(open_stream(url, source=f"127.0.0.{2 + i // 50}"))
            assert all(b" 200 " in status for _, _, status in viewers)
            for _, f, _ in viewers:  # every viewer gets a real frame
                part = read_mjpeg_part(f)
                assert cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR) is not None
            # 100 clients that send half a request line and then nothing (slowloris).
            for i in range(100):
                sock = connect(url, source=f"127.0.0.{6 + i // 50}")
                sock.sendall(b"GET /api/status HTTP/1.1\r\nHo")
                slow.append(sock)
            time.sleep(0.5)
            threads_held = threads_of(pid)
            cpu0 = cpu_seconds_of(pid)
            probe_s = []
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.6"):  # a watchdog's address, a viewer's, a slow one's
                for path, ok in (("healthz", (200,)), ("readyz", (200,)), ("metrics", (200,)), ("api/status", (200,))):
                    host, port = address(url)
                    with connect(url, source) as s:
                        s.settimeout(5)
                        t0 = time.monotonic()
                        s.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                        first = s.makefile("rb").readline()
                        took = time.monotonic() - t0
                    assert int(first.split()[1]) in ok and took < 1.0, (source, path, first, took)
                    probe_s.append(took)
            m = metrics(url)
            assert sample(m, "adtr_mjpeg_streams") == 200 and sample(m, "adtr_http_connections") >= 300
            time.sleep(2.0)
            cpu = cpu_seconds_of(pid) - cpu0
            print(f"\nserver threads: {threads_before} before, {threads_held} with 200 viewers + 100 slow sockets; "
                  f"slowest of 12 answers {max(probe_s) * 1000:.0f} ms; "
                  f"process CPU {cpu:.2f} s over ~2.5 s while serving them")  # fmt: skip
            assert threads_held - threads_before < 10  # a socket each, not a thread each

            # The whole-request deadline: the slow sockets are closed by the server, each within 5 s (+ margin).
            deadline = time.monotonic() + HEADER_DEADLINE_S + 5
            for sock in slow:
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    assert sock.recv(100) == b"", "a slow-header socket got an answer instead of being closed"
                except ConnectionResetError:
                    pass  # closed too (a reset instead of a FIN)
            assert sample(metrics(url), "adtr_http_rejected_total", reason="request_timeout") >= 100

            # One client floods sockets past its cap: its oldest waiting sockets make room; health still answers.
            flood = [connect(url, source="127.0.0.9") for _ in range(MAX_PER_CLIENT + 20)]
            slow.extend(flood)
            (code, _), took = timed(get_json, url + "healthz")
            assert code == 200 and took < 1.0
            with connect(url, source="127.0.0.9") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b" 200 " in s.makefile("rb").readline()
            assert sample(metrics(url), "adtr_http_rejected_total", reason="evicted") >= 20
            _, f, _ = viewers[-1]
            assert read_mjpeg_part(f)  # the viewers were never touched
        finally:
            for sock, f, _ in viewers:
                f.close()
                sock.close()
            for sock in slow:
                sock.close()
        assert run.stop() == 0


def test_a_dead_camera_is_no_signal_in_status_metrics_and_readyz_within_the_stall_timeout_then_recovers(tmp_path):
    """The camera's URL and the webhook's carry credentials: they are masked everywhere they are shown."""
    with Camera() as camera, WebhookReceiver() as hook:
        secret_cam = camera.url.replace("http://", "http://operator:cam-s3cret@")
        secret_hook = hook.url.replace("http://", "http://alerts:hook-s3cret@") + "?token=tok-s3cret"
        with live_run(secret_cam, tmp_path, "--sink", secret_hook) as run:
            url = run.url
            s = run.wait_for(lambda s: s["line"]["state"] in ("OK", "ALARM"), what="frames from the camera")
            assert s["source"]["up"] and s["source"]["live"] and s["ready"] and s["source"]["outage_start"] is None
            assert get_json(url + "readyz")[0] == 200
            assert sample(metrics(url), "adtr_source_up") == 1

            camera.kill()
            t0 = time.monotonic()
            s = run.wait_for(lambda s: s["line"]["state"] == "NO SIGNAL", timeout=30, what="NO SIGNAL")
            noticed = time.monotonic() - t0
            assert noticed < 2 + 2.0, f"NO SIGNAL after {noticed:.1f} s (stall timeout 2 s)"
            assert not s["source"]["up"] and s["source"]["outage_start"] is not None and not s["ready"]
            code, ready = get_json(url + "readyz")
            assert code == 503 and ready["line"] == "NO SIGNAL" and not ready["source_up"] and ready["reason"]
            m = metrics(url)
            assert sample(m, "adtr_source_up") == 0 and sample(m, "adtr_line_state", state="no_signal") == 1
            assert sample(m, "adtr_ready") == 0 and sample(m, "adtr_line_state", state="ok") == 0
            # Every reconnect attempt counts, while the camera is still down.
            first = sample(m, "adtr_reconnects_total")
            s = run.wait_for(
                lambda s: s["counts"]["reconnects"] >= first + 2, timeout=30, what="more reconnect attempts"
            )
            assert s["line"]["state"] == "NO SIGNAL" and s["source"]["outages"] == 1
            assert sample(metrics(url), "adtr_reconnects_total") >= first + 2

            camera.start()  # the camera comes back on the same address
            s = run.wait_for(lambda s: s["line"]["state"] in ("OK", "ALARM"), timeout=60, what="recovery")
            assert s["source"]["up"] and s["source"]["outage_start"] is None and s["source"]["outages"] == 1
            assert get_json(url + "readyz")[0] == 200 and sample(metrics(url), "adtr_source_up") == 1

            shown = [get(url + p)[2] for p in ("api/status", "metrics", "", "static/app.js")]
            assert all(b"s3cret" not in body for body in shown)
            assert b"operator:***@" in shown[0] and b"token=***" in shown[1]
            assert run.stop() == 0
        assert "s3cret" not in run.log


def test_control_with_a_foreign_host_or_origin_is_refused_even_on_loopback_without_a_token(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 20)
    with ServedRun(
        "--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        url = run.url
        host, port = address(url)
        run.wait_for(lambda s: s["state"] == "finished", what="the end of the video")
        refused = [
            {"Host": f"evil.example:{port}"},  # DNS rebinding: the attacker's name, resolved to 127.0.0.1
            {"Host": f"attacker.test:{port}", "Origin": f"http://attacker.test:{port}"},
            {"Origin": "http://evil.example"},  # another site's page posting here
            {"Origin": f"http://{host}:{port + 1}"},  # another port is another origin
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ]
        for headers in refused:
            code, body = get_json(url + "api/pause", method="POST", headers={**ANY_TOKEN, **headers})
            assert code == 403 and "refused" in body["error"], headers
        assert run.status()["state"] == "finished"
        for headers in ({}, {"Origin": f"http://{host}:{port}"}, {"Host": f"localhost:{port}"}):
            code, _ = get_json(url + "api/resume", method="POST", headers={**ANY_TOKEN, **headers})
            assert code == 200, headers


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate (Debian package openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days",
         "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_serves_https_with_a_certificate_and_health_holds_with_slow_handshakes(model_path, tmp_path):
    cert, key = make_certificate(tmp_path)
    clip = tmp_path / "line.avi"
    write_video(clip, 20)
    with ServedRun(
        "--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", "--tls-cert", cert, "--tls-key", key, env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        url = run.url
        assert url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        code, status = get_json(url + "api/status", context=trust)
        assert code == 200 and status["model"]["sha256"]
        # Sockets that connect and never start the handshake do not hold up a client that does.
        idle = [connect(url) for _ in range(20)]
        try:
            (code, _), took = timed(get_json, url + "healthz", context=trust)
            assert code == 200 and took < 1.0
        finally:
            for sock in idle:
                sock.close()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # verified: this one, not any
            get(url + "healthz", context=ssl.create_default_context())
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP on the TLS port gets no answer
            get(url.replace("https://", "http://") + "healthz", timeout=10)


def test_read_endpoints_need_the_token_with_serve_auth_all(model_path, tmp_path, monkeypatch):
    monkeypatch.delenv("ADTR_SERVE_TOKEN", raising=False)
    clip = tmp_path / "line.avi"
    write_video(clip, 20)
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--model", model_path, "--source", clip, "--out", out, "--serve",
                                          "127.0.0.1:0", "--serve-auth", "all"])  # fmt: skip
    assert result.exit_code == 1 and "--serve-auth all needs a token" in result.output, result.output
    env = {**poisoned_torch_env(tmp_path), "ADTR_SERVE_TOKEN": "read-s3cret"}
    with ServedRun(
        "--model", model_path, "--source", clip, "--out", out, "--serve", "127.0.0.1:0", "--serve-linger", "120",
        "--serve-auth", "all", env=env,
    ) as run:  # fmt: skip
        url = run.url
        for path in ("", "static/app.js", "api/status", "metrics", "frame.jpg", "stream.mjpg", "gallery/1.jpg"):
            code, headers, body = get(url + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
            assert b"read-s3cret" not in body
        assert get(url + "healthz")[0] == 200 and get(url + "readyz")[0] in (200, 503)  # probes stay open
        basic = "Basic " + base64.b64encode(b"anyone:read-s3cret").decode()
        for headers in (
            {"X-ADTR-Token": "read-s3cret"},
            {"Authorization": "Bearer read-s3cret"},
            {"Authorization": basic},
        ):
            assert get(url + "api/status", headers=headers)[0] == 200, headers
            assert get(url + "metrics", headers=headers)[0] == 200, headers
        assert get(url + "api/status", headers={"Authorization": "Bearer wrong"})[0] == 401


def metric_names_used(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers not followed by '(' that are not keywords or labels."""
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", re.sub(r"\{[^}]*\}", "", expr)):
        word = m.group(1)
        if word.startswith(("adtr_", "process_", "python_")):
            names.add(word)
    return names


def test_alert_rules_and_dashboard_use_only_metrics_the_service_exports(model_path, tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the Prometheus rules (the dev extra)")
    deploy = Path(__file__).parents[1] / "deploy"
    rules = yaml.safe_load((deploy / "prometheus" / "adtr-rules.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"AdtrLineNoSignal", "AdtrNotReady", "AdtrDown"} <= set(exprs)
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] and r["annotations"]["summary"], r["alert"]
    dashboard = json.loads((deploy / "grafana" / "adtr-line.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    panel_exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    assert len(panel_exprs) >= 6
    used = set().union(*(metric_names_used(e) for e in [*exprs.values(), *panel_exprs]))
    assert used, "no metric names found"

    clip = tmp_path / "line.avi"
    write_video(clip, 30)
    with WebhookReceiver() as hook, ServedRun(
        "--model", model_path, "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", "--sink", hook.url, env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        run.wait_for(lambda s: s["state"] == "finished", what="the end of the video")
        exported = {s.name for family in metrics(run.url).values() for s in family}
    missing = sorted(n for n in used if n not in exported)
    assert not missing, f"deploy/ uses metrics /metrics does not export: {missing}"
