"""Alert sinks: one JSON message per anomaly to a webhook (HTTP POST) or an MQTT topic, delivered at least once.

Path of a message: `offer()` (inference thread) only puts the dict in a small in-memory hand-off queue and returns;
the sink's spool thread encodes it (strict JSON) and writes it to the sink's spool on disk (`spool.Spool`, one file
per message, flushed and renamed into place); the sink's sender thread sends the oldest spooled message until the
receiver acknowledges it (HTTP 2xx; MQTT QoS 1 PUBACK) and only then removes it. While the receiver is down the sender
retries with exponential backoff capped at `backoff_max_s` and never gives up; messages wait in the spool, which
survives a restart of the process (the next start sends them first). Only a full spool (or a full hand-off queue)
drops a message: counted, and logged once per burst. An answer that retrying cannot fix (HTTP 4xx other than 408/429)
counts as failed and the message is removed, with a log line naming the reason.

Every message carries an `event_id` (a UUID fixed when the record is offered, stored in the spool, sent again
unchanged on every retry and after a restart), so a receiver deduplicates by it; webhooks also get it as the headers
`Idempotency-Key` and `X-Event-Id`. Names shown anywhere (stats, /metrics, logs) go through `redact_url`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from adtr_deploy.errors import MissingExtraError, UserError
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.serve.spool import MAX_BYTES, MAX_MESSAGES, Spool

QUEUE_SIZE = 1000  # the in-memory hand-off between the inference thread and the spool thread
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 30.0
SEND_TIMEOUT_S = 5.0
DRAIN_S = 5.0
DRAIN_RETRY_S = 0.5  # while close() drains, retries come at least this often
MQTT_USER_ENV, MQTT_PASSWORD_ENV = "ADTR_MQTT_USERNAME", "ADTR_MQTT_PASSWORD"
EVENT_NAMESPACE = uuid.UUID("5d1f6a1e-7c1b-4d0e-9a4f-adb2e1a7f001")  # for event ids derived from a record


class SinkError(Exception):
    """A delivery that failed; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


