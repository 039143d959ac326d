"""Secrets out of what is shown: one helper that masks the password and secret-looking query values of a URL.

Used for every URL the runtime prints, records or serves (sources, sinks): `rtsp://user:pw@cam/s` is shown as
`rtsp://user:***@cam/s`, `https://host/hook?token=abc` as `https://host/hook?token=***`. Anything without
SCHEME://HOST (a file path, camera:0) passes unchanged.
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"
# Query parameters whose values are credentials (compared lower-case).
SECRET_PARAMS = frozenset(
    "token access_token auth key api_key apikey password passwd pass pw secret sig signature".split()
)
_USERINFO = re.compile(r"(//[^:/@?#]*):[^@/?#]*@")


def redact_url(url: str) -> str:
    """`url` without its password and without the values of secret-looking query parameters, for logs and pages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme or not parts.netloc:  # a file path (or C:\\...): nothing to mask
            return url
        netloc = parts.netloc
        user, at, hostport = netloc.rpartition("@")
        if at and ":" in user:
            netloc = f"{user.split(':', 1)[0]}:{MASK}@{hostport}"
        query = parts.query
        if query:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
                query = "&".join(
                    f"{urllib.parse.quote(k, safe='')}="
                    + (MASK if k.lower() in SECRET_PARAMS else urllib.parse.quote(v, safe="/:"))
                    for k, v in pairs
                )
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:  # not parseable as a URL: still never show what looks like user:password@
        return _USERINFO.sub(rf"\1:{MASK}@", url)
