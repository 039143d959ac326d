"""The Python-backend variant of a Triton model repository: Triton runs adtr-deploy's own runtime inside the server.

write_triton_repository(..., backend="python") (adtr-export --format triton --triton-backend python) writes

    REPO/MODEL/config.pbtxt        backend "python"; the same tensors, batching and `adtr_spec` as the ONNX platform
    REPO/MODEL/model.json          the ModelSpec
    REPO/MODEL/requirements.txt    what the Python-backend stub's environment needs (pip requirement lines)
    REPO/MODEL/1/model.py          adtr_deploy/runtime/triton_model.py: checks the environment, runs OnnxRuntimeBackend
    REPO/MODEL/1/model.onnx        (+ model.json beside it, so the runtime binds the spec to the model's sha256)

Why: the Triton servers that run without a container (the nvidia-pytriton wheel's tritonserver) carry only the Python
backend, and a Python model can later grow preprocessing, tiling or postprocessing in the server. The stub's Python is
the `python3` first on the server's PATH (what `adtr triton serve --python-env` sets) or, when `python_env` is given
here, the config's EXECUTION_ENV_PATH (a virtual environment folder, as the tests use it; Triton also takes a conda-pack tarball).
"""

from __future__ import annotations

from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_copy, atomic_write_text
from adtr_deploy.runtime import triton_model
from adtr_deploy.runtime.triton_env import base_requirements
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec

BACKENDS = ("platform", "python")
REQUIREMENTS_FILENAME = "requirements.txt"
MODEL_FILENAME = "model.py"


class TritonPythonError(UserError):
    """A Python-backend repository cannot be written with these options."""


def python_backend_params(
    backend: str, model_path: Path, kind: str, ort_tensorrt: str | None, python_env, threads: int | None
) -> dict[str, str]:
    """Check the options for backend="python" and return the config parameters it adds."""
    if backend not in BACKENDS:
        raise TritonPythonError(f"Triton backend {backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if model_path.suffix != ".onnx":
        raise TritonPythonError(
            f"the Python backend runs an ONNX model with ONNX Runtime, not {model_path.name}; export --format onnx"
        )
    if kind != "cpu" or ort_tensorrt is not None:
        raise TritonPythonError(
            "the Python-backend model runs ONNX Runtime on the CPU; use kind='cpu' without ort_tensorrt, or the "
            "onnxruntime_onnx platform (the default backend) for GPU instances"
        )
    params = {}
    if python_env is not None:
        env = Path(python_env).expanduser()
        if not env.is_absolute():
            raise TritonPythonError(f"python_env {python_env} must be an absolute path (Triton resolves it itself)")
        if not (env / "bin" / "activate").is_file() and not env.name.endswith((".tar.gz", ".tgz")):
            raise TritonPythonError(
                f"{env} is not a Python environment (no bin/activate) nor a conda-pack tarball; {triton_model.MAKE_ENV}"
            )
        params["EXECUTION_ENV_PATH"] = str(env)
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise TritonPythonError(f"threads must be an integer >= 1 (got {threads!r})")
        params["adtr_threads"] = str(threads)
    return params


def requirements_text() -> str:
    """requirements.txt for the stub's environment: adtr-deploy's own dependencies under the stub's numpy bound."""
    lines = [
        "# The Python environment of Triton's Python-backend stub for this model (adtr-export wrote this file).",
        "# It is checked when the server loads the model (model.py); `adtr triton env DIR` makes one.",
        "# Its Python must be the version of the stub binary (the nvidia-pytriton wheel ships stubs for 3.8-3.13).",
        *triton_model.REQUIREMENTS,
        *base_requirements(),
    ]
    return "\n".join(lines) + "\n"


def write_python_model(version_dir: Path, spec: ModelSpec) -> None:
    """model.py, model.json beside model.onnx, and requirements.txt in the model folder."""
    atomic_copy(Path(triton_model.__file__), version_dir / MODEL_FILENAME)
    spec.save(version_dir / SPEC_FILENAME)
    atomic_write_text(version_dir.parent / REQUIREMENTS_FILENAME, requirements_text())
