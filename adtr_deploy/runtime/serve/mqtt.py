"""The MQTT sink: each alert message is published as JSON with QoS 1 (over TLS for mqtts://), with a retained
online/offline status topic and a last will; paho-mqtt (the serve extra) is imported only when such a sink is made.

Spooling, retries and counting are the base `Sink`'s (sinks.py); this module only sends one encoded message.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
import uuid
from pathlib import Path

from adtr_deploy.errors import MissingExtraError, UserError
from adtr_deploy.runtime.serve.sinks import DRAIN_S, SEND_TIMEOUT_S, Sink, SinkError

MQTT_USER_ENV, MQTT_PASSWORD_ENV = "ADTR_MQTT_USERNAME", "ADTR_MQTT_PASSWORD"


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
