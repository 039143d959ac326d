"""A local Triton Inference Server for a model repository: `adtr triton serve REPO`, and the tests' real server.

The server binary is a `tritonserver` given by path, the one on PATH, or the one in the nvidia-pytriton wheel
(`pip install 'adtr-deploy[triton-server]'`: Triton 2.51 with only the Python backend). For the wheel's binary a backend
folder is laid out with the Python-backend stub of the environment's Python version, and the wheel's libraries go on
LD_LIBRARY_PATH. The Python-backend environment (runtime/triton_env.py) goes first on the server's PATH, which is how
the stub finds its interpreter; it is checked before the server starts when the repository has Python-backend models.

Failures are one sentence each: binary missing, port in use, the environment unfit, a model that failed to load (with
the server's own reason from its log), a server that is not ready in time. stop() sends SIGTERM and waits for Triton's
own graceful shutdown (bounded by exit_timeout_s), then kills the process group if it has to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.triton_env import TritonEnvError, backend_dir, require_env, wheel_layout

MODEL_CONTROL = ("none", "explicit", "poll")
LOAD_FAILURE = re.compile(r"failed to (?:load|poll model) '([^']+)'(?: version \d+)?: (.*?)\"?$")
PYTHON_BACKEND = re.compile(r'^\s*backend\s*:\s*"python"', re.M)
PORT_IN_USE = re.compile(r"(Socket '[^']*' already in use|Address already in use)")


class TritonServerError(UserError):
    """A local Triton server could not be started or stopped."""


def find_server(server: str | None = None) -> tuple[Path, object | None]:
    """(binary, wheel layout or None): `server` when given, else a tritonserver on PATH, else the wheel's."""
    if server:
        path = Path(server).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TritonServerError(f"{server} is not an executable tritonserver binary")
        layout = wheel_layout()
        return path, layout if layout is not None and path.resolve() == layout.binary.resolve() else None
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    layout = wheel_layout()
    if layout is None:
        raise TritonServerError(
            "no tritonserver found: install the one in the nvidia-pytriton wheel with "
            "pip install 'adtr-deploy[triton-server]', put a tritonserver on PATH, or give its path with --server"
        )
    return layout.binary, layout


def has_python_models(repo: Path) -> bool:
    return any(PYTHON_BACKEND.search(p.read_text(errors="replace")) for p in sorted(repo.glob("*/config.pbtxt")))


def port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not "in use"
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_port(address: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks that start several servers)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo, http_port=..., ...) as server:` starts tritonserver and waits until it is ready.

    python_env: the Python-backend environment (default: this interpreter's, sys.prefix), checked when `repo` holds
    Python-backend models. model_control: Triton's --model-control-mode; load_models: --load-model names (explicit
    mode; "*" loads all). log_file: where the server's output goes (default: a file in the server's work folder).
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        server: str | None = None,
        python_env: str | Path | None = None,
        model_control: str = "none",
        load_models: tuple[str, ...] = (),
        log_file: str | Path | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = 10,
        extra_args: tuple[str, ...] = (),
    ):
        self.repo = Path(repo).expanduser().absolute()
        if not self.repo.is_dir():
            raise TritonServerError(
                f"model repository {repo} is not a folder; write one with adtr-export --format triton"
            )
        if model_control not in MODEL_CONTROL:
            raise TritonServerError(f"model control mode {model_control!r} is not one of {', '.join(MODEL_CONTROL)}")
        if load_models and model_control != "explicit":
            raise TritonServerError("models to load at start (--load-model) need --model-control explicit")
        self.ports = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
        self.address = address
        self.server = server
        self.python_env = Path(python_env).expanduser().absolute() if python_env else Path(sys.prefix)
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = int(log_verbose)
        self.exit_timeout_s = int(exit_timeout_s)
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.version = ""
        self.env_report = None

    # --- addresses ---------------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.ports['metrics']}/metrics"

    # --- start and stop ----------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> TritonServer:
        binary, layout = find_server(self.server)
        for name, port in self.ports.items():
            if not port_free(self.address, port):
                raise TritonServerError(
                    f"port {port} ({name}) is already in use on {self.address}; stop what holds it or choose "
                    f"another with --{name}-port"
                )
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the stub's environment is python_env's, not the caller's
        self.workdir = Path(tempfile.mkdtemp(prefix="adtr-triton-"))
        args = [str(binary), f"--model-repository={self.repo}"]
        python_models = has_python_models(self.repo)
        try:
            if python_models or layout is not None:
                self.env_report = require_env(self.python_env)
            if layout is not None:
                version = self.env_report.python_version
                args.append(f"--backend-directory={backend_dir(layout, self.workdir, version)}")
                args.append(f"--cache-directory={layout.root / 'caches'}")
                env["LD_LIBRARY_PATH"] = _join(env.get("LD_LIBRARY_PATH"), str(layout.libs))
            if self.env_report is not None:
                env["PATH"] = _join(str(self.env_report.python.parent), env.get("PATH"))
                if self.env_report.libdir:  # the stub links libpythonX.Y.so; a pyenv or conda python keeps it here
                    env["LD_LIBRARY_PATH"] = _join(env.get("LD_LIBRARY_PATH"), self.env_report.libdir)
        except TritonEnvError as exc:
            self._cleanup()
            raise TritonServerError(str(exc)) from None
        args += [
            f"--http-address={self.address}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.ports['metrics']}",
            f"--model-control-mode={self.model_control}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *[f"--load-model={m}" for m in self.load_models],
            *self.extra_args,
        ]
        self.log_path = self.log_file or self.workdir / "tritonserver.log"
        self._log = open(self.log_path, "ab")
        self.command = args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(self._failure(f"tritonserver exited with code {self.proc.returncode}"))
            if self._get("/v2/health/ready") == 200:
                meta = self.get_json("/v2")
                self.version = str(meta.get("version", "")) if isinstance(meta, dict) else ""
                return
            time.sleep(0.2)
        raise TritonServerError(self._failure(f"tritonserver was not ready within {timeout_s:.0f} s"))

    def _failure(self, what: str) -> str:
        """One sentence: what happened and the server's own reason from its log."""
        text = self.log_text()
        for line in text.splitlines():
            m = LOAD_FAILURE.search(line.strip())
            if m:
                # the log escapes the traceback's newlines: the reason is what comes before the first one
                reason = m.group(2).strip().rstrip('"').split("\\n")[0].rstrip(".")
                hint = ""
                if "unable to find backend library" in reason or "unable to find '" in reason:
                    hint = " (the nvidia-pytriton wheel's server has only the Python backend: export with --triton-backend python)"
                return f"{what}: model {m.group(1)!r} failed to load: {reason}{hint}; full log: {self.log_path}"
        m = PORT_IN_USE.search(text)
        if m:
            return f"{what}: a port is already in use ({m.group(1)}); choose other ports; full log: {self.log_path}"
        errors = [
            ln.strip()
            for ln in text.splitlines()
            if (ln.startswith("E") or "error" in ln.lower()) and "CudaDriverHelper" not in ln and "NVML" not in ln
        ]
        last = errors[-1] if errors else (text.strip().splitlines()[-1:] or ["no output"])[0]
        return f"{what}: {last[:400]}; full log: {self.log_path}"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait for Triton's graceful shutdown, kill if it overstays. Returns the exit code. Safe twice."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait(10)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None
        if self.workdir is not None:  # the backend copies go; the default log stays for the failure message
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)
            if self.log_file is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- small HTTP helpers (no tritonclient needed) -----------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _get(self, path: str, port: str = "http") -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.address}:{self.ports[port]}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def get_json(self, path: str):
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None


def _join(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)
