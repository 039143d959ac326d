"""`.pt2` packages (torch.export + AOTInductor, written by `adtr-export --format pt2`) through torch, imported lazily.

A package holds compiled C++ kernels for one machine kind: the CPU instruction set, or the CUDA device and version it
was built on (model.json: extra["pt2"]["device"]). It needs torch to load (`torch._inductor.aoti_load_package`) but no
Python model code. The spec is read from model.json beside the package or from its `<archive>/extra/model.json`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from adtr_deploy.runtime.base import Backend, BackendError, parse_device, read_spec
from adtr_deploy.spec import SPEC_FILENAME

EXTRA_FOLDER = "extra"  # where the package keeps the spec, beside AOTInductor's own entries


def read_embedded_spec(path: str | Path) -> str | None:
    """The spec JSON inside a .pt2 package, or None (no such entry, or not a zip archive)."""
    try:
        with zipfile.ZipFile(path) as z:
            wanted = [n for n in z.namelist() if n.endswith(f"{EXTRA_FOLDER}/{SPEC_FILENAME}")]
            return z.read(wanted[0]).decode() if wanted else None
    except (OSError, zipfile.BadZipFile):
        return None


class Pt2Backend(Backend):
    """An AOTInductor package on the device kind it was compiled for."""

    name = "pt2"

    def __init__(self, path: str | Path, device: str = "cpu"):
        try:
            import torch
            import torch._inductor  # noqa: F401  (aoti_load_package lives here)
        except ImportError:
            raise BackendError("a .pt2 model needs torch; install it, or run the .onnx model instead") from None
        kind, index = parse_device(device)
        if kind == "tensorrt":
            raise BackendError("--device tensorrt needs an .onnx or .engine model; a .pt2 package runs on cpu or cuda")
        super().__init__(path, read_spec(path, read_embedded_spec(path)), device)
        built_for = str(((self.spec.extra or {}).get("pt2") or {}).get("device", "cpu"))
        if built_for.split(":")[0] != kind:
            raise BackendError(
                f"{Path(path).name} was compiled for {built_for}, not {kind}: an AOTInductor package runs only on the "
                f"device kind that built it; re-export with --pt2-device {kind} or use --device {built_for.split(':')[0]}"
            )
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda was requested but torch sees no CUDA GPU; use a cpu package")
        self._device = "cpu" if kind == "cpu" else f"cuda:{index}"
        try:
            self.module = torch._inductor.aoti_load_package(str(path), device_index=index if kind == "cuda" else -1)
        except Exception as exc:
            raise BackendError(f"{path} is not a loadable .pt2 package ({str(exc).splitlines()[0][:200]})") from None
        self._torch = torch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            amap, score = self.module(torch.from_numpy(self.check_batch(batch)).to(self._device))
        return self.as_outputs(amap.float().cpu().numpy(), score.float().cpu().numpy())
