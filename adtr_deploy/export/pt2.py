"""`.pt2` export: torch.export + AOTInductor, PyTorch's successor to TorchScript for deployment.

`torch.export.export` captures the (fused, see fuse.py) inference module with a dynamic batch axis; AOTInductor
(`torch._inductor.aoti_compile_and_package`) compiles it ahead of time into C++ kernels and a shared library packed
in one `.pt2` zip archive, weights included. Loading needs torch (`torch._inductor.aoti_load_package`), no Python model
code. The package is compiled for the machine that builds it (CPU instruction set, or CUDA device and version): build
on the machine kind that runs it.

The ModelSpec travels inside the archive as `<archive>/extra/model.json` (read with `read_embedded_spec`), and as
model.json beside it. AOTInductor needs a C++ compiler (gcc or clang) at export time, not at run time.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from adtr_deploy.export.formats import ExportOptions
from adtr_deploy.runtime.pt2 import EXTRA_FOLDER, read_embedded_spec  # noqa: F401  (re-exported)
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec


class Pt2ExportError(RuntimeError):
    """torch.export or AOTInductor could not build the package."""


def compiler() -> str | None:
    """The C++ compiler AOTInductor would use, or None."""
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def embed_spec(path: Path, spec: ModelSpec) -> None:
    """Add the spec to the package as <archive>/extra/model.json (aoti_load_package ignores other entries)."""
    with zipfile.ZipFile(path, "a") as z:
        names = z.namelist()
        root = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
        z.writestr(f"{root}{EXTRA_FOLDER}/{SPEC_FILENAME}", spec.to_json())


def export_pt2(model: torch.nn.Module, path: Path, *, spec: ModelSpec, options: ExportOptions) -> dict[str, Any]:
    """torch.export the inference module (fused unless --no-fuse) and compile it with AOTInductor into `path`."""
    from adtr_deploy.export.onnx import fused_for_export

    if compiler() is None:
        raise Pt2ExportError(
            "the pt2 format compiles C++ with AOTInductor, and no C++ compiler (g++, clang++) was found; install one "
            "(e.g. apt-get install g++) or export another format"
        )
    module, fusion, notes = fused_for_export(model, options)
    device = torch.device(options.pt2_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Pt2ExportError(f"--pt2-device {options.pt2_device} was asked for, but torch sees no CUDA GPU; use cpu")
    module = module.to(device) if device.type != "cpu" else module  # a CPU export must not move the caller's model
    h, w = spec.input_size
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    example = example.to(device)
    batch = torch.export.Dim("batch", min=1, max=max(int(options.batch_max), 2))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:
        raise Pt2ExportError(f"torch.export/AOTInductor failed ({str(exc).splitlines()[0][:200]})") from None
    details = {
        "method": "torch.export + AOTInductor (aoti_compile_and_package)",
        "torch": torch.__version__,
        "device": str(device),
        "fusion": fusion,
        "compile_seconds": round(time.perf_counter() - start, 1),
    }
    embed_spec(path, spec.replace(extra={**spec.extra, "pt2": details}))
    return {"extra": {"pt2": details}, "notes": notes, "files": [path]}
