"""Export to TorchScript, ONNX and TensorRT, each verified against the PyTorch reference.

`export_checkpoint(checkpoint, fmt, out_dir, ...) -> ExportResult` is the entry point (adtr-export calls it). Importing
this package is cheap: torch, onnx and tensorrt load only when an export runs, and the export reuses the runtime's
TensorRT engine check (adtr_deploy/runtime/engine_check.py), never the other way round.
"""

from __future__ import annotations

import importlib
from typing import Any

from adtr_deploy.export.formats import FORMATS, PRECISIONS, ExportOptions

# name -> module that defines it, imported on first use (PEP 562)
_LAZY = {
    "export_checkpoint": "adtr_deploy.export.exporter",
    "ExportResult": "adtr_deploy.export.exporter",
    "verify_artifact": "adtr_deploy.export.verify",
    "VerificationError": "adtr_deploy.export.verify",
    "check_engine_compatible": "adtr_deploy.runtime.engine_check",
}

__all__ = ["FORMATS", "PRECISIONS", "ExportOptions", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adtr_deploy.export' has no attribute {name!r}")
