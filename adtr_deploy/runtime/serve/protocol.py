"""HTTP/1.1 messages for the live view's server (loop.py): a request parsed from the bytes a socket delivered, and the
head of an answer. No sockets here; the limits on what a request may be are here."""

from __future__ import annotations

import email.message
import http.client
import io
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus

from adtr_deploy.fileio import dumps_strict

MAX_HEADER_BYTES = 16384
MAX_BODY_BYTES = 65536
# Everything the page needs comes from this server; nothing inline, nothing from elsewhere.
CSP = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: email.message.Message
    body: bytes
    client: str
    tls: bool
    keep: bool = True  # HTTP/1.1 without `Connection: close`: the connection stays open for the next request


@dataclass
class Response:
    code: int
    body: bytes = b""
    ctype: str = "application/json"
    headers: dict = field(default_factory=dict)
    cache: bool = False
    close: bool = False


def json_response(code: int, data: dict, **kw) -> Response:
    body = dumps_strict(data, default=str)  # a model that produced NaN: JSON has no NaN, the page gets null
    return Response(code, body.encode(), "application/json", **kw)


def error(code: int, message: str, **kw) -> Response:
    return json_response(code, {"error": message}, **kw)


def parse_request(buf: bytearray, client: str, tls: bool) -> Request | Response | None:
    """The first request in `buf` (removed from it), an error answer for a request that cannot be served, or None while
    it is still incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return error(431, "request headers too large") if len(buf) > MAX_HEADER_BYTES else None
    lines = bytes(buf[:end]).split(b"\r\n", 1)
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
        headers = http.client.parse_headers(io.BytesIO(lines[1] + b"\r\n\r\n" if len(lines) > 1 else b"\r\n"))
    except (ValueError, UnicodeDecodeError, http.client.HTTPException):
        return error(400, "malformed request")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return error(505, "HTTP/1.0 or HTTP/1.1 only")
    if headers.get("Transfer-Encoding") is not None:
        return error(501, "chunked request bodies are not accepted; send Content-Length")
    length = int_param([headers.get("Content-Length", "0")], -1)
    if not 0 <= length <= MAX_BODY_BYTES:
        return error(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    if len(buf) < end + 4 + length:
        return None  # the body is still coming (within the same deadline)
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    keep = version == "HTTP/1.1" and "close" not in (headers.get("Connection") or "").lower()
    url = urllib.parse.urlsplit(target)
    return Request(method, url.path, urllib.parse.parse_qs(url.query), headers, body, client, tls, keep)


def response_head(resp: Response, keep: bool) -> bytes:
    try:
        reason = HTTPStatus(resp.code).phrase
    except ValueError:
        reason = ""
    head = [
        f"HTTP/1.1 {resp.code} {reason}",
        f"Content-Type: {resp.ctype}",
        f"Content-Length: {len(resp.body)}",
        f"Cache-Control: {'max-age=300' if resp.cache else 'no-store'}",
        "X-Content-Type-Options: nosniff",
        f"Content-Security-Policy: {CSP}",
        "Referrer-Policy: no-referrer",
        "Server: adtr-run",
        f"Connection: {'keep-alive' if keep else 'close'}",
        *(f"{k}: {v}" for k, v in resp.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def int_param(values: list[str] | None, default: int) -> int:
    try:
        return int(values[0]) if values else default
    except (TypeError, ValueError):
        return default
