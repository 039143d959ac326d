"""`adtr-run --serve` / `--sink`: the live view, metrics, health and alert sinks around one pipeline run.

Used by the CLI in three steps: `Service(...)` checks the options and binds the port before anything heavy loads;
`start(pipeline, model_path)` hooks into the pipeline (observers + a pause event) and starts the threads; after the run,
`linger()` keeps serving the final state and `close()` drains the sinks and stops the server.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from adtr_deploy.errors import MissingExtraError, UserError
from adtr_deploy.runtime.redaction import redact_url
from adtr_deploy.runtime.review import Review
from adtr_deploy.runtime.serve.sinks import Sink, parse_sink, sink_observer
from adtr_deploy.runtime.serve.state import STALL_S, LiveState

TOKEN_ENV = "ADTR_SERVE_TOKEN"
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str | None) -> str | None:
    """Every URL inside a text (a sink's name, an error message) masked with redact_url."""
    return None if text is None else _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or PORT (then 127.0.0.1) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--serve {text} is not HOST:PORT; write e.g. --serve 127.0.0.1:8080 or --serve 0.0.0.0:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere: treat it as reachable from the network


def model_identity(engine, pipeline, model_path: Path | str) -> dict:
    """What the page shows about the model: name, sha256, threshold, input size, backend, device."""
    spec = engine.spec
    sha = spec.extra.get("sha256")
    path = Path(model_path)
    if not sha and path.is_file():
        from adtr_deploy.fileio import sha256_file

        sha = sha256_file(path)
    return {
        "name": str(model_path),
        "sha256": sha,
        "threshold": pipeline.post.threshold,
        "calibration": pipeline.post.calibration.method,
        "input_size": list(spec.input_size),
        "preset": spec.preset,
        "backbone": spec.backbone,
        "format": spec.format,
        "precision": spec.precision,
        "backend": getattr(engine, "name", type(engine).__name__),
        "device": str(getattr(engine, "device", "")),
    }


class Service:
    """Live view + metrics + health (when `serve` is given) and alert sinks, for one run."""

    def __init__(
        self,
        serve: str | None,
        token: str | None = None,
        sinks: tuple[str, ...] | list[str] = (),
        *,
        log: Callable[[str], None] = print,
        max_fps: float = 5.0,
        auth: str = "write",
        tls_cert: str | None = None,
        tls_key: str | None = None,
        hosts: tuple[str, ...] | list[str] = (),
        sink_options: dict | None = None,
    ):
        self.log = log
        self.token = token or None
        self.auth = auth  # "write": control needs the token; "all": reading too (health probes excepted)
        self.hosts = {h.lower().strip("[]") for h in hosts}  # extra names the server is reached by (Host check)
        self.max_fps = max_fps
        self.pause = threading.Event()
        self.closing = False
        self.streams = 0
        self.state: LiveState | None = None
        self.server = None
        self.url: str | None = None
        self.registry = None
        self._backend_loaded = False
        self._lock = threading.Lock()
        # sink_options: spool_root, max_messages, token, secret (to each sink); line, out_dir (to the messages)
        options = dict(sink_options or {})
        self._sink_message = {"line": options.pop("line", None), "out_dir": options.pop("out_dir", None)}
        out_dir = self._sink_message["out_dir"]
        self.review = None if out_dir is None else Review(out_dir)  # the kept frames' review (/api/review)
        self.sinks: list[Sink] = [parse_sink(s, log=log, **options) for s in sinks]
        self.model: dict = {}  # filled in by start(), once the model is loaded
        self._serving = False
        self.drift = None  # the run's DriftMonitor (attach_drift), shown in status and metrics
        self.recalibrator = None  # POST /api/recalibrate (adtr_deploy.runtime.recalibrate.RunRecalibrator)
        self.rollout = None  # a versioned model folder's versions: GET /api/model, POST /api/model/rollback
        if serve is not None:
            host, port = parse_address(serve)
            if not is_loopback(host) and self.token is None:
                raise UserError(
                    f"--serve {serve} is reachable from the network, so control needs a token: pass --serve-token "
                    f"SECRET or set {TOKEN_ENV} (or serve on 127.0.0.1)"
                )
            if auth not in ("write", "all"):
                raise UserError(f"--serve-auth {auth} is not a mode; use write (control needs the token) or all")
            if auth == "all" and self.token is None:
                raise UserError(f"--serve-auth all needs a token: pass --serve-token SECRET or set {TOKEN_ENV}")
            self.loopback = is_loopback(host)
            if not self.loopback:  # what a browser on the network may call this box (checked on control requests)
                self.hosts |= {host.lower(), socket.gethostname().lower(), socket.getfqdn().lower()}
            try:
                import prometheus_client  # noqa: F401 -- the serve extra, checked before the model loads
            except ImportError:
                raise MissingExtraError("--serve needs the serve extra: pip install 'adtr-deploy[serve]'") from None
            from adtr_deploy.runtime.serve.server import make_server, tls_context

            context = tls_context(tls_cert, tls_key)
            self.server = make_server(host, port, self, context)
            bound_host, bound_port = self.server.server_address[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.url = f"{'https' if context else 'http'}://{shown}:{bound_port}/"
            self.state = LiveState(self.model, {}, max_fps=max_fps)

    # -- pipeline side ---------------------------------------------------------------------------------------------
    def pipeline_hooks(self) -> dict:
        """Keyword arguments for Pipeline: the observers, and the pause event when serving."""
        observers: list[Callable] = []
        if self.sinks:
            observers.append(sink_observer(self.sinks, self.model, **self._sink_message))
        if self.state is not None:
            observers.append(self.state.observe)
            return {"observers": observers, "pause": self.pause}
        return {"observers": observers}

    def attach_drift(self, monitor) -> None:
        """Show the drift monitor (status, metrics, the DRIFT line state) and send its start/clear events to the sinks."""
        self.drift = monitor
        monitor.listeners.append(self._drift_event)

    def _drift_event(self, event: dict) -> None:
        """One sink message when drift starts and one when it clears (adtr_deploy.runtime.drift)."""
        import uuid
        from datetime import datetime, timezone

        line = getattr(self, "_sink_message", {}).get("line")
        message = {
            **event,
            "event_id": str(uuid.uuid4()),
            "line": line,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "model": {k: self.model.get(k) for k in ("name", "sha256")},
        }
        for sink in self.sinks:
            sink.offer(message)

    def recalibrate(self, request: dict) -> dict:
        """POST /api/recalibrate: {"frames": N, "by": NAME, "allow_flagged": false}, all optional."""
        if self.recalibrator is None:
            raise UserError("this run keeps no scores to recalibrate from (drift monitoring is off)")
        unknown = sorted(set(request) - {"frames", "by", "allow_flagged"})
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; send frames, by and allow_flagged only")
        result = self.recalibrator.recalibrate(
            request.get("frames"), request.get("by"), request.get("allow_flagged", False)
        )
        rec = result["record"]
        self.log(
            f"recalibrated from the live view by {rec['by']} on {rec['frames']} frames: threshold "
            f"{result['previous_threshold']:.6g} -> {result['calibration']['threshold']:.6g} (version {rec['version']})"
        )
        return result

    def attach_rollout(self, rollout) -> None:
        """A versioned model folder (adtr_deploy.runtime.rollout): the page, the API and recalibration follow its
        switches. Before start()."""
        self.rollout = rollout
        rollout.listeners.append(self._model_switched)

    def _model_switched(self, rollout, engine) -> None:
        """On the pipeline's thread, right after a switch: the identity shown, and what recalibration writes."""
        self.model.update(model_identity(engine, rollout.pipeline, rollout.folder))
        self.model.update(name=str(rollout.repo.path), version=rollout.version)
        if self.recalibrator is not None:
            self.recalibrator.follow(engine, rollout.folder)

    def model_status(self) -> dict:
        """GET /api/model: the model running (version, sha256, threshold) and, for a versioned folder, its versions,
        the revoked and refused ones and the last swap."""
        shown = {k: self.model.get(k) for k in ("name", "version", "sha256", "threshold", "calibration", "backend")}
        return {**shown, **(self.rollout.status() if self.rollout is not None else {"versioned": False})}

    def rollback(self, request: dict) -> dict:
        """POST /api/model/rollback: {"by": NAME, "why": TEXT}, both optional."""
        if self.rollout is None:
            raise UserError(
                f"this run's model {self.model.get('name')} is a plain path, so it has no versions to roll back to; "
                "run a versioned model folder (adtr-run --model MODELS/NAME)"
            )
        unknown = sorted(set(request) - {"by", "why"})
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; send by and why only")
        return {"swap": self.rollout.rollback(request.get("by"), request.get("why")), "model": self.model_status()}

    def activate(self, request: dict) -> dict:
        """POST /api/model/activate: {"version": N, "by": NAME, "why": TEXT}; by and why optional."""
        if self.rollout is None:
            raise UserError(
                f"this run's model {self.model.get('name')} is a plain path, so it has no versions to activate; "
                "run a versioned model folder (adtr-run --model MODELS/NAME)"
            )
        unknown = sorted(set(request) - {"version", "by", "why"})
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; send version, by and why only")
        swap = self.rollout.activate(request.get("version"), request.get("by"), request.get("why"))
        return {"swap": swap, "model": self.model_status()}

    def start(self, pipeline, engine, model_path: Path | str) -> None:
        """Fill in the model's identity and start the threads (render, HTTP, sinks)."""
        self.model.update(model_identity(engine, pipeline, model_path))
        self.model["version"] = None
        if self.rollout is not None:
            self.model.update(name=str(self.rollout.repo.path), version=self.rollout.version)
        if self.drift is not None:
            from adtr_deploy.runtime.recalibrate import RunRecalibrator

            self.recalibrator = RunRecalibrator(pipeline, engine, model_path, self.drift, self.model)
        for sink in self.sinks:
            sink.start()
        if self.server is None:
            return
        from adtr_deploy.runtime.serve.metrics import build_registry

        src = pipeline.source
        self.registry, self.state.timing = build_registry(self)
        self.state.source.update(name=src.name, live=src.live, total=src.total)
        self.state.source_stats = src.stats
        # The stall timeout: a live source's own --timeout (it reconnects after that long without a frame).
        self.state.stale_s = float(getattr(src, "timeout_s", STALL_S)) if src.live else STALL_S
        self.state.frame_listeners.append(self.server.wake)  # MJPEG viewers get each new frame at once
        self.state.drift = getattr(self, "drift", None)  # DRIFT is one of the line's states
        self.state.start()
        self._backend_loaded = True
        self.state.model_loaded = True
        self._serving = True
        threading.Thread(target=self.server.serve_forever, name="adtr-serve-http", daemon=True).start()
        note = {"write": "", "all": "; reading and control need the token"}[self.auth]
        if self.auth == "write" and self.token is not None:
            note = "; pause/resume need the token"
        self.log(
            f"live view on {self.url} (metrics {self.url}metrics, health {self.url}healthz, readiness "
            f"{self.url}readyz){note}"
        )

    # -- HTTP side ---------------------------------------------------------------------------------------------------
    def status(self, since: int = 0) -> dict:
        snap = self.state.snapshot(since)
        snap["sinks"] = self.sink_stats()
        snap["control"] = {"needs_token": self.token is not None, "header": "X-ADTR-Token"}
        if self.drift is not None:  # the line state (state.line_state) says DRIFT; here: by how much, since when
            snap["drift"] = self.drift.status()
        if self.rollout is not None:  # a versioned model folder: the last swap, refused versions (runtime/rollout.py)
            snap["rollout"] = self.rollout.brief()
        return snap

    def health(self) -> dict:
        """/healthz: the process lives and its server answers (this answer is the proof); nothing else is checked."""
        return {"ok": True, "uptime_s": round(time.time() - self.state.started, 1), "pid": os.getpid()}

    def ready(self) -> dict:
        """/readyz: inspecting now (source up, frames within the stall timeout, model loaded), else the reason."""
        return self.state.readiness()

    def host_allowed(self, host_header: str) -> bool:
        """A Host header this server may be called by: an IP address (no DNS name can be rebound to it), localhost,
        or a name it is known by (its --serve host, this machine's names, --serve-host). Anything else is what a
        DNS-rebinding page sends."""
        try:
            name = urllib.parse.urlsplit("//" + host_header).hostname or ""
        except ValueError:
            return False
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        return name == "localhost" or name.endswith(".localhost") or name in self.hosts

    def metrics(self) -> tuple[bytes, str]:
        from adtr_deploy.runtime.serve.metrics import render

        return render(self.registry)

    def sink_stats(self) -> list[dict]:
        """Each sink's counters; names and errors masked again here (whatever a sink reports, no secret is served)."""
        return [
            {**s, "name": redact_text(str(s["name"])), "last_error": redact_text(s.get("last_error"))}
            for s in (sink.stats() for sink in self.sinks)
        ]

    def set_paused(self, paused: bool) -> None:
        if self.state.state in ("finished",):
            return
        if paused:
            self.pause.set()
        else:
            self.pause.clear()
        self.state.set_state("paused" if paused else "running")
        self.log("inference paused from the live view" if paused else "inference resumed from the live view")

    # -- end ---------------------------------------------------------------------------------------------------------
    def linger(self, seconds: float | None, summary: dict) -> None:
        """After the source ended: keep serving the final state for `seconds` (None: until Ctrl-C / SIGTERM)."""
        if self.state is not None:
            self.state.set_state("finished")
            self.state.model_loaded = False
        self._backend_loaded = False
        if self.server is None or summary.get("stopped") == "interrupted" or seconds == 0:
            return
        how = "until Ctrl-C" if seconds is None else f"for {seconds:g} s"
        self.log(f"the source has ended; still serving the results on {self.url} {how}")
        try:
            end = None if seconds is None else time.monotonic() + seconds
            while end is None or time.monotonic() < end:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

    def close(self) -> None:
        """Drain the sinks (a few seconds at most), stop the server and the render thread; log what the sinks did."""
        self.closing = True
        self._backend_loaded = False
        if self.state is not None:
            self.state.model_loaded = False
        for sink in self.sinks:
            sink.close()
            self.log(sink.summary())
        if self.server is not None:
            if self._serving:  # shutdown() waits for serve_forever, which never ran if the model failed to load
                self.server.shutdown()
            self.server.server_close()
        if self.state is not None:
            self.state.stop()
            cpu = self.state.cpu_s
            parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            self.log(f"serving used {sum(cpu.values()):.2f} s of CPU ({parts})")
