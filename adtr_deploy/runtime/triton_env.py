"""The Python environment of Triton's Python-backend stub, and the server files that go with it.

Triton runs each Python-backend model instance in a separate process, `triton_python_backend_stub`, a binary built for
one Python version that embeds the interpreter it finds as `python3` on the server's PATH (or the model's
EXECUTION_ENV_PATH, which Triton activates). That environment is not the server's and not necessarily the user's:
Triton 2.51's stub (the nvidia-pytriton 0.7.0 wheel) needs numpy < 2, while adtr-deploy's own environment may well
have numpy 2 (OpenCV 4.11+ asks for it). So:

- `check_env(prefix)` runs the model's own check (runtime/triton_model.py --check) in that environment's python;
- `make_env(prefix)` (`adtr triton env DIR`) makes a virtual environment that passes it: the stub's numpy bound,
  ONNX Runtime (the version installed here when there is one), adtr-deploy's base requirements, and this adtr_deploy
  package made importable through a .pth file (no copy, so an editable checkout stays live);
- `wheel_layout()` finds the server, backends and stubs in the nvidia-pytriton wheel, and `backend_dir()` lays out a
  backend folder with the stub for the environment's Python version (as the wheel's own launcher does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.runtime import triton_model

PTH_NAME = "adtr_deploy_runtime.pth"


class TritonEnvError(UserError):
    """The Python-backend environment or the server's files are missing or unfit."""


@dataclass(frozen=True)
class EnvReport:
    prefix: Path
    python: Path
    python_version: str
    libdir: str | None
    versions: dict
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems


def env_python(prefix: str | Path) -> Path:
    """The python3 of an environment folder (a venv or conda env, as Triton's PATH lookup would find it)."""
    prefix = Path(prefix).expanduser().absolute()
    python = prefix / "bin" / "python3"
    if not python.exists():
        raise TritonEnvError(f"{prefix} is not a Python environment (no bin/python3); {triton_model.MAKE_ENV}")
    return python


def check_env(prefix: str | Path, timeout_s: float = 120.0) -> EnvReport:
    """Run the Python-backend model's own environment check in that environment's python."""
    python = env_python(prefix)
    try:
        proc = subprocess.run(
            [str(python), triton_model.__file__, "--check"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TritonEnvError(f"cannot run {python} to check the Python-backend environment ({exc})") from None
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TritonEnvError(f"{python} could not check the Python-backend environment ({tail[0][:300]})") from None
    return EnvReport(
        Path(prefix).expanduser().absolute(),
        python,
        data["python_version"],
        data.get("libdir"),
        data["versions"],
        data["problems"],
    )


def require_env(prefix: str | Path) -> EnvReport:
    """check_env, raising one sentence when the environment is unfit."""
    report = check_env(prefix)
    if report.problems:
        raise TritonEnvError(
            f"the Python-backend environment {report.prefix} cannot serve adtr models: {'; '.join(report.problems)}; "
            f"{triton_model.MAKE_ENV}"
        )
    return report


def make_env(prefix: str | Path, *, python: str | None = None, log=print) -> EnvReport:
    """Create (or complete) a virtual environment at `prefix` that passes check_env, and return its report."""
    prefix = Path(prefix).expanduser().absolute()
    if not (prefix / "bin" / "python3").exists():
        log(f"creating a virtual environment in {prefix}")
        _run([python or sys.executable, "-m", "venv", str(prefix)], "creating the virtual environment")
    reqs = list(triton_model.REQUIREMENTS)
    try:
        import onnxruntime

        reqs[1] = f"onnxruntime=={onnxruntime.__version__}"  # the same ONNX Runtime in the server as here
    except ImportError:
        pass
    reqs += base_requirements()
    log("installing " + " ".join(reqs))
    _run([str(prefix / "bin" / "python3"), "-m", "pip", "install", "--quiet", *reqs], "installing the requirements")
    # adtr_deploy itself, without copying it: a folder holding only a link to the package, put on sys.path by a .pth
    src = prefix / "adtr-src"
    src.mkdir(exist_ok=True)
    link = src / "adtr_deploy"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(triton_model.__file__).resolve().parents[1], target_is_directory=True)
    site = _run(
        [str(prefix / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        "finding the environment's site-packages",
    ).strip()
    (Path(site) / PTH_NAME).write_text(str(src) + "\n")
    return require_env(prefix)


def base_requirements() -> list[str]:
    """adtr-deploy's install requirements without extras (numpy's own bound is REQUIREMENTS'), as installed here."""
    try:
        from importlib.metadata import PackageNotFoundError, requires

        reqs = requires("adtr-deploy") or []
    except PackageNotFoundError:
        reqs = []
    out = [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]
    return [r for r in out if r and not r.startswith("numpy")] or ["opencv-python-headless>=4.8", "click>=8.1"]


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TritonEnvError(f"{what} failed ({exc})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise TritonEnvError(f"{what} failed ({(lines[-1:] or [f'exit {proc.returncode}'])[0][:300]})")
    return proc.stdout


# --- the server's files from the nvidia-pytriton wheel ------------------------------------------------------------


@dataclass(frozen=True)
class WheelLayout:
    root: Path  # pytriton/tritonserver
    binary: Path  # bin/tritonserver
    libs: Path  # nvidia_pytriton.libs: the shared libraries the binary and stubs link against
    stubs: Path  # python_backend_stubs/<X.Y>/triton_python_backend_stub


def wheel_layout() -> WheelLayout | None:
    """The tritonserver of the nvidia-pytriton wheel (adtr-deploy[triton-server]), or None where it is not installed.
    Located without importing pytriton (its package pulls in its client and numpy)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = pkg / "tritonserver"
    layout = WheelLayout(
        root, root / "bin" / "tritonserver", pkg.parent / "nvidia_pytriton.libs", root / "python_backend_stubs"
    )
    return layout if layout.binary.is_file() else None


def backend_dir(layout: WheelLayout, workdir: Path, python_version: str) -> Path:
    """A backend folder for the wheel's server whose Python backend runs the stub built for `python_version`."""
    stub = layout.stubs / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in layout.stubs.iterdir()) if layout.stubs.is_dir() else []
        raise TritonEnvError(
            f"the nvidia-pytriton wheel has no Python-backend stub for Python {python_version} (it has {', '.join(have)}); "
            "make the environment with one of those Python versions (adtr triton env DIR --python PYTHON)"
        )
    backends = workdir / "backends"
    shutil.copytree(
        layout.root / "backends", backends, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends
