"""What the routes of a line of cameras answer (adtr_deploy.runtime.serve.lineview): the grid and the camera API at the
top, each camera's own single-camera routes under /cam/NAME/ (answered by a Routes of that camera's view)."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.serve.protocol import Request, Response, error, json_response
from adtr_deploy.runtime.serve.routes import PROBES, STATIC_TYPES, Routes


class LineRoutes(Routes):
    """The grid and the camera API at the top; each camera's own routes under /cam/NAME/."""

    def _camera(self, req: Request) -> Response:
        name, sep, rest = req.path[len("/cam/") :].partition("/")
        name = urllib.parse.unquote(name)
        view = self.service.views.get(name)
        if view is None:
            return error(404, f"no camera {name!r} on this line; GET /api/cameras lists them")
        if not sep:
            return Response(301, b"", "text/plain", headers={"Location": f"/cam/{urllib.parse.quote(name)}/"})
        sub = dataclasses.replace(req, path="/" + rest)
        if view.routes is None:
            view.routes = Routes(view)
        if sub.path in PROBES:
            return view.routes.probe(sub)
        return view.routes.handle(sub)

    def stream_state(self, path: str):
        """/cam/NAME/stream.mjpg streams that camera's frames; the line itself has no stream."""
        name, _, rest = path[len("/cam/") :].partition("/")
        view = self.service.views.get(urllib.parse.unquote(name)) if path.startswith("/cam/") else None
        return view.state if view is not None and rest == "stream.mjpg" else None

    def handle(self, req: Request) -> Response:
        denied = self.read_denied(req)
        if denied is not None:
            return denied
        if req.path.startswith("/cam/"):
            return self._camera(req)
        if req.method == "POST":
            return self.post(req)
        if req.path in ("/", "/index.html"):
            return Response(200, self.static["/static/line.html"], STATIC_TYPES[".html"])
        if req.path == "/api/cameras":
            return json_response(200, {"cameras": self.service.tiles()})
        if req.path == "/stream.mjpg":
            return error(404, "a line has an MJPEG stream per camera: /cam/NAME/stream.mjpg")
        return super().handle(req)

    def post(self, req: Request) -> Response:
        path = req.path
        if path != "/api/cameras" and not path.startswith("/api/cameras/"):
            return super().post(req)
        denied = self.write_denied(req)
        if denied is not None:
            return denied
        line = self.service.line
        try:
            if path == "/api/cameras":
                try:
                    body = json.loads(req.body or b"{}")
                except ValueError:
                    return error(400, 'the body is not JSON; send {"name": "top", "source": "rtsp://..."}')
                camera = line.add(body)
                return json_response(200, camera.status())
            name, _, action = path[len("/api/cameras/") :].partition("/")
            name = urllib.parse.unquote(name)
            if action == "remove":
                line.remove(name)
                return json_response(200, {"removed": name})
            if action in ("pause", "resume"):
                return json_response(200, line.set_paused(name, action == "pause"))
            return error(404, f"no such action: {action!r}; use remove, pause or resume")
        except KeyError:
            return error(404, f"no camera {name!r} on this line; GET /api/cameras lists them")
        except UserError as exc:
            return error(409, str(exc))
