"""The tables of export formats and precisions (stdlib only, so the CLI's --help and the runtime can read them).

A new format is one row in FORMATS plus its module; a new precision is one row in PRECISIONS plus the formats that list
it. No if/elif chains over formats or precisions anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adtr_deploy.errors import UserError

# format -> what it is and what it supports. `exporter` is "module:function" with the signature
# (model, path, *, spec, options) -> dict of details for the spec's `extra`; imported only when that format is chosen.
FORMATS: dict[str, dict[str, Any]] = {
    "onnx": {
        "filename": "model.onnx",
        "suffix": ".onnx",
        "exporter": "adtr_deploy.export.onnx:export_onnx",
        "dynamic_batch": True,
        "precisions": ("fp32", "fp16", "int8", "int8-dynamic"),
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
    "pt2": {
        "filename": "model.pt2",
        "suffix": ".pt2",
        "exporter": "adtr_deploy.export.pt2:export_pt2",
        "dynamic_batch": True,
        "precisions": ("fp32",),
        "needs_gpu": False,
        "device_option": "pt2_device",
        "in_all": False,  # --format all leaves it out:
        "in_all_note": "compiled only when asked for (--format pt2: minutes of C++ compilation)",  # the ExportOptions field naming the device it is compiled for and verified on
        "runs_on": "PyTorch (torch._inductor.aoti_load_package) on the device kind that compiled it (CPU or CUDA)",
    },
    "openvino": {
        "filename": "model.xml",  # + model.bin
        "suffix": ".xml",
        "exporter": "adtr_deploy.export.openvino:export_openvino",
        "dynamic_batch": True,
        # bf16: OpenVINO's CPU inference precision; int8: our Q/DQ graph, the rest f32; int8-bf16: the rest in bf16
        "precisions": ("fp32", "bf16", "int8", "int8-bf16"),
        "needs_gpu": False,
        "in_all": False,
        "in_all_note": "exported only when asked for (--format openvino; needs pip install 'adtr-deploy[openvino]')",
        "runs_on": "OpenVINO (CPU; GPU and NPU untested), adtr-run --backend openvino",
    },
    "tensorrt": {
        "filename": "model.engine",
        "suffix": ".engine",
        "exporter": "adtr_deploy.export.tensorrt:export_tensorrt",
        "dynamic_batch": True,  # within the optimization profile: 1 .. --batch-max
        "precisions": ("fp32", "fp16", "int8"),  # INT8 from the Q/DQ ONNX (explicit quantization)
        "needs_gpu": True,
        "runs_on": "TensorRT on the GPU model and TensorRT version that built it",
    },
}

# static INT8's verification bounds and ONNX pass (see PRECISIONS below), shared by int8 and int8-bf16
INT8_STATIC = {
    "tolerance": None,
    "min_map_correlation": 0.99,
    "min_unflagged_correlation": 0.95,
    "max_score_rel": 0.05,
    "onnx_pass": "adtr_deploy.export.quantize:int8_static_pass",
    "calibrated": True,
}

# precision -> verification tolerance, and the pass that turns the exported FP32 ONNX graph into that precision
# ("module:function" taking (ModelProto, ExportOptions) and returning (ModelProto, report with .to_dict()); None: the
# graph stays as exported). `calibrated`: the pass needs calibration images (ExportOptions.quant.calib_files).
#
# Tolerances (verify.py compares with the PyTorch FP32 reference on the same real images):
# - "tolerance": the largest |difference| of maps and scores, relative to the range (max - min) of the reference's
#   anomaly maps on those images (the score is in the map's units). None: not a criterion.
# - "min_map_correlation": Pearson correlation of the artifact's and the reference's maps over all pixels; None: reported
#   only. "max_score_rel": the largest |score - reference score| / |reference score|; None: reported only.
# FP32/FP16 round; INT8 changes every activation by up to half a quantization step, so its maps are compared by shape
# (correlation) and its scores relatively, at bounds measured on a trained lite0 (docs/lowprec.md): a collapse of the
# pixel-level accuracy (the failure users report for quantized transformers) falls far below them.
PRECISIONS: dict[str, dict[str, Any]] = {
    # FP32: float32 reassociation (ONNX Runtime's reductions and GEMMs against PyTorch's), amplified by the
    # Mahalanobis whitening, measured up to 1.2e-4 of the map range on the six demo categories' default models
    # (stars; 0.6-7e-5 the others; the same with --no-fuse, map correlation 0.999999999): 5e-4 is that noise with
    # headroom, still 20x under FP16's bound. It was 1e-4 until a default stars model failed its own export at 1.19e-4.
    "fp32": {
        "tolerance": 5e-4,
        "min_map_correlation": None,
        "max_score_rel": None,
        "onnx_pass": None,
        "calibrated": False,
        "description": "float32 everywhere (TF32 disabled in TensorRT)",
    },
    "fp16": {
        "tolerance": 1e-2,
        "min_map_correlation": None,
        "max_score_rel": None,
        "onnx_pass": "adtr_deploy.export.quantize:fp16_pass",
        "calibrated": False,
        "description": "float16 weights and activations; LayerNorm, Softmax, the L2 map and the score stay float32",
    },
    # the FP32 graph run by OpenVINO in bfloat16: an 8-bit mantissa (FP16: 11) rounds every activation by up to 0.4%,
    # noise like INT8's, so BF16 is held to INT8's per-image bounds (docs/lowprec.md#bf16-and-int8-through-openvino)
    "bf16": {
        "tolerance": None,
        "min_map_correlation": 0.99,
        "min_unflagged_correlation": 0.95,
        "max_score_rel": 0.05,
        "onnx_pass": None,
        "calibrated": False,
        "description": "bfloat16 activations and products where OpenVINO's CPU plugin has them (AVX-512 BF16, AMX); "
        "float32 weights on disk",
    },
    "int8": {
        **INT8_STATIC,
        "description": "static INT8 (Q/DQ on the inputs of Conv/MatMul, per-channel int8 weights) calibrated on good "
        "training images; LayerNorm, Softmax, attention, the L2 map and the score stay float32",
    },
    "int8-bf16": {  # OpenVINO only: the int8 Q/DQ graph with what stays float run in bfloat16; INT8's bounds
        **INT8_STATIC,
        "description": "static INT8 as int8, and what int8 leaves float (LayerNorm, Softmax, attention, the FP32 lead, "
        "the map) in bfloat16 instead of float32: OpenVINO on CPUs with AVX-512 BF16 or AMX",
    },
    "int8-dynamic": {
        "tolerance": None,
        "min_map_correlation": 0.99,
        "min_unflagged_correlation": 0.95,
        "max_score_rel": 0.05,
        "onnx_pass": "adtr_deploy.export.quantize:int8_dynamic_pass",
        "calibrated": False,
        "description": "dynamic INT8: int8 weights of the transformer's MatMuls, activations quantized per batch at run "
        "time, no calibration; everything else float32",
    },
}

# INT8 calibration methods: our name -> onnxruntime.quantization.CalibrationMethod member.
CALIBRATION_METHODS: dict[str, str] = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# The default, chosen on the validation splits of the six demo categories (today's lite0, image AUROC delta against
# FP32 through OpenVINO / ONNX Runtime): percentile worst -0.39 / -0.52, mean -0.17 / -0.17 points; minmax worst
# -0.65 / -0.65, mean -0.26 / -0.28; entropy worst -0.52 / -0.78 (docs/lowprec.md, "Calibration method, chosen on
# validation"). A 99.99 % cut keeps rare large activations from widening every step of the scale.
DEFAULT_CALIB_METHOD = "percentile"
# Which weighted ops INT8 quantizes: the backbone's convolutions, the transformer's linear layers, or both.
QUANT_SCOPES: dict[str, tuple[str, ...]] = {
    "all": ("Conv", "MatMul", "Gemm"),
    "backbone": ("Conv",),
    "transformer": ("MatMul", "Gemm"),
}
# Who runs the Q/DQ graph: ONNX Runtime's CPU kernels want uint8 activations; TensorRT wants symmetric int8 ones.
QUANT_TARGETS: tuple[str, ...] = ("onnxruntime", "tensorrt")
DEFAULT_CALIB_COUNT = 64

ALL = "all"


def check_format_precision(fmt: str, precision: str) -> None:
    """Raise ValueError with one sentence when the format or precision is unknown or the pair is unsupported."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join([*FORMATS, ALL])}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    supported = FORMATS[fmt]["precisions"]
    if precision not in supported:
        others = [f for f, row in FORMATS.items() if precision in row["precisions"]]
        raise UserError(
            f"the {fmt} format supports {', '.join(supported)} only; for {precision} use --format {' or '.join(others)}"
        )


