"""The webhook sink: each alert message is POSTed as JSON to an http:// or https:// URL, authenticated by a bearer
token, an HMAC-SHA256 signature or HTTP Basic auth from the URL; redirects are refused rather than followed.

Spooling, retries and counting are the base `Sink`'s (sinks.py); this module only sends one encoded message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.serve.sinks import SEND_TIMEOUT_S, Sink, SinkError


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
