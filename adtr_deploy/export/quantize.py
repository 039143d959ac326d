"""INT8 passes over the exported FP32 ONNX graph (ONNX Runtime's quantization tools); images.py picks the images,
quant_graph.py decides what is quantized and repairs the graph afterwards.

Static INT8 (`int8`): `quant_pre_process` (shape inference + ONNX Runtime's basic graph optimizations), then
`quantize_static` in the Q/DQ format with per-channel int8 weights, calibrated on good TRAINING images. Dynamic INT8
(`int8-dynamic`): `quantize_dynamic`, int8 weights and activations quantized per batch at run time, no calibration.

What is quantized, and what stays FP32 and why:
- Only weighted ops are quantized: Conv (the backbone) and MatMul/Gemm with a constant weight (the transformer's linear
  layers); QUANT_SCOPES narrows that to one of the two. Attention's activation x activation products (q @ k^T,
  softmax @ v) stay FP32: their operands have no fixed range to calibrate.
- By default only their inputs (activations and per-channel weights) get Q/DQ; their outputs stay FP32 (ONNX Runtime
  runs MatMulIntegerToFloat, and QLinearConv where the next conv quantizes the tensor anyway). Quantizing the outputs
  too (`quantize_outputs`) rounds the features the anomaly map is computed from: on a trained lite0 that cost 7 points
  of image AUROC (docs/lowprec.md).
- LayerNormalization and Softmax stay FP32 and read FP32 inputs: ONNX Runtime's Q/DQ insertion hands every consumer of
  a quantized tensor the dequantized copy (and dedupes identical initializers across ops), so a pass afterwards rewires
  any LayerNorm/Softmax/map input that comes straight out of a DequantizeLinear back to the FP32 tensor it quantized.
- The anomaly map and score: everything from the L2 reconstruction error on (Sub -> Pow -> ReduceSum -> Sqrt, the
  upsampling, blur, pooling, max) is excluded from quantization and reads FP32 inputs: the error is a small difference
  of two large feature vectors.
- The uint8 image input and its Cast are never quantized (the graph still takes uint8 and returns float32).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import (
    CALIBRATION_METHODS,
    QUANT_SCOPES,
    ExportOptions,
    QuantOptions,
)
from adtr_deploy.export.images import load_calibration_batch
from adtr_deploy.export.quant_graph import (  # noqa: F401  (re-exported: the graph analysis lives in quant_graph.py)
    KEEP_FP32_OPS,
    QDQ_OPS,
    WEIGHT_INPUT,
    fp32_violations,
    map_node_names,
    op_counts,
    plan_nodes,
    protected_node_names,
    restore_fp32_inputs,
)
from adtr_deploy.export.quant_graph import name_nodes as _name_nodes
from adtr_deploy.export.quiet import quiet as _quiet

CALIB_BATCH = 8  # images per calibration run (memory of the augmented graph grows with it)
# Our calibration method -> extra options of onnxruntime's create_calibrator. Entropy: 512 histogram bins searched for
# the 128-bin quantization with the least KL divergence (TensorRT's method); percentile: a 99.99 percentile cut of a
# 2048-bin histogram of |x| (onnxruntime collects percentile histograms over absolute values).
CALIBRATORS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.99},
}
# ONNX Runtime's quantization types per target: its CPU kernels are fastest with uint8 activations and int8 weights;
# TensorRT only takes symmetric int8 (zero point 0) for both.
TARGET_SETTINGS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"activation": "QUInt8", "weight": "QInt8", "extra": {}},
    "tensorrt": {
        "activation": "QInt8",
        "weight": "QInt8",
        "extra": {"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True},
    },
}


class _Reader:
    """onnxruntime CalibrationDataReader over an in-memory uint8 batch, CALIB_BATCH images at a time."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name, self.images, self.pos = input_name, images, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        batch = self.images[self.pos : self.pos + CALIB_BATCH]
        self.pos += CALIB_BATCH
        return {self.input_name: np.ascontiguousarray(batch)}

    def __len__(self) -> int:
        return -(-len(self.images) // CALIB_BATCH)

    def set_range(self, start_index: int, end_index: int) -> None:  # the strided-calibration protocol
        self.pos = start_index


# --- the passes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantReport:
    """What an INT8 pass did, for model.json `extra.onnx.<precision>`."""

    mode: str  # "static" | "dynamic"
    settings: dict[str, Any]
    quantized_nodes: dict[str, int]  # op type -> count
    kept_fp32: dict[str, int]  # reason -> count of weighted nodes left in FP32
    restored_fp32_inputs: int
    pre_process: str
    ops: dict[str, int] = field(default_factory=dict)  # op type -> count in the quantized graph
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "settings": self.settings,
            "quantized_nodes": self.quantized_nodes,
            "kept_fp32": self.kept_fp32,
            "restored_fp32_inputs": self.restored_fp32_inputs,
            "pre_process": self.pre_process,
            "ops": self.ops,
            "calibration": self.calibration,
        }


