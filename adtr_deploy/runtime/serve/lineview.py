"""`adtr-run --serve` with several cameras: the grid of the line, each camera's own view, the camera API.

One server for the whole line. `/` is the grid (static/line.html): every camera with its line state (OK, ALARM,
DRIFT, NO SIGNAL, PAUSED, ...), latest frame and score; a click opens `/cam/NAME/`, which is the single-camera page
itself, served with every route it has (api/status, frame.jpg, stream.mjpg, gallery, readyz, healthz, api/pause,
api/resume) under that prefix, from a LiveState of the camera's own. So each camera keeps what one camera had: the
line state, the stall timeout of its source, its drift monitor, its readiness.

The camera API (POST, token-protected and Host/Origin-checked like every control route; adtr_deploy.runtime.line does
the work and rewrites the line file):

    GET  /api/cameras                       every camera: state, line state, counts, last score, error
    POST /api/cameras                       {"name": ..., "source": ..., and line file keys}: add a camera
    POST /api/cameras/NAME/remove           stop it at a record boundary; its folder stays
    POST /api/cameras/NAME/pause | resume   (also /cam/NAME/api/pause and /cam/NAME/api/resume)

`/metrics` labels every per-camera series with `camera` (adtr_deploy.runtime.serve.linemetrics); sink messages carry
the record's `camera`. Not served per camera: /api/recalibrate (one model.json is shared by every camera; recalibrate
with `adtr recalibrate` on saved frames).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.parse
from types import SimpleNamespace

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.serve.protocol import Request, Response, error, json_response
from adtr_deploy.runtime.serve.routes import PROBES, STATIC_TYPES, Routes
from adtr_deploy.runtime.serve.service import Service
from adtr_deploy.runtime.serve.sinks import sink_observer
from adtr_deploy.runtime.serve.state import STALL_S, LiveState


class CameraState(LiveState):
    """A camera's LiveState: while its source cannot be opened (the camera is retrying) the line is NO SIGNAL with
    the reason; once its pipeline runs, its source's own state, as for one camera."""

    def __init__(self, camera, model: dict, **kw):
        super().__init__(model, {"name": camera.status()["source"], "live": None}, **kw)
        self.camera = camera
        self.source_stats = self._camera_stats

    def _camera_stats(self) -> dict:
        pipeline = self.camera.pipeline
        return pipeline.source.stats() if pipeline is not None else {}

    def source_state(self) -> dict:
        camera, pipeline = self.camera, self.camera.pipeline
        if camera.state in ("retrying", "starting") or pipeline is None:
            with self.cond:
                age = self.frame_age()
            return {"live": bool(self.source.get("live")), "up": camera.state != "retrying", "last_frame_age_s": age,
                    "reconnects": camera.failures, "outages": camera.failures, "outage_start": None,
                    "outage_s": None, "last_error": camera.error}  # fmt: skip
        if self.source.get("live") is None:
            src = pipeline.source
            self.source.update(live=src.live, total=src.total)
            self.stale_s = float(getattr(src, "timeout_s", STALL_S)) if src.live else STALL_S
        return super().source_state()


class CameraView:
    """One camera as the single-camera routes (adtr_deploy.runtime.serve.routes.Routes) expect a service to be."""

    def __init__(self, line_service: LineService, camera):
        self.line_service = line_service
        self.camera = camera
        self.name = camera.name
        self.model = dict(line_service.model)
        threshold = camera.options.threshold
        if threshold is not None:
            self.model["threshold"] = threshold
        self.state = CameraState(camera, self.model, max_fps=line_service.max_fps)
        self.state.drift = camera.drift
        self.drift = camera.drift
        self.streams = 0
        self.routes: Routes | None = None
        if camera.pause.is_set():
            self.state.set_state("paused")

    # what Routes and the metrics collector ask a service for
    token = property(lambda self: self.line_service.token)
    auth = property(lambda self: self.line_service.auth)
    server = property(lambda self: self.line_service.server)
    log = property(lambda self: self.line_service.log)

    def host_allowed(self, host: str) -> bool:
        return self.line_service.host_allowed(host)

    def sink_stats(self) -> list[dict]:
        return self.line_service.sink_stats()

    def metrics(self) -> tuple[bytes, str]:
        return self.line_service.metrics()

    def status(self, since: int = 0) -> dict:
        snap = self.state.snapshot(since)
        snap["camera"] = {"name": self.name, **{k: v for k, v in self.camera.status().items() if k != "counts"}}
        snap["sinks"] = self.sink_stats()
        snap["control"] = {"needs_token": self.token is not None, "header": "X-ADTR-Token"}
        if self.drift is not None:
            snap["drift"] = self.drift.status()
        return snap

    def health(self) -> dict:
        return self.line_service.health()

    def ready(self) -> dict:
        return {**self.state.readiness(), "camera": self.name}

    def set_paused(self, paused: bool) -> None:
        self.line_service.line.set_paused(self.name, paused)

    def recalibrate(self, request: dict) -> dict:
        raise UserError(
            "recalibrating from one camera of a line is not available (every camera shares one model.json); run "
            "adtr recalibrate on frames saved from this camera, then restart the line"
        )

    def tile(self) -> dict:
        """The grid's entry for this camera."""
        snap = self.state.snapshot(since=1 << 62)
        last = snap["last"] or {}
        return {
            **self.camera.status(),
            "line": snap["line"],
            "images_per_s": snap["images_per_s"],
            "latency_ms": snap["latency_ms"],
            "last": {k: last.get(k) for k in ("frame", "score", "normalized_score", "is_anomaly", "status", "time")},
            "frame_seq": snap["frame"]["seq"],
            "url": f"cam/{urllib.parse.quote(self.name)}/",
        }


