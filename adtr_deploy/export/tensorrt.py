"""TensorRT engines built from our ONNX export with the TensorRT Python API (TensorRT 10 and 11).

- Explicit batch (the only mode since TensorRT 10) with one optimization profile: batch 1 .. --batch-max, tuned for
  `opt`. A timing cache file makes rebuilds fast; the workspace is a memory pool limit.
- Precision follows TRT_RECIPES. TensorRT 10 builds "weakly typed" networks from the FP32 ONNX and takes FP16 from a
  builder flag, with the fragile layers pinned to FP32. TensorRT 11 removed those flags (and the INT8 calibrator):
  every network is strongly typed, so FP16 comes from our FP16 ONNX, whose types TensorRT then follows exactly.
- INT8 is explicit quantization in both: the network is parsed from our Q/DQ ONNX (quantize.py, symmetric int8
  activations and weights, which is all TensorRT accepts), calibrated on good training images before the build. Only
  the Q/DQ-wrapped Conv/MatMul run in INT8; LayerNorm, Softmax and the map stay as typed (FP32). TensorRT 10's weakly
  typed builder wants the INT8 flag set alongside the Q/DQ layers; TensorRT 11 reads the types from the graph.
- An engine only runs on the GPU model and TensorRT version that built it. Both (and the compute capability and CUDA
  version) are recorded in model.json `extra["tensorrt"]`; the runtime's `check_engine_compatible(spec)`
  (adtr_deploy/runtime/engine_check.py, which this module reuses) refuses a mismatch.

Nothing here imports torch or tensorrt at module level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import ExportOptions
from adtr_deploy.fileio import atomic_write_bytes
from adtr_deploy.runtime import engine_check
from adtr_deploy.runtime.engine_check import (
    INSTALL_HINT,
    MIN_MAJOR,
    TensorRTUnavailable,
    parse_version,
    require_tensorrt,
)
from adtr_deploy.spec import ModelSpec

DEFAULT_OPT_BATCH = 8


# --- pure Python: profiles and precision recipes -------------------------------------------------------------------


def profile_shapes(input_size: tuple[int, int], batch_max: int, batch_opt: int | None = None) -> dict[str, tuple]:
    """The optimization profile of the image input: (min, opt, max) NHWC shapes over the batch range 1..batch_max."""
    batch_max = int(batch_max)
    if batch_max < 1:
        raise UserError(f"--batch-max must be at least 1, not {batch_max}")
    opt = min(DEFAULT_OPT_BATCH, batch_max) if batch_opt is None else int(batch_opt)
    if not 1 <= opt <= batch_max:
        raise UserError(f"the optimization batch {opt} must lie between 1 and --batch-max {batch_max}")
    h, w = int(input_size[0]), int(input_size[1])
    return {"min": (1, h, w, 3), "opt": (opt, h, w, 3), "max": (batch_max, h, w, 3)}


@dataclass(frozen=True)
class Recipe:
    """How one TensorRT generation builds one precision."""

    onnx_precision: str  # which ONNX the network is parsed from
    strongly_typed: bool  # tensor types come from the ONNX (the only mode in TensorRT 11)
    set_flags: tuple[str, ...] = ()  # BuilderFlag names to set
    clear_flags: tuple[str, ...] = ()  # BuilderFlag names to clear (when the flag exists)
    pin_fp32_layers: bool = False  # weak typing: keep fragile layer types in FP32 (with a precision-constraint flag)
    quant_target: str | None = None  # Q/DQ ONNX flavour (formats.QUANT_TARGETS) when onnx_precision is INT8


# (generation, precision) -> Recipe. TF32 is cleared for FP32 so that FP32 engines meet the 1e-4 tolerance.
# INT8 in both generations is explicit quantization from our Q/DQ ONNX (no TensorRT calibrator: 11 removed it).
TRT_RECIPES: dict[tuple[str, str], Recipe] = {
    ("weak", "fp32"): Recipe(onnx_precision="fp32", strongly_typed=False, clear_flags=("TF32",)),
    ("weak", "fp16"): Recipe(
        onnx_precision="fp32",
        strongly_typed=False,
        set_flags=("FP16", "PREFER_PRECISION_CONSTRAINTS"),
        pin_fp32_layers=True,
    ),
    ("strong", "fp32"): Recipe(onnx_precision="fp32", strongly_typed=True, clear_flags=("TF32",)),
    ("strong", "fp16"): Recipe(onnx_precision="fp16", strongly_typed=True),
    ("weak", "int8"): Recipe(onnx_precision="int8", strongly_typed=False, set_flags=("INT8",), quant_target="tensorrt"),
    ("strong", "int8"): Recipe(onnx_precision="int8", strongly_typed=True, quant_target="tensorrt"),
}

# Layer types pinned to FP32 in weakly typed FP16 builds: the same ops our FP16 ONNX keeps in FP32 (see fp16.py).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY", "POOLING", "RESIZE")


def onnx_options_for(recipe: Recipe, options: ExportOptions) -> ExportOptions:
    """The options of the ONNX export the engine is parsed from: the recipe's precision, and for INT8 the Q/DQ flavour
    TensorRT accepts (symmetric int8), calibrated on the same images the user chose."""
    quant = options.quant
    if recipe.quant_target is not None:
        quant = dataclasses.replace(quant, target=recipe.quant_target)
    return ExportOptions(
        precision=recipe.onnx_precision,
        opset=options.opset,
        dynamo=options.dynamo,
        simplify=options.simplify,
        batch_max=options.batch_max,
        quant=quant,
    )


def generation(version: str | tuple[int, ...]) -> str:
    major = (parse_version(version) if isinstance(version, str) else tuple(version))[0]
    if major < MIN_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {major} is too old; adtr-deploy needs TensorRT 10 or newer ({INSTALL_HINT})"
        )
    return "weak" if major < 11 else "strong"


def build_recipe(version: str | tuple[int, ...], precision: str) -> Recipe:
    """The recipe for this TensorRT version and precision; ValueError when the pair is not supported."""
    gen = generation(version)
    recipe = TRT_RECIPES.get((gen, precision))
    if recipe is None:
        known = ", ".join(sorted({p for g, p in TRT_RECIPES if g == gen}))
        raise UserError(f"TensorRT {version} engines can be built in {known}, not {precision!r}")
    return recipe


# --- the environment: TensorRT and the GPU -------------------------------------------------------------------------


def _gpu_from_torch(index: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        raise TensorRTUnavailable(f"no CUDA GPU with index {index} is visible")
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
    }


# Ways to ask about the GPU, tried in order: cuda-python (part of the tensorrt extra, no torch), then torch.
GPU_PROBES = (engine_check.gpu_from_cuda_python, _gpu_from_torch)


def environment(device: str | int = 0) -> dict[str, Any]:
    """TensorRT version and GPU facts of this machine, in the shape recorded in extra["tensorrt"]: the runtime's
    engine_check.environment, which may also ask torch about the GPU here."""
    return engine_check.environment(device, GPU_PROBES)


# --- building --------------------------------------------------------------------------------------------------------


def _whitening_layers(trt, network) -> set[str]:
    """Names of the Mahalanobis error's layers (model/adtr.py token_errors, fp16.is_residual_whitening): a convolution
    whose input is a difference, and the differences (SUB) that feed it."""
    producers = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer

    def sub(layer) -> bool:  # ILayer -> IElementWiseLayer to read its operation (the documented downcast)
        if layer is None or layer.type != trt.LayerType.ELEMENTWISE:
            return False
        layer.__class__ = trt.IElementWiseLayer
        return layer.op == trt.ElementWiseOperation.SUB

    def producer(layer):  # the layer that computes `layer`'s first input, if any
        tensor = layer.get_input(0) if layer.num_inputs else None
        return producers.get(tensor.name) if tensor is not None else None

    names: set[str] = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.CONVOLUTION:
            continue
        prev = producer(layer)
        if sub(prev):
            names |= {layer.name, prev.name}
            first = producer(prev)  # features - reconstruction, before the mean is taken off
            if sub(first):
                names.add(first.name)
    return names


def _pin_fragile_layers(trt, network) -> int:
    """Weak typing only: ask for FP32 on normalization, softmax, reductions, sqrt, pooling and resize layers, and on
    the Mahalanobis whitening (it magnifies the residual's rounding)."""
    types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    whitening = _whitening_layers(trt, network)
    pinned = 0
    floats = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        fragile = layer.type in types or layer.name in whitening
        if fragile and all(layer.get_output(j).dtype in floats for j in range(layer.num_outputs)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _network_flags(trt, recipe: Recipe) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT 11 is strongly typed always; the flag is set where it still exists so 10 and 11 read the same.
    return (1 << int(flag)) if recipe.strongly_typed and flag is not None else 0


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    recipe: Recipe,
    input_name: str,
    shapes: dict[str, tuple],
    workspace_gb: float,
    timing_cache: Path | None,
) -> dict[str, Any]:
    """Parse the ONNX, configure the builder from the recipe, build and write the serialized engine."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, recipe))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse the ONNX graph ({(errors or ['no details'])[0][:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in recipe.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in recipe.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    pinned = _pin_fragile_layers(trt, network) if recipe.pin_fp32_layers else 0
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # False: refuse a cache from another GPU/TensorRT
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT could not build the engine (see its log above); try a larger --workspace-gb")
    atomic_write_bytes(engine_path, bytes(plan))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"layers": network.num_layers, "pinned_fp32_layers": pinned}


def export_tensorrt(model, path: Path, *, spec: ModelSpec, options: ExportOptions) -> dict[str, Any]:
    """ONNX (FP32 or FP16, as the recipe says) -> serialized engine at `path`; the ONNX is a temporary beside it."""
    import torch

    from adtr_deploy.export.onnx import export_onnx

    trt = require_tensorrt()
    env = environment(options.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(env["device_index"])  # TensorRT builds on the current CUDA device
    recipe = build_recipe(trt.__version__, options.precision)
    shapes = profile_shapes(spec.input_size, options.batch_max, options.batch_opt)
    onnx_path = path.with_name(path.stem + ".build.onnx")
    onnx_options = onnx_options_for(recipe, options)
    try:
        onnx_details = export_onnx(model, onnx_path, spec=spec, options=onnx_options)
        timing_cache = Path(options.timing_cache) if options.timing_cache else None
        built = build_engine(
            onnx_path,
            path,
            recipe=recipe,
            input_name=spec.input_name,
            shapes=shapes,
            workspace_gb=options.workspace_gb,
            timing_cache=timing_cache,
        )
    finally:
        for extra_file in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if extra_file.exists():
                extra_file.unlink()
    record = {
        **env,
        "precision": options.precision,
        "strongly_typed": recipe.strongly_typed,
        "builder_flags": list(recipe.set_flags),
        "explicit_quantization": recipe.quant_target is not None,
        "cleared_flags": list(recipe.clear_flags),
        "profile": {k: list(v) for k, v in shapes.items()},
        "workspace_gb": options.workspace_gb,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "onnx": onnx_details["extra"]["onnx"],
        **built,
    }
    return {"extra": {"tensorrt": record}, "notes": onnx_details["notes"], "files": [path]}
