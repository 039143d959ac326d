"""OpenVINO IR (model.xml + model.bin) from our ONNX export, read and saved with OpenVINO's own API.

The IR holds the graph of the ONNX export it was made from, weights kept FP32 (no FP16 compression): FP32, BF16 and FP16
IRs are the FP32 graph, and the precision is how OpenVINO computes (INFERENCE_PRECISION_HINT, set by the runtime from
model.json and recorded in the IR's runtime options too); the INT8 IR is our Q/DQ ONNX (quantize.py), whose FakeQuantize
layers OpenVINO's CPU plugin runs in int8 (VNNI/AMX where the CPU has them) and the rest in f32 (int8-bf16: in bf16).
Verification runs the IR
through the runtime's OpenVINOBackend, so what is verified is what runs; BF16 on a CPU without BF16 instructions runs in
FP32 (OpenVINO falls back), so a BF16 export verified there proves nothing about BF16: verification.json records the
precision the plugin really ran (`runtime.inference_precision`) and the export says so in its notes. Only OpenVINO's read_model/save_model are used
(not convert_model, whose tool sends telemetry).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adtr_deploy.export.formats import ExportOptions
from adtr_deploy.fileio import sha256_file
from adtr_deploy.runtime.openvino import PRECISION_HINTS, SPEC_RT_KEY, import_openvino, read_model
from adtr_deploy.spec import ModelSpec

# the openvino format's precision -> the ONNX export the IR is made from
ONNX_PRECISION: dict[str, str] = {"fp32": "fp32", "bf16": "fp32", "int8": "int8", "int8-bf16": "int8"}


def export_openvino(model, path: Path, *, spec: ModelSpec, options: ExportOptions) -> dict[str, Any]:
    """ONNX (FP32, or the Q/DQ INT8 graph) -> model.xml + model.bin at `path`; the ONNX is a temporary beside it."""
    from adtr_deploy.export.onnx import export_onnx
    from adtr_deploy.runtime.cpu import cpu_info

    ov = import_openvino()
    onnx_path = path.with_name(path.stem + ".build.onnx")
    onnx_options = dataclasses.replace(options, precision=ONNX_PRECISION[options.precision])
    hint = PRECISION_HINTS[options.precision]
    try:
        details = export_onnx(model, onnx_path, spec=spec, options=onnx_options)
        ir = read_model(ov, ov.Core(), onnx_path)
        ir.set_rt_info(spec.to_json(), SPEC_RT_KEY)  # the runtime's fallback when model.json is missing
        ir.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
        ov.save_model(ir, str(path), compress_to_fp16=False)
    finally:
        for extra_file in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if extra_file.exists():
                extra_file.unlink()
    cpu = cpu_info()
    record = {
        "bin_sha256": sha256_file(path.with_suffix(".bin")),  # model.json's sha256 is model.xml's; the weights are here
        "version": ov.__version__,
        "precision": options.precision,
        "inference_precision_hint": hint,
        "onnx_precision": onnx_options.precision,
        "weights": "fp32 (compress_to_fp16=False)",
        "exported_on": {"cpu": cpu["model"], "flags": cpu["flags"]},
        "onnx": details["extra"]["onnx"],
    }
    notes = list(details["notes"])
    if hint == "bf16" and cpu.get("bf16") is False:
        notes.append(
            "this CPU has no BF16 instructions (avx512_bf16, amx_bf16): OpenVINO runs the BF16 export in FP32 here, "
            "so its verification checked FP32; verify it again on the CPU that will run it"
        )
    return {"extra": {"openvino": record}, "notes": notes, "files": [path, path.with_suffix(".bin")]}
