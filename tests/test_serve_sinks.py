"""`adtr-run --sink`: anomalies delivered at least once, with an event id, from a spool on disk, to a real HTTP receiver
on 127.0.0.1 (whose socket is really closed during outages) and a real mosquitto broker (skipped where it is missing)."""

from __future__ import annotations

import getpass
import hashlib
import hmac
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.runtime.live import redact
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.serve.sinks import parse_sink, sink_observer
from adtr_deploy.runtime.serve.webhook import WebhookSink
from tests import runtime_fixtures as rf
from tests.serve_helpers import ServedRun, free_port, get, mosquitto_path
from tests.test_sources import write_video

needs_mosquitto = pytest.mark.skipif(
    mosquitto_path() is None, reason="mosquitto is not installed (Debian: apt-get install mosquitto)"
)
FAST = {"backoff_s": 0.05, "backoff_max_s": 0.4}  # the backoff scaled down; the outages themselves are real
# The restart test's outage; ADTR_TEST_SINK_OUTAGE_S=60 runs the full minute with the real backoff (30 s cap).
OUTAGE_S = float(os.environ.get("ADTR_TEST_SINK_OUTAGE_S", "4"))


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what} not reached within {timeout} s"
        time.sleep(0.02)


def strict_loads(body: bytes) -> dict:
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name} in {body!r}")

    return json.loads(body, parse_constant=refuse)


