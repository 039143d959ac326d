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
the record's `camera`. `POST /cam/NAME/api/recalibrate` recalibrates the model from that camera's frames, for every
camera running the model (recalibrate_camera).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from types import SimpleNamespace

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.serve.routes import Routes
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
        return self.line_service.recalibrate_camera(self, request)

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
        self._model_path = None
        self._recalibrating = threading.Lock()
        self._hist = None
        if self.server is not None:
            from adtr_deploy.runtime.serve.lineroutes import LineRoutes

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
        self._model_path = model_path
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
        raise UserError("recalibrate from one camera's frames: POST /cam/NAME/api/recalibrate")

    def recalibrate_camera(self, view: CameraView, request: dict) -> dict:
        """POST /cam/NAME/api/recalibrate: the operator confirms that camera's last frames were good parts. The model's
        calibration is recomputed from them (adtr_deploy.runtime.recalibrate, as for one camera) and written to its
        model.json; every camera running that model uses it at once, a camera whose line entry sets its own threshold
        keeping that threshold, and each camera's drift monitor judges against it."""
        from adtr_deploy.runtime.postprocess import Postprocessor
        from adtr_deploy.runtime.recalibrate import RunRecalibrator

        camera, line = view.camera, self.line
        unknown = sorted(set(request) - {"frames", "by", "allow_flagged"})
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; send frames, by and allow_flagged only")
        if camera.drift is None or camera.pipeline is None:
            raise UserError(f"camera {camera.name!r} keeps no scores to recalibrate from yet")
        engine = line.batchers[camera.spec.model].backend
        with self._recalibrating:
            rec = RunRecalibrator(camera.pipeline, engine, camera.spec.model or self._model_path, camera.drift, {})
            result = rec.recalibrate(request.get("frames"), request.get("by"), request.get("allow_flagged", False))
            calibration = rec.spec.calibration
            engine.spec = rec.spec  # cameras that start (or retry) later use it too
            applied = []
            for other in list(line.cameras.values()):
                if other.spec.model != camera.spec.model:
                    continue
                threshold = other.spec.threshold
                if other.pipeline is not None:
                    other.pipeline.post = Postprocessor(calibration, threshold)
                if other.drift is not None and other is not camera:
                    other.drift.set_calibration(calibration, threshold)
                other_view = self.views.get(other.name)
                if other_view is not None:
                    other_view.model.update(
                        threshold=other.pipeline.post.threshold if other.pipeline else calibration.threshold,
                        calibration=calibration.method,
                    )
                applied.append(other.name)
            if camera.spec.threshold is not None:
                camera.drift.set_calibration(calibration, camera.spec.threshold)
        self.log(
            f"recalibrated from camera {camera.name}'s last {result['record']['frames']} frames by "
            f"{result['record']['by']}: threshold {result['previous_threshold']:.6g} -> "
            f"{calibration.threshold:.6g} (version {result['record']['version']}), used by {', '.join(applied)}"
        )
        return {**result, "camera": camera.name, "applied_to": applied}

    def linger(self, seconds: float | None, summary: dict) -> None:
        for view in list(self.views.values()):
            view.state.set_state("finished")
        super().linger(seconds, summary)

    def close(self) -> None:
        for view in list(self.views.values()):
            view.state.stop()
        super().close()
