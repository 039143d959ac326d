"""What each route of the live view answers, and who may ask; no sockets here (loop.py and server.py do the I/O).

Routes: GET / (the page), /static/*, /api/status, /frame.jpg, /gallery/ID.jpg, /stream.mjpg (a GET becomes a stream in
server.py), /metrics, /healthz, /readyz, /review, /api/review* and /api/model; POST /api/pause, /api/resume,
/api/recalibrate, /api/review (reviewroutes.py), /api/model/rollback and /api/model/activate (runtime/rollout.py).
Control (POST) checks Host and Origin, then the token (header X-ADTR-Token, which a plain cross-site form cannot
send). With auth "all", every route but /healthz and /readyz needs the token (X-ADTR-Token, `Authorization: Bearer
TOKEN`, or HTTP Basic with the token as password, so that a browser asks for it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import urllib.parse
from importlib import resources

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import dumps_strict
from adtr_deploy.runtime.serve.protocol import Request, Response, error, int_param, json_response

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
TOKEN_HEADER = "X-ADTR-Token"
PROBES = ("/healthz", "/readyz")


def _static_files() -> dict[str, bytes]:
    """The page's files, shipped as package data, read once."""
    root = resources.files("adtr_deploy.runtime.serve") / "static"
    return {f"/static/{p.name}": p.read_bytes() for p in root.iterdir() if p.suffix in STATIC_TYPES}