class Receiver:
    """A webhook receiver on a fixed 127.0.0.1 port that can really go down (socket closed) and come back. It keeps
    every request (headers, body), deduplicates by event_id, answers `refuse` event ids with 400 and checks the HMAC
    signature when it knows the secret."""

    def __init__(
        self,
        port: int | None = None,
        *,
        secret: str | None = None,
        refuse: set[str] = frozenset(),
        moved: set[str] = frozenset(),
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.secret = secret
        self.refuse = set(refuse)  # event ids answered 400
        self.moved = set(moved)  # event ids answered 302 (a redirect urllib would follow by a GET without the body)
        self.requests: list[tuple[object, bytes]] = []  # (headers, body)
        self.events: dict[str, dict] = {}  # event_id -> message (deduplicated)
        self.bad_signatures = 0
        self.httpd = None
        self._lock = threading.Lock()

    def up(self) -> Receiver:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = self.headers  # case-insensitive, as HTTP headers are
                message = strict_loads(body)
                with owner._lock:
                    owner.requests.append((headers, body))
                    if owner.secret is not None:
                        signed = headers.get("X-ADTR-Timestamp", "").encode() + b"." + body
                        good = hmac.new(owner.secret.encode(), signed, hashlib.sha256).hexdigest()
                        if not hmac.compare_digest(headers.get("X-ADTR-Signature", ""), f"sha256={good}"):
                            owner.bad_signatures += 1
                    status = (
                        400
                        if message["event_id"] in owner.refuse
                        else 302
                        if message["event_id"] in owner.moved
                        else 204
                    )
                    if status == 204:
                        owner.events.setdefault(message["event_id"], message)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def down(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()  # the port is closed: connections are refused, as with a receiver that is off
            self.httpd = None

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def ids_sent(self) -> list[str]:
        return [strict_loads(body)["event_id"] for _, body in self.requests]


def messages(n: int, start: int = 0) -> list[dict]:
    """What sink_observer would offer: distinct event ids."""
    return [
        {"event": "anomaly", "event_id": f"ev-{i:04d}", "frame": i, "score": 0.5 + i} for i in range(start, start + n)
    ]


def lines(log: list[str], part: str) -> list[str]:
    return [line for line in log if part in line]


# -- delivery ------------------------------------------------------------------------------------------------------------


def test_redact_url_masks_passwords_and_secret_query_values():
    assert redact is redact_url  # live.py's name is the one helper
    assert redact_url("mqtt://user:pa55@broker:1883/t") == "mqtt://user:***@broker:1883/t"
    assert redact_url("rtsp://u:p%40ss@[::1]:554/s") == "rtsp://u:***@[::1]:554/s"
    assert redact_url("https://h/hook?token=abc&line=3") == "https://h/hook?token=***&line=3"
    for unchanged in ("mqtt://user@broker/t", "http://h/x?line=3", "images/a?token=1.png", "camera:0"):
        assert redact_url(unchanged) == unchanged


def test_a_receiver_down_for_a_while_then_up_gets_every_event_once_by_event_id(tmp_path):
    log: list[str] = []
    with Receiver() as hook:  # down: nothing listens on its port
        sink = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **FAST)
        sink.start()
        sent = messages(30)
        for m in sent:
            assert sink.offer(m)
        wait_until(lambda: sink.retries >= 5, what="a few failed tries")
        time.sleep(3.0)  # a real outage of several seconds, far past the old ~16 s budget in tries
        assert sink.stats()["spooled"] == 30 and sink.sent == 0 and sink.failed == 0 and sink.dropped == 0
        hook.up()
        wait_until(lambda: sink.sent == 30, what="all delivered")
        sink.close()
    assert sorted(hook.events) == sorted(m["event_id"] for m in sent)
    assert hook.ids_sent() == [m["event_id"] for m in sent]  # in order, each once: nothing acknowledged was re-sent
    assert len(lines(log, "delivery failing")) == 1 and len(lines(log, "delivering again")) == 1
    assert not any(sink.spool.folder.glob("*.json"))  # removed once acknowledged


def test_an_outage_across_a_restart_delivers_every_event_exactly_once(tmp_path):
    """The issue's case: the receiver down for the whole time (real closed socket), the sink closed with its messages
    unacknowledged and a new one started on the same spool (a process restart), then the receiver back."""
    log: list[str] = []
    backoff = FAST if OUTAGE_S <= 10 else {}
    t_down = time.monotonic()
    with Receiver() as hook:
        first = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **backoff)
        first.start()
        before = messages(12)
        for m in before:
            first.offer(m)
        wait_until(lambda: first.retries >= 3, timeout=OUTAGE_S + 60, what="failed tries")
        time.sleep(max(0.0, t_down + OUTAGE_S / 2 - time.monotonic()))
        first.close(drain_s=1.0)
        assert first.left == 12 and first.sent == 0 and first.dropped == 0
        assert "12 kept in" in first.summary() and "for the next start" in first.summary()

        second = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **backoff)
        second.start()
        assert second.inherited == 12
        after = messages(8, start=12)
        for m in after:
            second.offer(m)
        time.sleep(max(0.0, t_down + OUTAGE_S - time.monotonic()))  # still down after the restart
        assert second.sent == 0 and second.retries >= 1
        hook.up()
        wait_until(lambda: second.sent == 20, timeout=90, what="everything delivered after the restart")
        second.close()
    expected = [m["event_id"] for m in before + after]
    assert sorted(hook.events) == sorted(expected)
    assert sorted(hook.ids_sent()) == sorted(expected)  # exactly once each
    assert lines(log, "12 messages left by an earlier run")


