"""Many cameras, one process: `Line` runs every camera of a production line with one model in memory.

    from adtr_deploy.runtime import Inferencer, Line
    inf = Inferencer("export/model.onnx")
    line = Line(inf, {"top": "rtsp://cam-top.local/s1", "side": "http://cam-side.local/mjpeg"}, "runs/line3")
    line.run()                   # until every camera ends, or Ctrl-C; line.add/remove/set_paused from other threads

Layout of OUT: one folder per camera, each the single-camera layout (adtr_deploy.runtime.outdir), so every reader of
a single run reads a camera's folder as it is; plus the line's own files:

    OUT/<camera>/results.jsonl, summary.json, runs.jsonl, overlays/, ...   (every record carries "camera")
    OUT/cameras.json        the line as it runs now, a line file itself (`--line OUT/cameras.json` restarts it)
    OUT/line-summary.json   the last start of the line: each camera's summary and the shared batches
    OUT/.adtr-run.lock      one line writes here at a time

`adtr_deploy.runtime.outdir.read_records(OUT)` reads every camera's records, camera by camera. Cameras that share a
model share one Batcher (adtr_deploy.runtime.batcher); a camera with its own `model` gets its own. Adding, removing
and pausing cameras rewrite OUT/cameras.json and the --line file atomically, so a restart keeps the change.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import write_json_atomic
from adtr_deploy.runtime import outdir
from adtr_deploy.runtime.batcher import Batcher
from adtr_deploy.runtime.cameras import Camera, prestarted
from adtr_deploy.runtime.linefile import CameraSpec, camera_from_dict, check_unique, save_line
from adtr_deploy.runtime.pipeline import RunOptions
from adtr_deploy.runtime.records import check_same_run, model_sha256

LINE_FILE = "cameras.json"
LINE_SUMMARY = "line-summary.json"


def as_specs(cameras) -> list[CameraSpec]:
    """CameraSpecs from specs, {name: source} or [{name, source, ...}] (the Python API's forms)."""
    if isinstance(cameras, Mapping):
        cameras = [{"name": k, "source": v} for k, v in cameras.items()]
    specs = [c if isinstance(c, CameraSpec) else camera_from_dict(c, "cameras") for c in cameras]
    check_unique(specs, "cameras")
    return specs


class Line:
    """The cameras of one line, one model in memory per model used, frames of all cameras batched together.

    `model`: a model path, an open Backend or an Inferencer (its backend is used and not closed here). `options`
    apply to every camera, each camera's CameraSpec overriding threshold, save_overlays, save_video, keep,
    max_frames. `view` (the line service, adtr_deploy.runtime.serve.lineview) gets each camera's observers.
    `drift`: {"window", "sigmas"} for a DriftMonitor per camera, or None."""

    def __init__(
        self,
        model,
        cameras,
        out_dir: str | Path,
        options: RunOptions = RunOptions(),
        *,
        device: str = "cpu",
        backend_options: dict | None = None,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        timeout_s: float = 5.0,
        line_file: str | Path | None = None,
        name: str | None = None,
        log: Callable[[str], None] | None = None,
        drift: dict | None = None,
        view=None,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise UserError("--max-batch must be at least 1 and --max-wait-ms at least 0")
        self.specs = as_specs(cameras)
        self.out_dir = Path(out_dir)
        self.options = options
        self.device = device
        self.backend_options = dict(backend_options or {})
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.timeout_s = timeout_s
        self.line_file = Path(line_file) if line_file else None
        self.name = name
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.drift = drift
        self.view = view
        backend = getattr(model, "backend", model)  # an Inferencer, or a Backend
        self._owned: list = []
        if isinstance(backend, str | Path):
            from adtr_deploy.runtime.backends import open_model

            backend = open_model(backend, device, **self.backend_options)
            self._owned.append(backend)
        self.backend = backend
        self.batchers: dict[str | None, Batcher] = {}
        self.cameras: dict[str, Camera] = {}
        self.removed: dict[str, Camera] = {}  # taken off while running: still in the line's summary
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._changed = threading.Event()
        self.started = False
        self.interrupted = False  # stopped by Ctrl-C / SIGTERM (or stop()), not by the cameras ending

    # -- cameras ---------------------------------------------------------------------------------------------------
    def _batcher(self, spec: CameraSpec) -> Batcher:
        """Cameras sharing a model share its batcher; another model is loaded once, for all cameras that name it."""
        key = spec.model
        if key not in self.batchers:
            backend = self.backend
            if key is not None:
                from adtr_deploy.runtime.backends import open_model

                backend = open_model(key, self.device, **self.backend_options)
                self._owned.append(backend)
            self.batchers[key] = Batcher(backend, self.max_batch, self.max_wait_ms)
        return self.batchers[key]

    def _camera_options(self, spec: CameraSpec, *, added: bool) -> RunOptions:
        over = {k: getattr(spec, k) for k in ("threshold", "save_overlays", "save_video", "keep", "max_frames")}
        opts = dataclasses.replace(self.options, **{k: v for k, v in over.items() if v is not None})
        if added and outdir.earlier_outputs(self.out_dir / spec.name):  # a camera coming back: continue its folder
            opts = dataclasses.replace(opts, resume=True, overwrite=False)
        return opts

    def _make_camera(self, spec: CameraSpec, options: RunOptions, source=None) -> Camera:
        batcher = self._batcher(spec)
        backend = batcher.client(spec.name)
        observers: list = []
        monitor = None
        if self.drift is not None:
            from adtr_deploy.runtime.drift import DriftMonitor, describe

            monitor = DriftMonitor(backend.spec.calibration, threshold=options.threshold, **self.drift)
            monitor.listeners.append(lambda event, n=spec.name: self.log(f"camera {n}: {describe(event)}"))
            observers.append(monitor.observe)
        camera = Camera(
            spec, backend, self.out_dir / spec.name, options,
            timeout_s=self.timeout_s, log=self.log, source=source,
        )  # fmt: skip
        camera.drift = monitor
        if self.view is not None:
            observers.extend(self.view.add_camera(camera))
        camera.observers = observers
        camera.on_end = self._ended
        return camera

    def _ended(self, camera: Camera) -> None:
        if self.view is not None:
            self.view.camera_ended(camera.name)
        self._changed.set()

    def add(self, data: dict | CameraSpec) -> Camera | None:
        """Add a camera while the line runs (the API's POST /api/cameras). A bad entry is refused with a sentence; a
        source that cannot be opened now is recorded and retried. Before start(): the camera joins the list (None)."""
        spec = data if isinstance(data, CameraSpec) else camera_from_dict(data, "the new camera")
        with self._lock:
            if spec.name.lower() in {s.name.lower() for s in self.specs}:
                raise UserError(f"camera {spec.name!r} is already on the line; remove it first or choose another name")
            if not self.started:
                self.specs.append(spec)
                return None
            leaving = self.removed.get(spec.name)
            if leaving is not None and not leaving.done:
                raise UserError(f"camera {spec.name!r} is still stopping after its removal; add it again in a moment")
            options = self._camera_options(spec, added=True)
            outdir.check_out_dir(self.out_dir / spec.name, overwrite=options.overwrite, resume=options.resume)
            probe = Camera(spec, None, self.out_dir / spec.name, options, timeout_s=self.timeout_s)
            source = probe._open_source()  # a missing path is refused now; an unreachable stream is retried
            if options.resume:  # what the camera's pipeline would refuse for ever is refused now
                try:
                    self._check_resume(spec, source)
                except UserError as exc:
                    raise UserError(f"camera {spec.name!r}: {exc}") from None
            camera = self._make_camera(spec, options, source)
            self.cameras[spec.name] = camera
            self.removed.pop(spec.name, None)
            self.specs.append(spec)
            self.persist()
            camera.start()
        self.log(f"camera {spec.name} added ({camera.status()['source']})")
        return camera

    def remove(self, name: str) -> None:
        """Stop a camera at its next record boundary and take it off the line; its folder stays."""
        with self._lock:
            camera = self._get(name)
            del self.cameras[name]
            self.removed[name] = camera
            self.specs = [s for s in self.specs if s.name != name]
            self.persist()
        camera.stop("removed")
        if self.view is not None:
            self.view.remove_camera(name)
        self.log(f"camera {name} removed; its results stay in {camera.out_dir}")

    def set_paused(self, name: str, paused: bool) -> dict:
        with self._lock:
            camera = self._get(name)
            camera.set_paused(paused)
            self.specs = [dataclasses.replace(s, paused=paused) if s.name == name else s for s in self.specs]
            camera.spec = dataclasses.replace(camera.spec, paused=paused)
            self.persist()
        if self.view is not None:
            self.view.camera_paused(name, paused)
        self.log(f"camera {name} {'paused' if paused else 'resumed'}")
        return camera.status()

    def _get(self, name: str) -> Camera:
        camera = self.cameras.get(name)
        if camera is None:
            raise KeyError(name)
        return camera

    def persist(self) -> None:
        """OUT/cameras.json and the --line file, atomically: a restart runs the line as it is now."""
        with self._lock:
            save_line(self.out_dir / LINE_FILE, self.name, self.specs)
            if self.line_file is not None and self.line_file.resolve() != (self.out_dir / LINE_FILE).resolve():
                save_line(self.line_file, self.name, self.specs)

    def status(self) -> list[dict]:
        with self._lock:
            return [camera.status() for camera in self.cameras.values()]

    # -- the run ---------------------------------------------------------------------------------------------------
    def _check_out(self) -> None:
        out, opts = self.out_dir, self.options
        if outdir.result_files(out):
            raise UserError(
                f"--out {out} holds the results of a single-camera run; give a line of cameras its own folder"
            )
        if (out / LINE_FILE).exists() and not (opts.resume or opts.overwrite):
            raise UserError(
                f"--out {out} already holds the results of an earlier line ({LINE_FILE}); pass --resume to continue "
                "it, --overwrite to replace each camera's results, or choose another folder"
            )
        for spec in self.specs:
            try:
                outdir.check_out_dir(out / spec.name, overwrite=opts.overwrite, resume=opts.resume)
            except UserError as exc:
                raise UserError(f"camera {spec.name!r}: {exc}") from None

    def _check_resume(self, spec: CameraSpec, source) -> None:
        """What a camera's own pipeline would refuse on --resume, refused at start instead of retried."""
        if not (source.live or hasattr(source, "skip")):
            raise UserError("--resume continues image files and live sources; run a video anew (--overwrite)")
        folder = self.out_dir / spec.name
        sha = model_sha256(self._batcher(spec).backend)
        check_same_run(outdir.read_summary(folder), folder, sha, source)

    def start(self) -> None:
        """Check OUT, open every camera's source (a bad one is refused now, naming its camera), start the threads."""
        outdir.lock_out_dir(self.out_dir)
        try:
            self._check_out()
            cameras = []
            try:
                for spec in self.specs:
                    options = self._camera_options(spec, added=False)
                    probe = Camera(spec, None, self.out_dir / spec.name, options, timeout_s=self.timeout_s)
                    source = probe._open_source()
                    try:
                        if options.resume:
                            self._check_resume(spec, source)
                        prestarted(source)
                    except (UserError, OSError) as exc:
                        raise UserError(f"camera {spec.name!r}: {exc}") from None
                    cameras.append(self._make_camera(spec, options, source))
            except BaseException:
                for camera in cameras:
                    if camera._source is not None:
                        camera._source.close()
                raise
            with self._lock:
                self.cameras = {camera.name: camera for camera in cameras}
                self.persist()
                self.started = True
                for camera in cameras:
                    camera.start()
        except BaseException:
            outdir.unlock_out_dir(self.out_dir)
            self._release()
            raise
        self.t_start = time.time()

    def _release(self) -> None:
        """Close the batchers and the models this line opened itself (not an Inferencer's or a Backend given to it)."""
        for batcher in self.batchers.values():
            batcher.close()
        self.batchers.clear()
        for backend in self._owned:
            backend.close()
        self._owned.clear()

    def stop(self, reason: str = "interrupted", signum: int = signal.SIGTERM) -> None:
        self._stopping.set()
        self.interrupted = self.interrupted or reason == "interrupted"
        with self._lock:
            cameras = list(self.cameras.values())
        for camera in cameras:
            camera.stop(reason, signum)
        self._changed.set()

    def wait(self, duration: float | None = None) -> None:
        """Until every camera has ended (or `duration` seconds, or stop())."""
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            with self._lock:
                live = [c for c in self.cameras.values() if not c.done]
            if not live or self._stopping.is_set():
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.stop("duration")
                return
            self._changed.wait(0.2)
            self._changed.clear()

    def run(self, duration: float | None = None) -> dict:
        """start(), wait until the cameras end (Ctrl-C/SIGTERM stop them all at a record boundary), close()."""
        self.start()
        restore = self._catch_signals()
        try:
            self.wait(duration)
        finally:
            try:
                summary = self.close()
            finally:
                restore()
        return summary

    def _catch_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            self.stop("interrupted", signum)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(sig) is not signal.SIG_IGN}  # fmt: skip
        return lambda: [signal.signal(sig, old) for sig, old in previous.items()]

    def close(self) -> dict:
        """Stop what still runs, wait for every camera's summary, close the batchers; returns the line summary."""
        try:
            with self._lock:
                cameras = list(self.cameras.values())
            if any(not c.done for c in cameras):
                self.stop("interrupted")
            cameras += [c for c in self.removed.values() if c.name not in self.cameras]
            for camera in cameras:
                camera.join()
            summary = {
                "line": self.name,
                "cameras": {c.name: c.summary for c in cameras},
                "states": {c.name: c.state for c in cameras},
                "errors": {c.name: c.error for c in cameras if c.error},
                "batching": {str(k or "default"): b.stats() for k, b in self.batchers.items()},
                "started_at": getattr(self, "t_start", None),
                "ended_at": time.time(),
            }
            self._release()
            if self.started:
                try:
                    write_json_atomic(summary, self.out_dir / LINE_SUMMARY)
                except OSError as exc:
                    self.log(f"the line summary could not be written ({exc}); each camera's summary.json stands")
        finally:
            if self.started:
                self.started = False
                outdir.unlock_out_dir(self.out_dir)
        return summary