def pre_process(model: onnx.ModelProto, folder: Path) -> tuple[Path, str]:
    """quant_pre_process: ONNX shape inference and ONNX Runtime's basic graph optimizations; written to a file.

    Its symbolic shape inference is skipped: our graphs hold only standard ops with a static image size, which ONNX's
    own inference types completely, while the symbolic one cannot follow the TorchScript-based exporter's computed
    Reshape targets (it fails after 10+ seconds).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = folder / "fp32.onnx", folder / "pre.onnx"
    onnx.save_model(model, str(src))
    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst, "quant_pre_process (onnx shape inference, basic optimizations)"


def _finish(quantized: onnx.ModelProto, prepared: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Restore FP32 inputs of the protected nodes, drop stale shapes, check; the graph must pass onnx.checker."""
    restored = restore_fp32_inputs(quantized, prepared)
    problems = fp32_violations(quantized)
    if problems:
        raise RuntimeError(f"the INT8 graph quantizes a part that must stay float32 ({problems[0]})")
    del quantized.graph.value_info[:]  # quant_pre_process's symbolic shapes; strict inference re-derives them
    onnx.checker.check_model(quantized)
    return quantized, restored


def _count(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    by_name = {n.name: n.op_type for n in model.graph.node}
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        counts[by_name[name]] += 1
    return dict(sorted(counts.items()))


def _reasons(kept: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for why in kept.values():
        counts[why] += 1
    return dict(sorted(counts.items()))


def calibrate(
    pre_path: Path, images: np.ndarray, quant: QuantOptions, input_name: str, folder: Path
) -> tuple[Path, float]:
    """Activation ranges of the weighted ops' inputs and outputs over the calibration images, written as ONNX Runtime's
    calibration cache (JSON) for quantize_static; returns (cache path, seconds).

    The calibrator is ONNX Runtime's own (create_calibrator), fed one batch per collect_data call so that only one
    batch of intermediate outputs is held at a time (the ranges and histograms merge across calls), and configured from
    CALIBRATORS: quantize_static would build its entropy calibrator with 128 histogram bins and 128 quantized bins,
    which leaves a single candidate threshold, the full range, i.e. MinMax again.
    """
    import time

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    start = time.perf_counter()
    settings = dict(CALIBRATORS[quant.method])
    settings["symmetric"] = bool(TARGET_SETTINGS[quant.target]["extra"].get("ActivationSymmetric", False))
    with _quiet():
        calibrator = create_calibrator(
            pre_path,
            list(QUANT_SCOPES[quant.scope]),
            augmented_model_path=str(folder / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[quant.method]),
            extra_options=settings,
        )
        for first in range(0, len(images), CALIB_BATCH):
            calibrator.collect_data(_Reader(input_name, images[first : first + CALIB_BATCH]))
        ranges = calibrator.compute_data()
    cache = folder / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache, time.perf_counter() - start


def quantize_static_onnx(
    model: onnx.ModelProto, images: np.ndarray, quant: QuantOptions, input_name: str = "image"
) -> tuple[onnx.ModelProto, QuantReport]:
    """Static INT8 (Q/DQ) of an FP32 ADTR graph, calibrated on `images` (uint8 (N, H, W, 3) good training images)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    target = TARGET_SETTINGS[quant.target]
    extra: dict[str, Any] = dict(target["extra"])
    if not quant.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHT_INPUT)
    with tempfile.TemporaryDirectory(prefix="adtr-int8-") as tmp:
        pre_path, how = pre_process(model, Path(tmp))
        prepared = onnx.load(str(pre_path))
        _name_nodes(prepared)
        onnx.save_model(prepared, str(pre_path))
        to_quantize, kept = plan_nodes(prepared, quant.scope, quant.fp32_head, quant.fp32_lead)
        if not to_quantize:
            raise UserError(f"the graph has no weighted op to quantize in scope {quant.scope!r}")
        cache, seconds = calibrate(pre_path, images, quant, input_name, Path(tmp))
        out_path = Path(tmp) / "int8.onnx"
        with _quiet():
            quantize_static(
                str(pre_path),
                str(out_path),
                None,  # the ranges come from the calibration cache
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_SCOPES[quant.scope]),
                nodes_to_quantize=to_quantize,
                nodes_to_exclude=sorted(kept),
                per_channel=quant.per_channel,
                reduce_range=quant.reduce_range,
                activation_type=getattr(QuantType, target["activation"]),
                weight_type=getattr(QuantType, target["weight"]),
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[quant.method]),
                calibration_cache_path=str(cache),
                extra_options=extra,
            )
        quantized = onnx.load(str(out_path))
    quantized, restored = _finish(quantized, prepared)
    report = QuantReport(
        mode="static",
        settings={
            "format": "QDQ",
            "target": quant.target,
            "scope": quant.scope,
            "per_channel": quant.per_channel,
            "reduce_range": quant.reduce_range,
            "quantize_outputs": quant.quantize_outputs,
            "fp32_head": quant.fp32_head,
            "fp32_lead": quant.fp32_lead,
            "activation_type": target["activation"],
            "weight_type": target["weight"],
        },
        quantized_nodes=_count(prepared, to_quantize),
        kept_fp32=_reasons(kept),
        restored_fp32_inputs=restored,
        pre_process=how,
        ops=op_counts(quantized),
        calibration={
            "method": quant.method,
            "settings": CALIBRATORS[quant.method],
            "images": int(len(images)),
            "source": quant.calib_source,
            "seconds": round(seconds, 1),
        },
    )
    return quantized, report


def quantize_dynamic_onnx(model: onnx.ModelProto, quant: QuantOptions) -> tuple[onnx.ModelProto, QuantReport]:
    """Dynamic INT8: int8 weights of the transformer's linear layers, activations quantized per batch at run time.

    Convolutions stay FP32: ONNX Runtime's CPU ConvInteger takes uint8 weights only and has no fast kernel, so the
    backbone would get slower, not faster (docs/lowprec.md has the numbers).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="adtr-int8-") as tmp:
        pre_path, how = pre_process(model, Path(tmp))
        prepared = onnx.load(str(pre_path))
        _name_nodes(prepared)
        onnx.save_model(prepared, str(pre_path))
        to_quantize, kept = plan_nodes(prepared, "transformer", fp32_lead=quant.fp32_lead)
        out_path = Path(tmp) / "int8.onnx"
        with _quiet():
            quantize_dynamic(
                str(pre_path),
                str(out_path),
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=to_quantize,
                nodes_to_exclude=sorted(kept),
                per_channel=quant.per_channel,
                reduce_range=quant.reduce_range,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        quantized = onnx.load(str(out_path))
    quantized, restored = _finish(quantized, prepared)
    report = QuantReport(
        mode="dynamic",
        settings={
            "format": "QOperator (MatMulInteger, DynamicQuantizeLinear)",
            "scope": "transformer",
            "per_channel": quant.per_channel,
            "reduce_range": quant.reduce_range,
            "weight_type": "QInt8",
        },
        quantized_nodes=_count(prepared, to_quantize),
        kept_fp32=_reasons(kept),
        restored_fp32_inputs=restored,
        pre_process=how,
        ops=op_counts(quantized),
    )
    return quantized, report


def _input_of(model: onnx.ModelProto) -> tuple[str, tuple[int, int]]:
    (inp,) = model.graph.input
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]  # (N, H, W, 3)
    return inp.name, (int(dims[1]), int(dims[2]))


def int8_static_pass(model: onnx.ModelProto, options: ExportOptions) -> tuple[onnx.ModelProto, QuantReport]:
    """The PRECISIONS["int8"] pass: calibration images from options.quant.calib_files, read at the graph's input size."""
    quant = options.quant
    if not quant.calib_files:
        raise UserError("INT8 calibration needs good training images; pass --calib-images FOLDER|GLOB")
    name, size = _input_of(model)
    images = load_calibration_batch(list(quant.calib_files), size)
    return quantize_static_onnx(model, images, quant, input_name=name)


def int8_dynamic_pass(model: onnx.ModelProto, options: ExportOptions) -> tuple[onnx.ModelProto, QuantReport]:
    """The PRECISIONS["int8-dynamic"] pass."""
    return quantize_dynamic_onnx(model, options.quant)


def fp16_pass(model: onnx.ModelProto, options: ExportOptions):
    """The PRECISIONS["fp16"] pass: fp16.convert_to_fp16 under the passes' common (model, options) signature."""
    from adtr_deploy.export.fp16 import convert_to_fp16

    return convert_to_fp16(model)