def test_a_killed_process_leaves_its_spool_and_the_next_start_sends_it(tmp_path):
    """A real crash: a child process spools messages for a dead receiver and is killed with SIGKILL."""
    hook = Receiver()
    code = (
        "import sys, time\n"
        "from adtr_deploy.runtime.serve.webhook import WebhookSink\n"
        f"sink = WebhookSink({hook.url!r}, spool_root={str(tmp_path)!r}, backoff_s=0.05, backoff_max_s=0.2, log=lambda m: None)\n"
        "sink.start()\n"
        "for i in range(15): sink.offer({'event_id': f'k{i}', 'frame': i})\n"
        "while sink.stats()['spooled'] < 15: time.sleep(0.01)\n"
        "print('spooled', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spooled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with hook.up():
        sink = WebhookSink(hook.url, spool_root=tmp_path, log=lambda m: None, **FAST)
        sink.start()  # the dead process's lock is gone with it
        wait_until(lambda: sink.sent == 15, what="the crashed run's messages delivered")
        sink.close()
    assert sorted(hook.events) == sorted(f"k{i}" for i in range(15))


def test_a_full_spool_drops_new_messages_counts_them_and_logs_once_per_burst(tmp_path):
    log: list[str] = []
    with Receiver() as hook:
        sink = WebhookSink(hook.url, spool_root=tmp_path, max_messages=5, log=log.append, **FAST)
        sink.start()
        for m in messages(20):
            sink.offer(m)
        wait_until(lambda: sink.dropped == 15, what="15 drops")
        assert sink.stats()["spooled"] == 5
        assert len(lines(log, "the spool is full")) == 1  # one line for the burst, not fifteen
        hook.up()
        wait_until(lambda: sink.sent == 5, what="the spooled five delivered")
        for m in messages(3, start=100):
            sink.offer(m)
        wait_until(lambda: sink.sent == 8, what="new messages accepted again")
        sink.close()
    assert len(lines(log, "15 were dropped meanwhile")) == 1
    assert sorted(hook.events) == [f"ev-{i:04d}" for i in (0, 1, 2, 3, 4, 100, 101, 102)]
    assert sink.stats()["dropped"] == 15 and sink.failed == 0


def test_offer_never_waits_for_the_disk_or_the_receiver(tmp_path):
    with Receiver() as hook:  # down
        sink = WebhookSink(hook.url, spool_root=tmp_path, log=lambda m: None, **FAST)
        sink.start()
        t0 = time.perf_counter()
        accepted = [sink.offer(m) for m in messages(200)]
        elapsed = time.perf_counter() - t0
        wait_until(lambda: sink.stats()["spooled"] == 200, what="200 spooled")
        sink.close(drain_s=0)
    assert all(accepted) and elapsed < 0.5  # no fsync, no socket on the offering thread
    assert sink.left == 200 and sink.dropped == 0


def test_an_answer_that_retrying_cannot_fix_is_counted_failed_removed_and_logged(tmp_path):
    log: list[str] = []
    with Receiver(refuse={"ev-0001"}, moved={"ev-0003"}) as hook:
        hook.up()
        sink = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **FAST)
        sink.start()
        for m in messages(4):
            sink.offer(m)
        wait_until(lambda: sink.sent + sink.failed == 4, what="four answers")
        sink.close()
    assert sink.sent == 2 and sink.failed == 2 and sink.retries == 0
    assert sorted(hook.events) == ["ev-0000", "ev-0002"] and len(hook.requests) == 4  # the redirect was not followed
    assert lines(log, "event ev-0001 refused (HTTP 400")
    assert lines(log, "event ev-0003 refused (HTTP 302 Found") and lines(log, "to /elsewhere; give that URL")
    assert not any(sink.spool.folder.glob("*.json"))


def test_a_damaged_spool_file_is_skipped_with_a_log_line_and_a_torn_write_is_discarded(tmp_path):
    log: list[str] = []
    with Receiver() as hook:
        first = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **FAST)
        first.start()
        for m in messages(3):
            first.offer(m)
        wait_until(lambda: first.stats()["spooled"] == 3, what="spooled")
        first.close(drain_s=0)
        folder = first.spool.folder
        files = sorted(folder.glob("*.json"))
        files[1].write_bytes(b'{"event_id": "ev-0001", "fra')  # damaged by something else
        (folder / ".000000000004.json.tmp-999").write_bytes(b'{"half')  # a write a crash cut short
        hook.up()
        second = WebhookSink(hook.url, spool_root=tmp_path, log=log.append, **FAST)
        second.start()
        wait_until(lambda: second.sent == 2, what="the two good messages")
        second.close()
    assert sorted(hook.events) == ["ev-0000", "ev-0002"]
    assert len(lines(log, "is not a JSON message with an event_id; skipped")) == 1
    assert (folder / files[1].with_suffix(".corrupt").name).exists() and not list(folder.glob(".*.tmp-*"))


