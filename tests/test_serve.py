"""`adtr-run --serve`: the real server on 127.0.0.1 during a real run over a video file (torch made unimportable)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.runtime.serve.server import MAX_STREAMS_PER_CLIENT
from tests import runtime_fixtures as rf
from tests.serve_helpers import ServedRun, WebhookReceiver, get, get_json
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
