"""What machine and software a benchmark ran on: without this, a number means nothing."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from adtr_deploy.runtime.cpu import cpu_info

LIBRARIES = (
    "adtr-deploy",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "openvino",
    "torch",
    "tensorrt",
    "opencv-python-headless",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def gpu_info() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_mb": p.total_memory / 2**20,
                "compute_capability": f"{p.major}.{p.minor}",
            }
        )
    return out


def machine_info() -> dict:
    """CPU model, cores, memory, GPUs, OS, Python and library versions, and the load when the run started."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        physical, memory_gb = None, None
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cpu_info": cpu_info(),  # the model and the flags that decide which precision is fast (runtime/cpu.py)
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "memory_gb": memory_gb,
        "gpus": gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
        "load_average_start": load_average(),
    }
