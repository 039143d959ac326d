"""`adtr-run --sink`: one JSON message per anomaly to a local webhook receiver and a real mosquitto broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.runtime.serve.sinks import MAX_ATTEMPTS, WebhookSink
from tests import runtime_fixtures as rf
from tests.serve_helpers import Mosquitto, WebhookReceiver, free_port, mosquitto_path
from tests.test_sources import write_video


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


def run_with_sinks(model_path: Path, tmp_path: Path, *sinks: str, frames: int = 40) -> tuple[object, list[dict]]:
    clip = tmp_path / "line.avi"
    write_video(clip, frames, fps=25.0)
    out = tmp_path / "out"
    args = ["--model", model_path, "--source", clip, "--out", out]
    for sink in sinks:
        args += ["--sink", sink]
    result = CliRunner().invoke(command, [str(a) for a in args])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] if out.exists() else []
    return result, records


def same_records(messages: list[dict], records: list[dict]) -> None:
    anomalies = [r for r in records if r["is_anomaly"]]
    assert anomalies and len(messages) == len(anomalies)
    spec = json.loads(rf.onnx_model().with_name("model.json").read_text())
    for message, record in zip(sorted(messages, key=lambda m: m["frame"]), anomalies, strict=True):
        assert message["event"] == "anomaly" and message["model"]["sha256"] == spec["extra"]["sha256"]
        assert {k: message[k] for k in record} == record  # the very record of results.jsonl, plus the model


def test_webhook_gets_one_message_per_anomaly_and_a_failing_receiver_is_retried(model_path, tmp_path):
    with WebhookReceiver(fail_first=2) as hook:  # down for the first two tries, then fine
        result, records = run_with_sinks(model_path, tmp_path, f"webhook:{hook.url}")
    assert result.exit_code == 0, result.output
    same_records(hook.messages, records)
    assert hook.requests == len(hook.messages) + 2
    assert f"webhook:{hook.url}: {len(hook.messages)} sent, 0 dropped, 0 failed" in result.output


def test_a_full_queue_drops_and_counts_instead_of_blocking_inference():
    with WebhookReceiver(delay_s=3.0) as hook:  # a receiver that cannot keep up
        sink = WebhookSink(hook.url, queue_size=3)
        sink.start()
        t0 = time.perf_counter()
        accepted = [sink.offer({"frame": i}) for i in range(200)]
        elapsed = time.perf_counter() - t0
        sink.close(drain_s=0.0)
    assert elapsed < 0.5  # 200 offers against a stalled receiver: nothing waited for it
    assert sum(accepted) <= 4 and sink.dropped >= 196  # queue of 3, plus perhaps one already taken by the sender
    assert sink.stats()["dropped"] == sink.dropped


def test_an_unreachable_webhook_is_retried_with_backoff_then_counted_as_failed():
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", backoff_s=0.01)
    sink.start()
    sink.offer({"frame": 1})
    t0 = time.monotonic()
    while sink.failed == 0 and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    sink.close(drain_s=0)
    assert sink.failed == 1 and sink.sent == 0 and sink.retries == MAX_ATTEMPTS - 1
    assert "127.0.0.1" in sink.stats()["last_error"]


def test_a_sink_that_is_not_understood_is_one_clear_sentence(model_path, tmp_path):
    for sink, message in (
        ("ftp://host/x", "is not understood; use webhook:http://HOST/PATH or mqtt://HOST[:PORT]/TOPIC"),
        ("webhook:host/x", "needs an http:// or https:// URL"),
        ("mqtt://127.0.0.1:1883", "has no topic"),
    ):
        result, records = run_with_sinks(model_path, tmp_path, sink, frames=2)
        assert result.exit_code == 1 and message in result.output and not records, result.output


@pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed (Debian: apt-get install mosquitto)")
def test_mqtt_sink_publishes_one_message_per_anomaly_to_a_real_broker(model_path, tmp_path):
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed: pip install 'adtr-deploy[serve]'")
    with Mosquitto(tmp_path) as broker:
        got = broker.subscribe("factory/line1/anomalies")
        result, records = run_with_sinks(
            model_path, tmp_path, f"mqtt://127.0.0.1:{broker.port}/factory/line1/anomalies"
        )
        assert result.exit_code == 0, result.output
        expected = sum(bool(r["is_anomaly"]) for r in records)
        messages, t0 = [], time.monotonic()
        while len(messages) < expected and time.monotonic() - t0 < 30:
            try:
                messages.append(got.get(timeout=0.5))
            except Exception:  # noqa: BLE001 -- queue.Empty: keep waiting until the deadline
                pass
    same_records(messages, records)
    assert f"{expected} sent, 0 dropped, 0 failed" in result.output
