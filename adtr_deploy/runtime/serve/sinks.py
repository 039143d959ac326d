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

This module holds what every sink shares (the base `Sink` with its spool and sender threads, `parse_sink`, and the
pipeline observer that turns anomalous records into messages); each transport is a module of its own that implements
`send`: webhook.py (HTTP POST) and mqtt.py (MQTT publish).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import dumps_strict
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.serve.spool import MAX_BYTES, MAX_MESSAGES, Spool

QUEUE_SIZE = 1000  # the in-memory hand-off between the inference thread and the spool thread
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 30.0
SEND_TIMEOUT_S = 5.0
DRAIN_S = 5.0
DRAIN_RETRY_S = 0.5  # while close() drains, retries come at least this often
EVENT_NAMESPACE = uuid.UUID("5d1f6a1e-7c1b-4d0e-9a4f-adb2e1a7f001")  # for event ids derived from a record


class SinkError(Exception):
    """A delivery that failed; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


def encode(message: dict) -> bytes:
    """A message's body: compact strict JSON (NaN and infinity as null)."""
    return dumps_strict(message, default=str, separators=(",", ":")).encode()


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
        from adtr_deploy.runtime.serve.webhook import WebhookSink  # the transports import this module's Sink

        return WebhookSink(text, token=token, secret=secret, **options)
    if scheme in ("mqtt", "mqtts"):
        from adtr_deploy.runtime.serve.mqtt import MqttSink

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