def test_two_processes_cannot_send_from_one_spool(tmp_path):
    a = WebhookSink("http://127.0.0.1:9/hook", spool_root=tmp_path, log=lambda m: None)
    a.start()
    try:
        b = WebhookSink("http://127.0.0.1:9/hook", spool_root=tmp_path, log=lambda m: None)
        with pytest.raises(ValueError, match="in use by another adtr-run"):
            b.start()
    finally:
        a.close(drain_s=0)


# -- messages, authentication, secrets ------------------------------------------------------------------------------------


def test_messages_are_strict_json_with_event_id_line_threshold_iso_time_model_and_overlay(tmp_path):
    model = {"name": "export/model.onnx", "sha256": "ab" * 32, "threshold": 0.25}
    with Receiver() as hook:
        hook.up()
        sink = WebhookSink(hook.url, spool_root=tmp_path / "spool", log=lambda m: None, **FAST)
        sink.start()
        observe = sink_observer([sink], model, line="line 3", out_dir=tmp_path)
        record = {"source": "cam", "frame": 7, "timestamp": 1.5, "score": float("nan"), "normalized_score": 0.9}
        observe({**record, "is_anomaly": True, "overlay": "overlays/cam_7.jpg", "run": "r1"}, None, 1.0)
        observe({**record, "frame": 8, "is_anomaly": False}, None, 1.0)  # not an anomaly: not sent
        observe({**record, "frame": 9, "is_anomaly": True, "run": "r1"}, None, 1.0)
        wait_until(lambda: sink.sent == 2, what="two messages")
        sink.close()
    first, second = (strict_loads(body) for _, body in hook.requests)  # strict_loads refuses NaN
    assert first["score"] is None and first["normalized_score"] == 0.9  # NaN became null
    assert first["line"] == "line 3" and first["threshold"] == 0.25 and first["model"]["sha256"] == "ab" * 32
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert first["overlay_path"] == str((tmp_path / "overlays/cam_7.jpg").resolve())
    assert first["event_id"] != second["event_id"] and "overlay_path" not in second
    # The id is fixed by the record (run, source, frame, timestamp): a receiver can dedupe a record sent twice.
    again = []
    sink_observer([type("S", (), {"offer": lambda self, m: again.append(m)})()], model)(
        {**record, "is_anomaly": True, "run": "r1"}, None, 1.0
    )
    assert again[0]["event_id"] == first["event_id"] and again[0]["line"] == "cam"  # default line: the source
    headers = hook.requests[0][0]
    assert headers["Idempotency-Key"] == headers["X-Event-Id"] == first["event_id"]


def test_webhook_bearer_token_and_hmac_signature_verify_on_the_receiver(tmp_path):
    with Receiver(secret="hmac-key-1") as hook:
        hook.up()
        sink = parse_sink(hook.url, token="tok-1", secret="hmac-key-1", spool_root=tmp_path, log=lambda m: None)
        sink.start()
        for m in messages(3):
            sink.offer(m)
        wait_until(lambda: sink.sent == 3, what="three delivered")
        sink.close()
        other = parse_sink(hook.url, secret="another-key", spool_root=tmp_path / "b", log=lambda m: None)
        other.start()
        other.offer(messages(1)[0])
        wait_until(lambda: other.sent == 1, what="one delivered")
        other.close()
    assert all(h["Authorization"] == "Bearer tok-1" for h, _ in hook.requests[:3])
    assert all(abs(int(h["X-ADTR-Timestamp"]) - time.time()) < 600 for h, _ in hook.requests)
    assert hook.bad_signatures == 1  # only the message signed with the wrong key fails the receiver's check
    assert "Authorization" not in hook.requests[3][0]
    # The verification snippet docs/runtime.md gives receivers agrees.
    doc = (Path(__file__).parent.parent / "docs" / "runtime.md").read_text()
    snippet = next(block for block in doc.split("```python\n")[1:] if "def verify(" in block).split("```")[0]
    scope: dict = {}
    exec(snippet, scope)
    assert [scope["verify"](b"hmac-key-1", h, body) for h, body in hook.requests] == [True, True, True, False]