@dataclass(frozen=True)
class QuantOptions:
    """INT8 settings (ignored by the other precisions). `calib_files` are resolved by the exporter (see quantize.py)."""

    calib_files: tuple[str, ...] = ()
    calib_source: str = ""  # where calib_files came from, for model.json
    method: str = DEFAULT_CALIB_METHOD  # a CALIBRATION_METHODS key
    count: int = DEFAULT_CALIB_COUNT  # at most this many calibration images
    per_channel: bool = True  # one weight scale per output channel (else one per tensor)
    reduce_range: bool = False  # 7-bit weights (for CPUs without VNNI, whose u8s8 products can saturate)
    scope: str = "transformer"  # a QUANT_SCOPES key (transformer: no measured accuracy cost, docs/lowprec.md)
    # Q/DQ on the weighted ops' inputs only: their outputs stay float32, so the rounding does not compound from layer to
    # layer (True, ONNX Runtime's usual placement, cost 7 points of image AUROC on a trained lite0: docs/lowprec.md)
    quantize_outputs: bool = False
    target: str = "onnxruntime"  # a QUANT_TARGETS entry; the TensorRT export sets "tensorrt"
    # keep the transformer's output projection (the reconstruction the map is the difference from) in FP32: on the
    # demo's grass, quantizing it cost 1.0 point of pixel AUROC, keeping it FP32 0.4 (docs/lowprec.md)
    fp32_head: bool = True
    # this fraction of the weighted ops in scope, counted from the input side (the encoder first), kept FP32. The
    # export raises it (INT8_FP32_LEADS) when verification fails: a Mahalanobis error map magnifies the encoder's
    # INT8 noise (on the demo's grass: map correlation 0.965 with every transformer MatMul quantized, 0.99 with the
    # decoder's only; docs/lowprec.md)
    fp32_lead: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fp32_lead < 1.0:
            raise UserError(f"the FP32 lead {self.fp32_lead} must be in [0, 1) (a fraction of the quantizable ops)")
        if self.method not in CALIBRATION_METHODS:
            raise UserError(
                f"unknown calibration method {self.method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}"
            )
        if self.scope not in QUANT_SCOPES:
            raise UserError(f"unknown quantization scope {self.scope!r}; choose one of: {', '.join(QUANT_SCOPES)}")
        if self.target not in QUANT_TARGETS:
            raise UserError(f"unknown quantization target {self.target!r}; choose one of: {', '.join(QUANT_TARGETS)}")
        if int(self.count) < 1:
            raise UserError(f"--calib-count must be at least 1, not {self.count}")


@dataclass(frozen=True)
class ExportOptions:
    """Everything a format's exporter may need besides the model and the spec."""

    precision: str = "fp32"
    opset: int = 18
    dynamo: bool = True  # ONNX: torch.export-based exporter; False = the TorchScript-based one
    simplify: bool = False  # ONNX: onnxslim graph simplification
    fuse: bool = True  # ONNX/.pt2: export the fused inference rewrite of the transformer (export/fuse.py)
    batch_max: int = 64
    batch_opt: int | None = None  # TensorRT optimization profile's optimum batch (default: min(8, batch_max))
    workspace_gb: float = 4.0  # TensorRT workspace memory pool limit
    device: str = "cuda:0"  # TensorRT build device
    pt2_device: str = "cpu"  # pt2: the device AOTInductor compiles for (cpu, cuda, cuda:N)
    timing_cache: str | None = None  # TensorRT timing cache file (default: beside the engine in the output folder)
    quant: QuantOptions = field(default_factory=QuantOptions)  # INT8 calibration and quantization settings
