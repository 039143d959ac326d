"""TorchScript export: ADTR.forward traced, with the ModelSpec inside as `_extra_files["model.json"]`.

Loading it back needs torch alone: `torch.jit.load(path, _extra_files={"model.json": ""})`. Tracing is enough because
the forward has no Python branches on tensor values, and the traced graph keeps the batch axis free.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from adtr_deploy.export.formats import ExportOptions
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec


def export_torchscript(
    model: torch.nn.Module, path: Path, *, spec: ModelSpec, options: ExportOptions
) -> dict[str, Any]:
    h, w = spec.input_size
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # A frozen copy: the saved module's outputs must not require grad, so callers can call .numpy() on them directly.
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarning, and torch's deprecation notice for torch.jit
        traced = torch.jit.trace(frozen, (example,), check_trace=False)
    details = {"method": "trace", "torch": torch.__version__}
    embedded = spec.replace(extra={**spec.extra, "torchscript": details})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(traced, str(path), _extra_files={SPEC_FILENAME: embedded.to_json()})
    return {"extra": {"torchscript": details}, "notes": [], "files": [path]}
