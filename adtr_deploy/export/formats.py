"""The tables of export formats and precisions (stdlib only, so the CLI's --help and the runtime can read them).

A new format is one row in FORMATS plus its module; a new precision (INT8, issue 10) is one row in PRECISIONS plus the
formats that list it. No if/elif chains over formats anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# format -> what it is and what it supports. `exporter` is "module:function" with the signature
# (model, path, *, spec, options) -> dict of details for the spec's `extra`; imported only when that format is chosen.
FORMATS: dict[str, dict[str, Any]] = {
    "onnx": {
        "filename": "model.onnx",
        "suffix": ".onnx",
        "exporter": "adtr_deploy.export.onnx:export_onnx",
        "dynamic_batch": True,
        "precisions": ("fp32", "fp16"),
        "needs_gpu": False,
        "runs_on": "ONNX Runtime (CPU or CUDA), TensorRT via its ONNX parser",
    },
    "torchscript": {
        "filename": "model.torchscript",
        "suffix": ".torchscript",
        "exporter": "adtr_deploy.export.torchscript:export_torchscript",
        "dynamic_batch": True,
        "precisions": ("fp32",),
        "needs_gpu": False,
        "runs_on": "PyTorch / libtorch (torch.jit.load), CPU or CUDA",
    },
    "tensorrt": {
        "filename": "model.engine",
        "suffix": ".engine",
        "exporter": "adtr_deploy.export.tensorrt:export_tensorrt",
        "dynamic_batch": True,  # within the optimization profile: 1 .. --batch-max
        "precisions": ("fp32", "fp16"),
        "needs_gpu": True,
        "runs_on": "TensorRT on the GPU model and TensorRT version that built it",
    },
}

# precision -> verification tolerance, and the pass that turns the exported FP32 ONNX graph into that precision
# ("module:function" taking and returning (ModelProto, report with .to_dict()); None: the graph stays as exported).
# Differences are measured relative to the range (max - min) of the reference's anomaly maps on the verification
# images; the score is in the same units as the map, so it shares that scale.
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {
        "tolerance": 1e-4,
        "onnx_pass": None,
        "description": "float32 everywhere (TF32 disabled in TensorRT)",
    },
    "fp16": {
        "tolerance": 1e-2,
        "onnx_pass": "adtr_deploy.export.fp16:convert_to_fp16",
        "description": "float16 weights and activations; LayerNorm, Softmax, the L2 map and the score stay float32",
    },
}

ALL = "all"


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def check_format_precision(fmt: str, precision: str) -> None:
    """Raise ValueError with one sentence when the format or precision is unknown or the pair is unsupported."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join([*FORMATS, ALL])}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    supported = FORMATS[fmt]["precisions"]
    if precision not in supported:
        others = [f for f, row in FORMATS.items() if precision in row["precisions"]]
        raise ValueError(
            f"the {fmt} format supports {', '.join(supported)} only; for {precision} use --format {' or '.join(others)}"
        )


@dataclass(frozen=True)
class ExportOptions:
    """Everything a format's exporter may need besides the model and the spec."""

    precision: str = "fp32"
    opset: int = 18
    dynamo: bool = True  # ONNX: torch.export-based exporter; False = the TorchScript-based one
    simplify: bool = False  # ONNX: onnxslim graph simplification
    batch_max: int = 64
    batch_opt: int | None = None  # TensorRT optimization profile's optimum batch (default: min(8, batch_max))
    workspace_gb: float = 4.0  # TensorRT workspace memory pool limit
    device: str = "cuda:0"  # TensorRT build device
    timing_cache: str | None = None  # TensorRT timing cache file (default: beside the engine in the output folder)