class Routes:
    """What each route answers, and who may ask; no sockets here (the loop below does the I/O)."""

    def __init__(self, service):
        self.service = service
        self.static = _static_files()

    # -- who may ask -------------------------------------------------------------------------------------------------
    def token_ok(self, req: Request) -> bool:
        token = self.service.token
        if token is None:
            return True
        given = [req.headers.get(TOKEN_HEADER, "")]
        scheme, _, value = req.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        elif scheme.lower() == "basic":  # a browser's own prompt: any user name, the token as password
            try:
                given.append(base64.b64decode(value.strip(), validate=True).decode().partition(":")[2])
            except (binascii.Error, UnicodeDecodeError):
                pass
        return any(hmac.compare_digest(g.encode(), token.encode()) for g in given if g)

    def read_denied(self, req: Request) -> Response | None:
        """With --serve-auth all, reading needs the token too (health probes excepted: they show no names)."""
        if self.service.auth != "all" or req.path in PROBES or self.token_ok(req):
            return None
        return error(
            401,
            f"this server needs its token to be read: send it in the {TOKEN_HEADER} header, as "
            "'Authorization: Bearer TOKEN', or as the password when the browser asks",
            headers={"WWW-Authenticate": 'Basic realm="adtr-run", charset="UTF-8"'},
        )

    def write_denied(self, req: Request) -> Response | None:
        """Control requests: a Host this server is not known by (DNS rebinding) or another site's Origin is refused
        first, whatever the token; then the X-ADTR-Token header must be there, and right when a token is set."""
        host = req.headers.get("Host", "")
        if not self.service.host_allowed(host):
            return error(403, f"refused: Host {host!r} is not a name this server is known by (see --serve-host)")
        origin = req.headers.get("Origin")
        if origin is not None and not _same_origin(origin, host):
            return error(403, f"refused: a page from {origin!r} may not control this server")
        if req.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return error(403, "refused: a cross-site request may not control this server")
        if req.headers.get(TOKEN_HEADER) is None:
            # A custom header cannot be sent by a plain HTML form of another site: this also stops cross-site posts.
            return error(
                403, f"control requests need the {TOKEN_HEADER} header (any value when the server has no token)"
            )
        if not self.token_ok(req):
            return error(403, "wrong or missing token; pass the --serve-token value in the X-ADTR-Token header")
        return None

    def stream_state(self, path: str):
        """The LiveState whose frames a GET of `path` streams as MJPEG, else None (then it is an ordinary route)."""
        return self.service.state if path == "/stream.mjpg" else None

    # -- answers ---------------------------------------------------------------------------------------------------
    def probe(self, req: Request) -> Response:
        """/healthz: the process lives and answers. /readyz: inspecting now (source up, frames flowing, model loaded)."""
        if req.path == "/healthz":
            return json_response(200, self.service.health())
        ready = self.service.ready()
        return json_response(200 if ready["ready"] else 503, ready)

    def handle(self, req: Request) -> Response:
        denied = self.read_denied(req)
        if denied is not None:
            return denied
        if req.method == "POST":
            return self.post(req)
        path, service, state = req.path, self.service, self.service.state
        if path in ("/", "/index.html"):
            return Response(200, self.static["/static/index.html"], STATIC_TYPES[".html"])
        if path in self.static:
            return Response(200, self.static[path], STATIC_TYPES["." + path.rsplit(".", 1)[-1]], cache=True)
        if path == "/api/status":
            if req.query.get("view"):
                state.watched()
            return json_response(200, service.status(since=int_param(req.query.get("since"), 0)))
        if path == "/frame.jpg":
            state.watched()
            with state.cond:
                jpeg, seq, info = state.frame_jpeg, state.frame_seq, state.frame_info
            if jpeg is None:
                return Response(204, b"", "image/jpeg")
            # the record this very picture belongs to, so the page's caption always matches it
            about = urllib.parse.quote(dumps_strict(info, default=str))
            return Response(200, jpeg, "image/jpeg", headers={"X-Frame-Seq": str(seq), "X-Frame-Info": about})
        if path.startswith("/gallery/") and path.endswith(".jpg"):
            jpeg = state.thumbnail(int_param([path[len("/gallery/") : -4]], -1))
            if jpeg is None:
                return error(404, "no such gallery image (it has left the gallery)")
            return Response(200, jpeg, "image/jpeg", cache=True)
        if path == "/stream.mjpg":  # HEAD only: a GET is turned into a stream by the loop
            return Response(200, b"", "multipart/x-mixed-replace; boundary=frame")
        if path == "/metrics":
            body, ctype = service.metrics()
            return Response(200, body, ctype)
        if path == "/api/model" and hasattr(service, "model_status"):  # the version running, the versions, the swaps
            return json_response(200, service.model_status())
        if path == "/review" or path.startswith("/api/review"):  # review of flagged parts: serve/reviewroutes.py
            from adtr_deploy.runtime.serve import reviewroutes

            return reviewroutes.get(self, req)
        return error(404, f"no such page: {path}")

    def post(self, req: Request) -> Response:
        if req.path not in (
            "/api/pause", "/api/resume", "/api/recalibrate", "/api/review", "/api/model/rollback", "/api/model/activate"
        ):  # fmt: skip
            return error(404, f"no such action: {req.path}")
        denied = self.write_denied(req)
        if denied is not None:
            return denied
        if req.path == "/api/recalibrate":
            return self.recalibrate(req)
        if req.path in ("/api/model/rollback", "/api/model/activate"):
            return self.model_action(req)
        if req.path == "/api/review":
            from adtr_deploy.runtime.serve import reviewroutes

            return reviewroutes.post(self, req)
        self.service.set_paused(req.path == "/api/pause")
        return json_response(200, {"state": self.service.state.state})

    def recalibrate(self, req: Request) -> Response:
        """The operator confirms the last frames were good parts: recalibrate on them (adtr_deploy.runtime.recalibrate).
        Body (optional): {"frames": N, "by": NAME, "allow_flagged": false}. A refusal (too few frames, flagged parts,
        another model) is a 409 with its sentence."""
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(400, 'the body is not a JSON object; send e.g. {"frames": 100, "by": "operator name"} or none')
        try:
            return json_response(200, self.service.recalibrate(body))
        except UserError as exc:
            return error(409, str(exc))

    def model_action(self, req: Request) -> Response:
        """rollback: revoke the running version and run the previous live one; body (optional) {"by": NAME, "why":
        TEXT}. activate: run version N again; body {"version": N, "by", "why"}. A refusal (no version to go back to,
        a version that cannot run, a plain model path) is a 409 with its sentence."""
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(400, 'the body is not a JSON object; send e.g. {"by": "operator name", "why": "false alarms"}')
        action = self.service.rollback if req.path.endswith("/rollback") else self.service.activate
        try:
            return json_response(200, action(body))
        except UserError as exc:
            return error(409, str(exc))


def _same_origin(origin: str, host: str) -> bool:
    """Origin (scheme://host[:port]) names the same host and port as the Host header."""
    try:
        o = urllib.parse.urlsplit(origin)
        h = urllib.parse.urlsplit("//" + host)
        default = {"http": 80, "https": 443}.get(o.scheme)
        return bool(o.hostname) and o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:
        return False  # "null" and other opaque origins included