class LineService(Service):
    """The Service of a line of cameras: one server, one set of sinks, a CameraView per camera."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.views: dict[str, CameraView] = {}
        self.line = None
        self._hist = None
        if self.server is not None:
            self.server.routes = LineRoutes(self)

    # -- the line's side -------------------------------------------------------------------------------------------
    def add_camera(self, camera) -> list:
        """Called by Line for every camera it starts or adds: its view, and its observers (view, sinks)."""
        view = CameraView(self, camera)
        observers = []
        if self.sinks:
            # overlay paths are relative to the camera's own folder
            observers.append(sink_observer(self.sinks, view.model, **{**self._sink_message, "out_dir": camera.out_dir}))
        if camera.drift is not None:
            camera.drift.listeners.append(lambda event, name=camera.name: self._drift_event({**event, "camera": name}))
        if self.server is not None:
            observers.append(view.state.observe)
            view.state.frame_listeners.append(self.server.wake)  # MJPEG viewers of this camera get each frame at once
            self._attach_timing(view)
            view.state.model_loaded = True
            view.state.start()
        with self._lock:
            self.views[camera.name] = view
        return observers

    def remove_camera(self, name: str) -> None:
        with self._lock:
            view = self.views.pop(name, None)
        if view is not None:
            view.state.stop()
            if self._hist is not None:
                for stage in ("before_inference", "inference", "end_to_end"):
                    try:
                        self._hist.remove(name, stage)
                    except KeyError:
                        pass

    def _attach_timing(self, view: CameraView) -> None:
        if self._hist is None:
            return
        children = {
            s: self._hist.labels(camera=view.name, stage=s) for s in ("before_inference", "inference", "end_to_end")
        }
        view.state.timing = lambda stage, seconds: children[stage].observe(seconds)

    def start_line(self, line, engine, model_path) -> None:
        """Fill in the model's identity, start the sinks and the server (the cameras come with line.start())."""
        from adtr_deploy.runtime.serve.service import model_identity

        calibration = engine.spec.calibration  # model_identity reads the threshold from a pipeline's postprocessor
        shim = SimpleNamespace(post=SimpleNamespace(threshold=calibration.threshold, calibration=calibration))
        self.model.update(model_identity(engine, shim, model_path))
        self.line = line
        for sink in self.sinks:
            sink.start()
        if self.server is None:
            return
        from adtr_deploy.runtime.serve.linemetrics import build_line_registry

        self.registry, self._hist = build_line_registry(self)
        self.state.model_loaded = self._backend_loaded = self._serving = True
        self.state.set_state("running")
        threading.Thread(target=self.server.serve_forever, name="adtr-serve-http", daemon=True).start()
        self.log(
            f"live view on {self.url} (the grid of {len(line.specs)} cameras; one camera: {self.url}cam/NAME/; "
            f"metrics {self.url}metrics, health {self.url}healthz, cameras {self.url}api/cameras)"
        )

    # -- HTTP side ---------------------------------------------------------------------------------------------------
    def tiles(self) -> list[dict]:
        with self._lock:
            views = list(self.views.values())
        return [view.tile() for view in views]

    def status(self, since: int = 0) -> dict:
        tiles = self.tiles()
        line = self.line
        return {
            "line": line.name if line is not None else None,
            "cameras": tiles,
            "ready": any(t["line"]["state"] in ("OK", "ALARM", "DRIFT") for t in tiles),
            "batching": {str(k or "default"): b.stats() for k, b in (line.batchers.items() if line else ())},
            "model": self.model,
            "sinks": self.sink_stats(),
            "control": {"needs_token": self.token is not None, "header": "X-ADTR-Token"},
            "uptime_s": round(time.time() - self.state.started, 1),
        }

    def ready(self) -> dict:
        """/readyz of the line: ready while at least one camera inspects; each camera's own at /cam/NAME/readyz."""
        with self._lock:
            views = list(self.views.values())
        cameras = {v.name: v.state.readiness() for v in views}
        return {"ready": any(c["ready"] for c in cameras.values()), "cameras": cameras}

    def camera_ended(self, name: str) -> None:
        """The camera's source ended (or it was stopped): its view says FINISHED."""
        view = self.views.get(name)
        if view is not None:
            view.state.set_state("finished")
            view.state.model_loaded = False

    def camera_paused(self, name: str, paused: bool) -> None:
        """Line.set_paused tells the camera's view (its line state PAUSED, or back to running)."""
        view = self.views.get(name)
        if view is not None:
            view.state.set_state("paused" if paused else "running")

    def set_paused(self, paused: bool) -> None:
        """POST /api/pause, /api/resume: every camera of the line."""
        for name in list(self.views):
            self.line.set_paused(name, paused)

    def recalibrate(self, request: dict) -> dict:
        raise UserError("a line of cameras shares one model.json; recalibrate it with adtr recalibrate, then restart")

    def linger(self, seconds: float | None, summary: dict) -> None:
        for view in list(self.views.values()):
            view.state.set_state("finished")
        super().linger(seconds, summary)

    def close(self) -> None:
        for view in list(self.views.values()):
            view.state.stop()
        super().close()


class LineRoutes(Routes):
    """The grid and the camera API at the top; each camera's own routes under /cam/NAME/."""

    def __init__(self, service: LineService):
        super().__init__(service)

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