def strict(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, so it encodes as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def encode(message: dict) -> bytes:
    return json.dumps(strict(message), allow_nan=False, default=str, separators=(",", ":")).encode()


class Sink:
    """Base: hand-off queue -> spool thread -> spool on disk -> sender thread calling `send(body, event_id)`."""

    kind = "sink"

    def __init__(
        self,
        target: str,
        *,
        spool_root: Path | str | None = None,
        max_messages: int = MAX_MESSAGES,
        max_bytes: int = MAX_BYTES,
        queue_size: int = QUEUE_SIZE,
        backoff_s: float = BACKOFF_START_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        log: Callable[[str], None] = print,
    ):
        self.target = target  # may hold credentials: never shown; `name` is what stats and logs show
        self.name = f"{self.kind}:{redact_url(target)}"
        # One folder per sink under the spool root, named from the shown name: a changed password keeps its spool.
        self.id = f"{self.kind}-{hashlib.sha256(self.name.encode()).hexdigest()[:12]}"
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_max_s, backoff_s)
        self.log = log
        self.spool = Spool(
            None if spool_root is None else Path(spool_root) / self.id,
            max_messages=max_messages,
            max_bytes=max_bytes,
            log=log,
            label=self.name,
        )
        self.inbox: queue.Queue[dict] = queue.Queue(maxsize=queue_size)
        self.sent = self.dropped = self.failed = self.retries = 0
        self.inherited = 0  # messages an earlier run left in the spool
        self.left = 0  # messages still in the spool when closed (sent at the next start)
        self.last_error: str | None = None
        self._counts = threading.Lock()
        self._burst = 0  # drops since the last accepted message (one log line per burst)
        self._failing_since: float | None = None
        self._started = self._closed = self._draining = False
        self._stop = threading.Event()  # the sender stops
        self._writer_stop = threading.Event()  # the spool thread stops once the hand-off queue is empty
        self._hurry = threading.Event()  # cut one backoff wait short (close: one more try now)
        self._new = threading.Event()  # something was spooled
        self._writer = threading.Thread(target=self._spool_loop, name=f"adtr-sink-{self.kind}-spool", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"adtr-sink-{self.kind}-send", daemon=True)

    # -- inference side ----------------------------------------------------------------------------------------------
    def offer(self, message: dict) -> bool:
        """Hand a message over without blocking; False (counted as dropped) when the hand-off queue is full."""
        try:
            self.inbox.put_nowait(message)
            return True
        except queue.Full:
            self._drop("the hand-off queue to the spool is full (the disk is too slow?)")
            return False

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the spool (messages an earlier run left are sent first) and start the spool and sender threads."""
        self.inherited = self.spool.open()
        if self.inherited:
            self.log(
                f"{self.name}: {self.inherited} messages left by an earlier run in {self.spool.folder}; sent first"
            )
        self._started = True
        self._writer.start()
        self._sender.start()

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Spool what was offered, give the receiver up to drain_s seconds to take the spool, then stop. What is left
        stays in the spool folder for the next start (with no folder it is lost, and counted as dropped)."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        self._writer_stop.set()
        self._writer.join(timeout=drain_s + SEND_TIMEOUT_S)
        self._draining = True  # tries at most DRAIN_RETRY_S apart from now on, rather than up to backoff_max_s
        self._hurry.set()  # and one more try now rather than at the end of a long backoff
        self._new.set()
        deadline = time.monotonic() + drain_s
        while len(self.spool) and self._sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._hurry.set()
        self._sender.join(timeout=SEND_TIMEOUT_S + 1)
        unspooled = self.inbox.qsize()  # only when the disk hung: never written
        self.left = len(self.spool)
        with self._counts:
            self.dropped += unspooled + (self.left if self.spool.folder is None else 0)
        if self.spool.folder is None:
            self.left = 0
        self.spool.close()

    # -- spool thread ------------------------------------------------------------------------------------------------
    def _spool_loop(self) -> None:
        while True:
            try:
                message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                if self._writer_stop.is_set():
                    return
                continue
            self._store(message)

    def _store(self, message: dict) -> None:
        body = encode(message)
        try:
            stored = self.spool.put(body)
        except OSError as exc:
            self._drop(f"cannot write the spool {self.spool.folder} ({exc.strerror or exc})")
            return
        if not stored:
            limit = f"{self.spool.max_messages} messages or {self.spool.max_bytes / 2**20:g} MB"
            self._drop(f"the spool is full ({limit})")
            return
        with self._counts:
            burst, self._burst = self._burst, 0
        if burst:
            self.log(f"{self.name}: the spool takes messages again; {burst} were dropped meanwhile")
        self._new.set()

    def _drop(self, why: str) -> None:
        with self._counts:
            self.dropped += 1
            self._burst += 1
            first = self._burst == 1
        if first:
            self.log(f"{self.name}: {why}: new anomalies are dropped (and counted) until there is room again")

    # -- sender thread -----------------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        delay = self.backoff_s
        while not self._stop.is_set():
            entry = self.spool.head()
            if entry is None:
                self._new.wait(0.2)
                self._new.clear()
                continue
            seq, body, event_id = entry
            exc = self._attempt(body, event_id)
            if exc is not None:
                self.last_error = str(exc)
                if not exc.retry:
                    self.spool.remove(seq)
                    self.failed += 1
                    self.log(f"{self.name}: event {event_id} refused ({exc}); not retried, removed from the spool")
                    continue
                self.retries += 1
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    self.log(
                        f"{self.name}: delivery failing ({exc}); retrying with backoff up to {self.backoff_max_s:g} s, "
                        f"anomalies wait in the spool"
                    )
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            self.spool.remove(seq)
            self.sent += 1
            delay = self.backoff_s
            if self._failing_since is not None:
                down = time.monotonic() - self._failing_since
                self._failing_since = None
                self.log(f"{self.name}: delivering again after {down:.0f} s; {len(self.spool)} messages still spooled")

    def _attempt(self, body: bytes, event_id: str) -> SinkError | None:
        try:
            self.send(body, event_id)
        except SinkError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 -- a surprise from a client library must not end the sender thread
            return SinkError(f"{type(exc).__name__}: {exc}")
        return None

    def _sleep(self, seconds: float) -> None:
        if self._draining:
            seconds = min(seconds, DRAIN_RETRY_S)
        if not self._stop.is_set() and self._hurry.wait(seconds):
            self._hurry.clear()

    def send(self, body: bytes, event_id: str) -> None:
        """Deliver one encoded message; return only once the receiver acknowledged it, else raise SinkError."""
        raise NotImplementedError

    # -- reporting ---------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "name": self.name,
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "retries": self.retries,
            "queued": self.inbox.qsize() + len(self.spool),
            "spooled": len(self.spool),
            "spool": None if self.spool.folder is None else str(self.spool.folder),
            "failing_s": None if self._failing_since is None else round(time.monotonic() - self._failing_since, 1),
            "last_error": self.last_error,
        }

    def summary(self) -> str:
        """One line for the log at the end of the run."""
        line = f"{self.name}: {self.sent} sent, {self.dropped} dropped, {self.failed} failed"
        if self.left:
            line += f", {self.left} kept in {self.spool.folder} for the next start"
        if (self.failed or self.left) and self.last_error:
            line += f" (last error: {self.last_error})"
        return line


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302 by a GET without the body, and its 2xx would look like a delivery."""

    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx is raised as an HTTPError: not delivered, not retried, logged with where it points


