"""ONNX export of ADTR.forward: torch.export-based (dynamo) exporter by default, the TorchScript-based one on request.

The graph takes uint8 NHWC images named "image" and gives "anomaly_map" (N, 1, H, W) and "score" (N,), float32, with a
dynamic batch axis. Opset 17 or newer, so LayerNorm is one native LayerNormalization node (TensorRT needs that to run it
accurately in FP16). Weights live inside the one .onnx file unless the model is over 2 GB (protobuf's limit).
"""

from __future__ import annotations

import functools
import importlib
import io
from pathlib import Path
from typing import Any

import onnx
import torch

from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import PRECISIONS, ExportOptions
from adtr_deploy.export.quiet import quiet
from adtr_deploy.spec import METADATA_KEY, ModelSpec

MIN_OPSET = 17  # native LayerNormalization
DYNAMO_MIN_OPSET = 18  # the dynamo exporter cannot convert its graphs below 18 (no Pad adapter to 17)
PROTOBUF_LIMIT = 2**31 - 2**20  # 2 GB less a margin for the graph itself
BATCH_DIM = "batch"


class OnnxExportError(UserError, RuntimeError):
    """The ONNX graph could not be written or failed its checks."""


# the exporters print progress and deprecation chatter; the CLI reports what matters itself
_quiet = functools.partial(quiet, "torch.onnx", "torch.export", "onnxscript", "torch._dynamo")


def check_opset(opset: int, dynamo: bool) -> None:
    if opset < MIN_OPSET:
        raise UserError(
            f"opset {opset} is too old: ADTR needs opset {MIN_OPSET} or newer for native LayerNormalization; use --opset 18"
        )
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise UserError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer; use --opset {DYNAMO_MIN_OPSET}, "
            f"or --exporter torchscript for opset {opset}"
        )


def torch_to_onnx(
    model: torch.nn.Module, spec: ModelSpec, *, opset: int = 18, dynamo: bool = True, batch_max: int = 64
) -> onnx.ModelProto:
    """Export the module's forward to an in-memory ModelProto with a dynamic batch axis."""
    check_opset(opset, dynamo)
    h, w = spec.input_size
    # Export needs an example only for shapes and dtypes; batch 2 so the exporter cannot specialize the batch to 1.
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    names = dict(input_names=[spec.input_name], output_names=list(spec.output_names), opset_version=opset)
    with _quiet(), torch.no_grad():
        if dynamo:
            batch = torch.export.Dim(BATCH_DIM, min=1, max=max(int(batch_max), 2))
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, verbose=False, dynamic_shapes=({0: batch},), **names
            )
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            axes = {name: {0: BATCH_DIM} for name in (spec.input_name, *spec.output_names)}
            torch.onnx.export(model, (example,), buf, dynamo=False, dynamic_axes=axes, **names)
            proto = onnx.load_from_string(buf.getvalue())
    got = opset_of(proto)
    if got < MIN_OPSET:
        raise OnnxExportError(f"the exporter wrote opset {got} although {opset} was asked for; use --opset 18")
    return proto


def opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def fused_for_export(
    model: torch.nn.Module, options: ExportOptions
) -> tuple[torch.nn.Module, dict[str, Any], list[str]]:
    """The module to export: the fused inference rewrite of the transformer (fuse.py) unless --no-fuse; a model whose
    structure fuse.py does not know is exported unfused, with a note. Returns (module, details, notes)."""
    if not options.fuse:
        return model, {"fused": False, "reason": "--no-fuse"}, []
    from adtr_deploy.export.fuse import FusionError, fuse_model

    try:
        fused, details = fuse_model(model)
    except FusionError as exc:
        return model, {"fused": False, "reason": str(exc)}, [f"exported unfused: {exc}"]
    return fused, details, []


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """onnxslim's graph simplification, or the model unchanged and a note when onnxslim is not installed."""
    try:
        import onnxslim
    except ImportError:
        return model, "--simplify skipped: onnxslim is not installed (pip install onnxslim)"
    with _quiet():
        slim = onnxslim.slim(model)
    return slim, None


def embed_spec(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Put the spec into metadata_props under METADATA_KEY (replacing an older copy)."""
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: spec.to_json()})


def _weights_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write the model; weights go to `<name>.data` beside it only when the model is over protobuf's 2 GB."""
    path = Path(path)
    if _weights_bytes(model) < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


def check(path: Path, spec: ModelSpec) -> None:
    """onnx.checker (full) and strict shape inference, then the graph's inputs and outputs against the spec."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(
            onnx.load(str(path), load_external_data=False), check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(
            f"the exported ONNX graph fails onnx's checks ({str(exc).splitlines()[0][:200]})"
        ) from None
    g = inferred.graph
    h, w = spec.input_size
    expect = {
        spec.input_name: (onnx.TensorProto.UINT8, [None, h, w, 3]),
        spec.output_names[0]: (onnx.TensorProto.FLOAT, [None, 1, h, w]),
        spec.output_names[1]: (onnx.TensorProto.FLOAT, [None]),
    }
    got = {}
    for v in [*g.input, *g.output]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        got[v.name] = (v.type.tensor_type.elem_type, dims)

    def fits(name: str) -> bool:  # same names, types and ranks; a dimension may stay symbolic (None)
        (t, dims), (want_t, want) = got.get(name, (None, [])), expect[name]
        return t == want_t and len(dims) == len(want) and all(d is None or d == w for d, w in zip(dims, want))

    if set(got) != set(expect) or not all(fits(n) for n in expect) or got[spec.input_name][1][1:] != [h, w, 3]:
        raise OnnxExportError(f"the ONNX graph's inputs/outputs are {got}, expected {expect}")


def export_onnx(model: torch.nn.Module, path: Path, *, spec: ModelSpec, options: ExportOptions) -> dict[str, Any]:
    """Export (the fused transformer unless --no-fuse), post-process (optional simplify, optional precision pass),
    embed the spec, save and check.

    Returns {"extra": details for the spec, "notes": messages for the user, "files": paths written}.
    """
    module, fusion, notes = fused_for_export(model, options)
    proto = torch_to_onnx(module, spec, opset=options.opset, dynamo=options.dynamo, batch_max=options.batch_max)
    details: dict[str, Any] = {
        "exporter": "dynamo" if options.dynamo else "torchscript",
        "opset": opset_of(proto),
        "fusion": fusion,
        "notes": notes,
    }
    if options.simplify:
        proto, note = simplify(proto)
        details["simplified"] = note is None
        if note:
            details["notes"].append(note)
    precision_pass = PRECISIONS[options.precision]["onnx_pass"]
    if precision_pass:
        module, func = precision_pass.split(":")
        proto, report = getattr(importlib.import_module(module), func)(proto, options)
        details[options.precision] = report.to_dict()
    notes = details.pop("notes")
    embed_spec(proto, spec.replace(extra={**spec.extra, "onnx": details}))
    files = save(proto, path)
    check(path, spec)
    return {"extra": {"onnx": details}, "notes": notes, "files": files}