def test_secrets_are_never_in_stats_summaries_or_logs(tmp_path):
    log: list[str] = []
    with Receiver() as hook:  # down, so errors (which name the target) are logged too
        url = hook.url.replace("http://", "http://alice:pw-S3CRET@") + "?token=qs-S3CRET"
        sink = parse_sink(f"webhook:{url}", secret="hmac-S3CRET", spool_root=tmp_path, log=log.append, **FAST)
        sink.start()
        sink.offer(messages(1)[0])
        wait_until(lambda: sink.retries >= 2, what="failed tries")
        sink.close(drain_s=0.2)
    shown = json.dumps(sink.stats()) + sink.summary() + "\n".join(log) + (sink.spool.folder / "sink.txt").read_text()
    assert "S3CRET" not in shown and "alice:***@" in sink.name and "token=***" in sink.name
    with pytest.raises(ValueError) as refused:
        parse_sink("ftp://bob:pw-S3CRET@host/x")
    assert "S3CRET" not in str(refused.value) and "bob:***@" in str(refused.value)


# -- through the real CLI -------------------------------------------------------------------------------------------------


def run_cli(*args) -> subprocess.CompletedProcess:
    """adtr-run in a process of its own (a restart is a new process), torch-free as on a camera box."""
    cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)


def anomalies_in(out: Path) -> list[dict]:
    records = []
    for path in sorted(out.glob("results*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["is_anomaly"]]


def test_cli_receiver_down_at_first_then_a_restart_delivers_every_anomaly_exactly_once(model_path, tmp_path):
    images = tmp_path / "images"
    rf.write_images(images, 12, seed=5)
    out = tmp_path / "out"
    with Receiver() as hook:  # down during the whole first run
        args = ["--model", model_path, "--source", images, "--out", out, "--sink", hook.url, "--line", "line 3"]
        first = run_cli(*args, "--save-overlays")
        assert first.returncode == 0, first.stderr
        anomalies = anomalies_in(out)
        assert anomalies, "the tiny model's threshold splits these images: some must be anomalous"
        n = len(anomalies)
        assert f"0 sent, 0 dropped, 0 failed, {n} kept in {out / 'spool'}" in first.stderr
        assert len(list((out / "spool").glob("webhook-*/*.json"))) == n
        hook.up()
        second = run_cli(*args, "--resume")  # the restart: every image already recorded, the spool still to send
        assert second.returncode == 0, second.stderr
        assert f"{n} messages left by an earlier run" in second.stderr and f"{n} sent, 0 dropped" in second.stderr
    assert len(hook.requests) == len(hook.events) == n  # exactly once each
    got = sorted(hook.events.values(), key=lambda m: (m["source"], m["frame"]))
    for message, record in zip(got, sorted(anomalies, key=lambda r: (r["source"], r["frame"])), strict=True):
        assert {k: message[k] for k in record} == record  # the very record of results.jsonl
        assert message["line"] == "line 3" and message["overlay_path"] == str((out / record["overlay"]).resolve())
        assert Path(message["overlay_path"]).is_file() and message["threshold"] == rf.calibration().threshold


def test_cli_webhook_that_comes_up_during_the_run_gets_every_anomaly(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 40, fps=25.0)
    out = tmp_path / "out"
    with Receiver() as hook:
        timer = threading.Timer(1.0, hook.up)  # down when the run starts, up a second later
        timer.start()
        result = CliRunner().invoke(
            command,
            [str(a) for a in ["--model", model_path, "--source", clip, "--out", out, "--sink", f"webhook:{hook.url}"]],
        )
        timer.join()
    assert result.exit_code == 0, result.output
    anomalies = anomalies_in(out)
    assert anomalies and sorted(m["frame"] for m in hook.events.values()) == [r["frame"] for r in anomalies]
    assert f"{len(anomalies)} sent, 0 dropped, 0 failed" in result.output


def test_a_sink_that_is_not_understood_is_one_clear_sentence(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 2, fps=25.0)
    for sink, message in (
        ("ftp://host/x", "is not understood; use webhook:http://HOST/PATH or mqtt://HOST[:PORT]/TOPIC"),
        ("webhook:host/x", "needs an http:// or https:// URL"),
        ("mqtt://127.0.0.1:1883", "has no topic"),
        ("mqtt://127.0.0.1/a/#", "wildcards"),
        ("mqtt://127.0.0.1/a/+/b", "wildcards"),
        ("mqtts://127.0.0.1/a?ca=/nonexistent/ca.pem", "the CA file /nonexistent/ca.pem does not exist"),
        ("mqtt://127.0.0.1/a?qos=2", "unknown option 'qos'"),
    ):
        out = tmp_path / "out"
        result = CliRunner().invoke(
            command, ["--model", str(model_path), "--source", str(clip), "--out", str(out), "--sink", sink]
        )
        assert result.exit_code == 1 and message in result.output and not out.exists(), result.output


def test_served_run_never_shows_sink_secrets_in_metrics_status_or_log(model_path, tmp_path):
    pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
    clip = tmp_path / "line.avi"
    write_video(clip, 20, fps=25.0)
    env = {**os.environ, "ADTR_SINK_SECRET": "hmac-S3CRET"}
    hook = Receiver().up()
    url = hook.url.replace("http://", "http://alice:pw-S3CRET@") + "?token=qs-S3CRET"
    try:
        with ServedRun(
            "--model",
            model_path,
            "--source",
            clip,
            "--out",
            tmp_path / "out",
            "--serve",
            "127.0.0.1:0",
            "--serve-linger",
            "60",
            "--sink",
            url,
            env=env,
        ) as run:
            run.wait_for(lambda s: s["state"] == "finished", what="the run to finish")
            shown = [get(run.url + path)[2].decode() for path in ("metrics", "api/status", "")]
        shown.append(run.log)
    finally:
        hook.down()
    assert "alice:***@" in shown[1]  # the sink is listed, masked
    assert 'adtr_sink_spooled{sink="webhook:http://alice:***@127.0.0.1:' in shown[0]  # the spool's depth, a gauge
    assert not any("S3CRET" in text for text in shown)


# -- MQTT -----------------------------------------------------------------------------------------------------------------


class Broker:
    """A real mosquitto: a plain listener, optionally a TLS one (self-signed CA made with openssl) and passwords."""

    def __init__(self, folder: Path, *, tls: bool = False, users: dict | None = None):
        self.folder = folder
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        # `user`: stay this user (mosquitto started as root would switch to "mosquitto", who cannot read tmp_path)
        conf = [f"listener {self.port} 127.0.0.1", "persistence false", f"user {getpass.getuser()}"]
        if users:
            pwfile = folder / "passwords"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
            conf += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            conf.append("allow_anonymous true")
        if tls:
            self.ca = make_certificates(folder)
            conf += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.ca}",
                f"certfile {folder / 'server.pem'}",
                f"keyfile {folder / 'server.key'}",
            ]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc = None

    def __enter__(self) -> Broker:
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stderr=subprocess.PIPE)
        import socket

        def listening():
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_until(listening, timeout=20, what="mosquitto listening")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def subscribe(self, topic: str, auth: tuple[str, str] | None = None) -> list:
        """Every (topic, payload, retained) on `topic` and `topic/status`, gathered by a connected paho client."""
        import paho.mqtt.client as mqtt

        got: list = []
        ready = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"adtr-test-{free_port()}")
        if auth:
            client.username_pw_set(*auth)
        client.on_connect = lambda c, u, f, rc, p=None: c.subscribe([(topic, 1), (f"{topic}/status", 1)])
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = lambda c, u, msg: got.append((msg.topic, msg.payload, msg.retain))
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert ready.wait(10), "the test subscriber could not subscribe"
        return got


