"""Alert sinks: one JSON message per anomaly to a webhook (HTTP POST) or an MQTT topic, next to results.jsonl.

Each sink owns a bounded queue and one sender thread. `offer()` never blocks the inference thread: when the queue is
full (the receiver is down or slow for long), the record is dropped and counted. Failed deliveries are retried with
exponential backoff; a record that still fails after MAX_ATTEMPTS counts as failed and the next one is tried.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from adtr_deploy.errors import MissingExtraError, UserError

QUEUE_SIZE = 1000
MAX_ATTEMPTS = 6
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 30.0
SEND_TIMEOUT_S = 5.0


class SinkError(Exception):
    """A delivery that failed; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class Sink:
    """Base: a bounded queue drained by one thread that calls `send(message)` with retries and backoff."""

    kind = "sink"

    def __init__(self, target: str, *, queue_size: int = QUEUE_SIZE, backoff_s: float = BACKOFF_START_S):
        self.target = target
        self.name = f"{self.kind}:{target}"
        self.queue: queue.Queue[dict] = queue.Queue(maxsize=queue_size)
        self.backoff_s = backoff_s
        self.sent = self.dropped = self.failed = self.retries = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"adtr-sink-{self.kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, message: dict) -> bool:
        """Queue a message without blocking; False (and counted as dropped) when the queue is full."""
        try:
            self.queue.put_nowait(message)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def send(self, message: dict) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._deliver(message)
            self.queue.task_done()

    def _deliver(self, message: dict) -> None:
        delay = self.backoff_s
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self.send(message)
                self.sent += 1
                return
            except SinkError as exc:
                self.last_error = str(exc)
                if not exc.retry or attempt == MAX_ATTEMPTS or self._stop.wait(delay):
                    break
                self.retries += 1
                delay = min(delay * 2, BACKOFF_MAX_S)
        self.failed += 1

    def close(self, drain_s: float = 5.0) -> None:
        """Give the queue up to drain_s seconds to empty, then stop; what is left counts as dropped."""
        deadline = time.monotonic() + drain_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SEND_TIMEOUT_S + 1)
        self.dropped += self.queue.qsize()

    def stats(self) -> dict:
        return {
            "name": self.name,
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "retries": self.retries,
            "queued": self.queue.qsize(),
            "last_error": self.last_error,
        }


class WebhookSink(Sink):
    """POST each message as JSON to a URL; any 2xx is a success, 5xx / 408 / 429 / network errors are retried."""

    kind = "webhook"

    def send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        request = urllib.request.Request(
            self.target, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise SinkError(
                f"HTTP {exc.code} from {self.target}", retry=exc.code >= 500 or exc.code in (408, 429)
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SinkError(f"{self.target}: {getattr(exc, 'reason', exc)}") from None


class MqttSink(Sink):
    """Publish each message as JSON (QoS 1) to mqtt://HOST[:PORT]/TOPIC with paho-mqtt, which reconnects by itself."""

    kind = "mqtt"

    def __init__(self, target: str, **kw):
        super().__init__(target, **kw)
        parsed = urllib.parse.urlsplit(target)
        self.host, self.port = parsed.hostname or "localhost", parsed.port or 1883
        self.topic = parsed.path.lstrip("/")
        if not self.topic:
            raise UserError(f"--sink {target} has no topic; write mqtt://HOST[:PORT]/TOPIC")
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise MissingExtraError("--sink mqtt:// needs paho-mqtt: pip install 'adtr-deploy[serve]'") from None
        self._mqtt = mqtt
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"adtr-run-{id(self):x}")
        if parsed.username:
            self.client.username_pw_set(parsed.username, parsed.password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_MAX_S))

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        super().start()

    def send(self, message: dict) -> None:
        if not self.client.is_connected():
            raise SinkError(f"not connected to the MQTT broker {self.host}:{self.port}")
        info = self.client.publish(self.topic, json.dumps(message), qos=1)
        try:
            info.wait_for_publish(timeout=SEND_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise SinkError(f"MQTT publish to {self.host}:{self.port} failed: {exc}") from None
        if not info.is_published():
            raise SinkError(f"MQTT publish to {self.host}:{self.port}/{self.topic} was not acknowledged")

    def close(self, drain_s: float = 5.0) -> None:
        super().close(drain_s)
        self.client.disconnect()
        self.client.loop_stop()


def parse_sink(text: str) -> Sink:
    """`webhook:URL` or `mqtt://HOST[:PORT]/TOPIC` -> a Sink (not started)."""
    if text.startswith("webhook:"):
        url = text[len("webhook:") :]
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise UserError(
                f"--sink {text}: the webhook needs an http:// or https:// URL, e.g. webhook:http://host/hook"
            )
        return WebhookSink(url)
    if text.startswith("mqtt://"):
        return MqttSink(text)
    raise UserError(f"--sink {text} is not understood; use webhook:http://HOST/PATH or mqtt://HOST[:PORT]/TOPIC")


def sink_observer(sinks: list[Sink], model: dict) -> Callable:
    """A pipeline observer that offers every anomalous record, with the model's identity, to every sink. `model` is
    read at each anomaly: the service fills it in once the model is loaded."""

    def observe(record: dict, picture, infer_ms) -> None:
        if record.get("is_anomaly"):
            identity = {k: model.get(k) for k in ("name", "sha256")}
            message = {"event": "anomaly", **record, "model": identity, "time": time.time()}
            for sink in sinks:
                sink.offer(message)

    return observe