_OPENER = urllib.request.build_opener(_NoRedirect)


class WebhookSink(Sink):
    """POST each message as JSON to a URL; any 2xx acknowledges it, 5xx / 408 / 429 / network errors are retried.

    `token`: header `Authorization: Bearer TOKEN`. `secret`: headers `X-ADTR-Timestamp: UNIX_SECONDS` and
    `X-ADTR-Signature: sha256=HEX`, HEX = HMAC-SHA256(secret, TIMESTAMP + "." + body). `user:password@` in the URL is
    sent as HTTP Basic auth instead (and never shown)."""

    kind = "webhook"

    def __init__(self, target: str, *, token: str | None = None, secret: str | None = None, **kw):
        super().__init__(target, **kw)
        parts = urllib.parse.urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--sink {self.name}: the webhook needs an http:// or https:// URL, e.g. http://host/hook")
        self._auth = f"Bearer {token}" if token else None
        self.url = target
        if parts.username is not None:
            if token:
                raise UserError(f"--sink {self.name}: give either user:password@ in the URL or --sink-token, not both")
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            self.url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self._secret = secret.encode() if secret else None
        self._shown = redact_url(self.url)

    def headers(self, body: bytes, event_id: str) -> dict:
        headers = {"Content-Type": "application/json", "Idempotency-Key": event_id, "X-Event-Id": event_id}
        if self._auth:
            headers["Authorization"] = self._auth
        if self._secret:
            stamp = str(int(time.time()))
            digest = hmac.new(self._secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers.update({"X-ADTR-Timestamp": stamp, "X-ADTR-Signature": f"sha256={digest}"})
        return headers

    def send(self, body: bytes, event_id: str) -> None:
        request = urllib.request.Request(self.url, data=body, method="POST", headers=self.headers(body, event_id))
        try:
            with _OPENER.open(request, timeout=SEND_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            retry = exc.code >= 500 or exc.code in (408, 429)
            moved = (
                f" to {redact_url(exc.headers.get('Location', '?'))}; give that URL" if 300 <= exc.code < 400 else ""
            )
            raise SinkError(f"HTTP {exc.code} {exc.reason} from {self._shown}{moved}", retry=retry) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise SinkError(f"{self._shown}: {getattr(exc, 'reason', None) or exc}") from None


class MqttSink(Sink):
    """Publish each message as JSON with QoS 1 to mqtt[s]://[USER:PASSWORD@]HOST[:PORT]/TOPIC[?ca=FILE&status=TOPIC].

    mqtts:// (or `ca=`) switches TLS on (the system's CAs, or FILE); credentials come from the URL or the environment
    (ADTR_MQTT_USERNAME, ADTR_MQTT_PASSWORD). The status topic (default TOPIC/status) holds a retained "online" while
    connected and "offline" after (the broker publishes the retained last will when the process dies). paho-mqtt
    reconnects by itself; a message counts as sent when the broker acknowledged it (PUBACK)."""

    kind = "mqtt"

    def __init__(self, target: str, **kw):
        super().__init__(target, **kw)
        parts = urllib.parse.urlsplit(target)
        options = dict(urllib.parse.parse_qsl(parts.query))
        unknown = sorted(set(options) - {"ca", "status"})
        if unknown:
            raise UserError(
                f"--sink {self.name}: unknown option {unknown[0]!r}; the URL takes ?ca=FILE and ?status=TOPIC"
            )
        ca = options.get("ca")
        self.tls = parts.scheme == "mqtts" or ca is not None
        self.host = parts.hostname or "localhost"
        try:
            self.port = parts.port or (8883 if self.tls else 1883)
        except ValueError:
            raise UserError(f"--sink {self.name}: the port is not a number") from None
        self.topic = parts.path.lstrip("/")
        self.status_topic = options.get("status") or f"{self.topic}/status"
        if not self.topic:
            raise UserError(f"--sink {self.name} has no topic; write mqtt://HOST[:PORT]/TOPIC")
        if any(c in self.topic + self.status_topic for c in "+#") or parts.fragment or target.endswith("#"):
            raise UserError(f"--sink {self.name}: MQTT wildcards (+, #) cannot be published to; name one topic")
        if ca is not None and not Path(ca).is_file():
            raise UserError(f"--sink {self.name}: the CA file {ca} does not exist; give the broker's CA certificate")
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise MissingExtraError("--sink mqtt:// needs paho-mqtt: pip install 'adtr-deploy[serve]'") from None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"adtr-run-{uuid.uuid4().hex[:12]}")
        user = urllib.parse.unquote(parts.username) if parts.username else os.environ.get(MQTT_USER_ENV)
        password = urllib.parse.unquote(parts.password) if parts.password else os.environ.get(MQTT_PASSWORD_ENV)
        if user:
            self.client.username_pw_set(user, password)
        if self.tls:
            try:
                self.client.tls_set(ca_certs=ca)
            except (OSError, ValueError) as exc:
                raise UserError(f"--sink {self.name}: cannot use the CA file {ca} ({exc})") from None
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self._connected.clear()
        self._connected = threading.Event()
        self.client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(self.backoff_max_s)))
        self._where = f"{self.host}:{self.port}"

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.last_error = f"the MQTT broker {self._where} refused the connection: {reason_code}"
        else:
            client.publish(self.status_topic, "online", qos=1, retain=True)
            self._connected.set()

    def start(self) -> None:
        super().start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def send(self, body: bytes, event_id: str) -> None:
        if not self._connected.wait(SEND_TIMEOUT_S):  # paho reconnects in its own thread meanwhile
            raise SinkError(self.last_error or f"not connected to the MQTT broker {self._where}")
        info = self.client.publish(self.topic, body, qos=1)
        try:
            info.wait_for_publish(timeout=SEND_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise SinkError(f"MQTT publish to {self._where} failed: {exc}") from None
        if not info.is_published():
            raise SinkError(f"MQTT publish to {self._where}/{self.topic} was not acknowledged")

    def close(self, drain_s: float = DRAIN_S) -> None:
        started = self._started and not self._closed
        super().close(drain_s)
        if not started:
            return
        if self.client.is_connected():  # a clean stop says so itself; the will covers the other ways to die
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def parse_sink(text: str, *, token: str | None = None, secret: str | None = None, **options) -> Sink:
    """`http[s]://URL` (or `webhook:URL`) or `mqtt[s]://HOST[:PORT]/TOPIC` -> a Sink (not started). `options` go to
    the Sink (spool_root, max_messages, log, ...); `token` and `secret` are for webhooks."""
    if text.startswith("webhook:"):
        text = text[len("webhook:") :]
        if urllib.parse.urlsplit(text).scheme not in ("http", "https"):
            raise UserError(
                f"--sink webhook:{redact_url(text)}: the webhook needs an http:// or https:// URL, "
                "e.g. webhook:http://host/hook"
            )
    scheme = urllib.parse.urlsplit(text).scheme
    if scheme in ("http", "https"):
        return WebhookSink(text, token=token, secret=secret, **options)
    if scheme in ("mqtt", "mqtts"):
        return MqttSink(text, **options)
    raise UserError(
        f"--sink {redact_url(text)} is not understood; use webhook:http://HOST/PATH or mqtt://HOST[:PORT]/TOPIC"
    )


def sink_observer(
    sinks: list[Sink], model: dict, *, line: str | None = None, out_dir: Path | str | None = None
) -> Callable:
    """A pipeline observer that offers every anomalous record to every sink, as one message: the record as in
    results.jsonl plus event, event_id, line (`line`, else the record's source), threshold, time (ISO-8601 UTC),
    model {name, sha256} and overlay_path (where the overlay was saved, if it was). `model` is read at each anomaly:
    the service fills it in once the model is loaded."""
    run = uuid.uuid4().hex  # the event id is fixed per record: this run, the record's source, frame and timestamp

    def observe(record: dict, picture, infer_ms) -> None:
        if not record.get("is_anomaly"):
            return
        key = f"{record.get('run') or run}/{record.get('source')}/{record.get('frame')}/{record.get('timestamp')}"
        message = {
            "event": "anomaly",
            "event_id": str(uuid.uuid5(EVENT_NAMESPACE, key)),
            **record,
            "line": line or record.get("source"),
            "threshold": model.get("threshold"),
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model": {k: model.get(k) for k in ("name", "sha256")},
        }
        if record.get("overlay"):
            message["overlay_path"] = str(Path(out_dir, record["overlay"]).resolve()) if out_dir else record["overlay"]
        for sink in sinks:
            sink.offer(message)

    return observe