def make_certificates(folder: Path) -> Path:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it (openssl CLI); returns the CA file."""

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=adtr test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return folder / "ca.pem"


def payloads(got: list, topic: str) -> list:
    return [(p, r) for t, p, r in got if t == topic]


@needs_mosquitto
def test_mqtt_sink_publishes_each_anomaly_once_from_a_broker_down_at_first(tmp_path):
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed: pip install 'adtr-deploy[serve]'")
    broker = Broker(tmp_path)
    sink = parse_sink(
        f"mqtt://127.0.0.1:{broker.port}/factory/line1/anomalies", spool_root=tmp_path, log=lambda m: None, **FAST
    )
    sink.start()  # nothing listens yet
    sent = messages(10)
    for m in sent:
        sink.offer(m)
    time.sleep(2.0)
    assert sink.sent == 0 and sink.stats()["spooled"] == 10
    with broker:
        got = broker.subscribe("factory/line1/anomalies")
        wait_until(lambda: sink.sent == 10, what="ten published")
        wait_until(lambda: len(payloads(got, "factory/line1/anomalies")) == 10, what="ten received")
        sink.close()
        wait_until(
            lambda: [p for p, _ in payloads(got, "factory/line1/anomalies/status")][-1:] == [b"offline"], what="offline"
        )
    ids = [json.loads(p)["event_id"] for p, _ in payloads(got, "factory/line1/anomalies")]
    assert sorted(set(ids)) == sorted(m["event_id"] for m in sent)
    assert b"online" in [p for p, _ in payloads(got, "factory/line1/anomalies/status")]


@needs_mosquitto
def test_mqtt_last_will_says_offline_when_the_process_dies(tmp_path):
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed: pip install 'adtr-deploy[serve]'")
    with Broker(tmp_path) as broker:
        code = (
            "import time\n"
            "from adtr_deploy.runtime.serve.sinks import parse_sink\n"
            f"s = parse_sink('mqtt://127.0.0.1:{broker.port}/line9/alerts?status=line9/state', log=print)\n"
            "s.start()\n"
            "while not s._connected.is_set(): time.sleep(0.01)\n"
            "print('connected', flush=True)\n"
            "time.sleep(600)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "connected"
            got = broker.subscribe("line9/state")  # subscribed after "online": it arrives as the retained state
            wait_until(lambda: (b"online", True) in payloads(got, "line9/state"), what="retained online")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        wait_until(
            lambda: [p for p, _ in payloads(got, "line9/state")][-1:] == [b"offline"], what="the last will", timeout=60
        )


@needs_mosquitto
def test_mqtt_over_tls_with_credentials_from_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed: pip install 'adtr-deploy[serve]'")
    users = {"line3": "pw-S3CRET", "reader": "r"}
    with Broker(tmp_path, tls=True, users=users) as broker:
        got = broker.subscribe("plant/line3", auth=("reader", "r"))
        monkeypatch.setenv("ADTR_MQTT_USERNAME", "line3")
        monkeypatch.setenv("ADTR_MQTT_PASSWORD", "pw-S3CRET")
        log: list[str] = []
        sink = parse_sink(
            f"mqtts://127.0.0.1:{broker.tls_port}/plant/line3?ca={broker.ca}",
            spool_root=tmp_path,
            log=log.append,
            **FAST,
        )
        assert sink.tls and sink.port == broker.tls_port
        sink.start()
        for m in messages(3):
            sink.offer(m)
        wait_until(lambda: sink.sent == 3, what="three published over TLS")
        sink.close()
        monkeypatch.setenv("ADTR_MQTT_PASSWORD", "wrong")
        refused = parse_sink(
            f"mqtts://127.0.0.1:{broker.tls_port}/plant/line3?ca={broker.ca}",
            spool_root=tmp_path / "b",
            log=log.append,
            **FAST,
        )
        refused.start()
        refused.offer(messages(1)[0])
        wait_until(lambda: refused.retries >= 1, what="a refused try")
        refused.close(drain_s=0)
    assert len(payloads(got, "plant/line3")) == 3 and refused.sent == 0 and refused.left == 1
    assert "refused the connection" in refused.stats()["last_error"]
    assert "S3CRET" not in json.dumps(sink.stats()) + "\n".join(log)
