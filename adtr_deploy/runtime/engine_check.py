"""Can this machine run a serialized TensorRT engine? (torch-free; the runtime's rule, which the export reuses)

A serialized engine runs only with the TensorRT version that built it and on the GPU architecture (compute capability)
it was built for. The export records both, with the GPU's name and CUDA version, in model.json `extra["tensorrt"]`
(`environment()` gives them in that shape); `check_engine_compatible(spec)` compares that record with this machine so
that a mismatch is one clear sentence instead of TensorRT's deserialization error. Nothing heavy is imported at module
level: `tensorrt` and cuda-python load when the environment is asked for.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from adtr_deploy.errors import UserError
from adtr_deploy.spec import ModelSpec

INSTALL_HINT = "pip install 'adtr-deploy[tensorrt]' on a machine with an NVIDIA GPU"
MIN_MAJOR = 10

# Keys of extra["tensorrt"] that must match the machine that runs the engine.
MUST_MATCH = ("tensorrt_version", "compute_capability")


class TensorRTUnavailable(UserError, RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine."""


class EngineCompatibilityError(UserError, RuntimeError):
    """A serialized engine was built for another GPU or TensorRT version than this machine has."""


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); '11.0.0b1' -> (11, 0, 0). Raises ValueError when there is no number."""
    parts = []
    for piece in str(text).strip().split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise UserError(f"{text!r} is not a version number")
    return tuple(parts)


def compatibility_problems(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the build environment (from model.json) and this one; empty when the engine can run."""
    problems = []
    for key in MUST_MATCH:
        if recorded.get(key) is None:
            problems.append(f"the engine's model.json does not record its {key.replace('_', ' ')}")
        elif str(recorded[key]) != str(current.get(key)):
            problems.append(
                f"it was built with {key.replace('_', ' ')} {recorded[key]}, this machine has {current.get(key)}"
            )
    return problems


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable with one sentence saying what to install."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT is not installed; install it with {INSTALL_HINT}") from None


def device_index(device: str | int) -> int:
    """'cuda:1' / 'cuda' / '1' / 1 -> CUDA device index."""
    text = str(device).strip().lower()
    m = re.fullmatch(r"(?:cuda|gpu)?:?(\d*)", text)
    if not m:
        raise UserError(f"device {device!r} is not a CUDA device; use cuda, cuda:0, cuda:1, ...")
    return int(m.group(1) or 0)


def gpu_from_cuda_python(index: int) -> dict[str, Any]:
    """GPU facts through cuda-python (part of the tensorrt extra; no torch)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python before 12.6
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= index:
        raise TensorRTUnavailable(f"no CUDA GPU with index {index} is visible")
    err, props = cudart.cudaGetDeviceProperties(index)
    _, runtime_version = cudart.cudaRuntimeGetVersion()
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "gpu": name.strip("\x00 "),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_version": f"{runtime_version // 1000}.{(runtime_version % 1000) // 10}",
    }


GpuProbe = Callable[[int], dict[str, Any]]
# The runtime asks cuda-python only: its TensorRT backend needs cuda-python for its buffers anyway. The export adds a
# torch probe after it (adtr_deploy.export.tensorrt.GPU_PROBES).
GPU_PROBES: tuple[GpuProbe, ...] = (gpu_from_cuda_python,)


def gpu_info(index: int = 0, probes: Sequence[GpuProbe] = GPU_PROBES) -> dict[str, Any]:
    """The first answer of `probes` about GPU `index`; TensorRTUnavailable in one sentence when none can tell."""
    reasons = []
    for probe in probes:
        try:
            return probe(index)
        except ImportError as exc:
            reasons.append(str(exc))
        except TensorRTUnavailable:
            raise
        except Exception as exc:  # a driver error is reported the same way as a missing GPU
            reasons.append(f"{type(exc).__name__}: {exc}")
    raise TensorRTUnavailable(
        f"TensorRT needs an NVIDIA GPU and none could be queried ({'; '.join(reasons)[:200]}); "
        f"build the engine on the machine that will run it, with {INSTALL_HINT}"
    )


def environment(device: str | int = 0, probes: Sequence[GpuProbe] = GPU_PROBES) -> dict[str, Any]:
    """TensorRT version and GPU facts of this machine, in the shape recorded in extra["tensorrt"]."""
    trt = require_tensorrt()
    index = device_index(device)
    return {"tensorrt_version": trt.__version__, "device_index": index, **gpu_info(index, probes)}


def check_engine_compatible(spec: ModelSpec, device: str | int = 0) -> dict[str, Any]:
    """Raise EngineCompatibilityError unless this machine's GPU and TensorRT match those that built the engine; return
    this machine's environment() when they do.

    Called before deserializing, so a mismatch is one clear sentence instead of TensorRT's deserialization error. The
    GPU's name is informative only; the compute capability decides.
    """
    recorded = dict(spec.extra.get("tensorrt") or {})
    if not recorded:
        raise EngineCompatibilityError(
            "the engine's model.json has no TensorRT build record; re-export it with adtr-export --format tensorrt"
        )
    current = environment(device)
    problems = compatibility_problems(recorded, current)
    if problems:
        raise EngineCompatibilityError(
            f"this TensorRT engine cannot run here: {'; '.join(problems)}; rebuild it on this machine with "
            "adtr-export --format tensorrt"
        )
    return current
