"""`adtr-export` / `adtr export`: checkpoint -> TorchScript, ONNX, .pt2 (AOTInductor) or TensorRT, each verified against the PyTorch reference."""

from __future__ import annotations

import click

from adtr_deploy.cli.common import CONTEXT, user_errors
from adtr_deploy.export.formats import (
    ALL,
    CALIBRATION_METHODS,
    DEFAULT_CALIB_COUNT,
    DEFAULT_CALIB_METHOD,
    FORMATS,
    PRECISIONS,
    QUANT_SCOPES,
)

# Formats that package an exported artifact for a server instead of exporting the torch model themselves.
TRITON = "triton"


def _describe(result) -> list[str]:
    size = result.path.stat().st_size / 1e6
    lines = [f"{result.format} {result.spec.precision}: {result.path} ({size:.1f} MB), spec {result.spec_path}"]
    v = result.verification
    if v is None:
        lines.append("  not verified (--no-verify)")
        return lines
    lines.append(
        f"  verified on {v['images']} images ({v['image_source']}), batches {v['batch_sizes']}, device {v['device']}"
    )
    if "map" in v:
        for key in ("map", "score"):
            d = v[key]
            lines.append(
                f"  {key:5s} max |diff| {d['max_abs']:.3g} ({d['max_rel']:.2g} of the map range), "
                f"mean {d['mean_abs']:.3g}"
            )
        corr, worst = v["map"].get("correlation"), v["map"].get("min_image_correlation")
        lines.append(
            f"  map correlation {'n/a' if corr is None else f'{corr:.5f}'} (Pearson, all pixels), worst image "
            f"{'n/a' if worst is None else f'{worst:.5f}'} ({v['map'].get('flat_images', 0)} flat maps judged by "
            f"score); score max relative error {100 * v['score'].get('max_rel_to_score', 0.0):.2f}%"
        )
        agree = round(v["decision_agreement"] * v["decisions"])
        lines.append(
            f"  decisions at threshold {v['threshold']:.4g} ({v['threshold_source']}): {agree}/{v['decisions']} agree "
            f"({v['reference_anomalies']} anomalous in the reference)"
        )
    bounds = [
        f"max |diff| <= {v['tolerance']:.0e} of the map range" if v.get("tolerance") is not None else None,
        f"map correlation per image >= {v['min_map_correlation']}"
        + (
            f" (flagged images; {v['min_unflagged_correlation']} for the others)"
            if v.get("min_unflagged_correlation") is not None
            else ""
        )
        if v.get("min_map_correlation") is not None
        else None,
        f"score error <= {100 * v['max_score_rel']:.0f}%" if v.get("max_score_rel") is not None else None,
    ]
    lines.append(f"  {', '.join(b for b in bounds if b)}: {'PASS' if v['passed'] else 'FAIL'}")
    return lines


@click.command(context_settings=CONTEXT)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(),
    help="The checkpoint adtr-train wrote (RUN_DIR/checkpoint.pt), or its RUN_DIR.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice([*FORMATS, ALL, TRITON]),
    default="onnx",
    show_default=True,
    help="Artifact to write: model.onnx, model.torchscript, model.pt2, model.xml (OpenVINO IR) or model.engine; "
    "'all' writes each into OUT/<format>/; "
    "'triton' exports (and verifies) ONNX or a TensorRT engine, then writes a Triton model repository in "
    "OUT/model_repository/.",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (created if missing)."
)
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="fp32",
    show_default=True,
    help="fp16: ONNX and TensorRT; int8: static Q/DQ calibrated on good training images, ONNX and TensorRT; "
    "int8-dynamic: int8 transformer weights, no calibration, ONNX only. LayerNorm, Softmax, the error map and the score "
    "stay fp32; uint8 in, fp32 out. An INT8 export that fails verification is retried with the first 50%, then 75%, "
    "of the quantizable ops in fp32 (docs/lowprec.md). bf16 and int8-bf16 (int8, the rest bf16): OpenVINO only "
    "(--format openvino), verified like INT8.",
)
@click.option(
    "--calib-images",
    default=None,
    metavar="FOLDER|GLOB",
    help="int8: good images to calibrate on. Default: the checkpoint's calibration hold-out images plus its "
    "train/good images. Images of the evaluated test split are refused.",
)
@click.option(
    "--calib-method",
    type=click.Choice(list(CALIBRATION_METHODS)),
    default=DEFAULT_CALIB_METHOD,
    show_default=True,
    help="int8: how activation ranges are chosen from the calibration images.",
)
@click.option(
    "--calib-count",
    type=click.IntRange(min=1),
    default=DEFAULT_CALIB_COUNT,
    show_default=True,
    help="int8: at most this many calibration images (evenly spread).",
)
@click.option(
    "--quant-scope",
    type=click.Choice(list(QUANT_SCOPES)),
    default="transformer",
    show_default=True,
    help="int8: quantize the transformer's MatMul (default: no measured accuracy cost), the backbone's Conv, or both "
    "(measured: -3 points image AUROC on the demo's brick, docs/lowprec.md).",
)
@click.option(
    "--per-tensor", is_flag=True, help="int8/int8-dynamic: one weight scale per tensor instead of per output channel."
)
@click.option(
    "--reduce-range", is_flag=True, help="int8/int8-dynamic: 7-bit weights (CPUs without VNNI can saturate with 8)."
)
@click.option(
    "--quantize-outputs",
    is_flag=True,
    help="int8: also quantize Conv/MatMul outputs (fully integer layers; less accurate, see docs/lowprec.md).",
)
@click.option(
    "--fp32-head/--int8-head",
    default=True,
    show_default=True,
    help="int8: keep the transformer's output projection (the reconstruction the map is measured against) in FP32 "
    "(quantizing it cost 1 point of pixel AUROC on the demo's grass, docs/lowprec.md).",
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="ONNX exporter: torch.export-based (dynamo) or the older TorchScript-based one.",
)
@click.option(
    "--opset",
    type=int,
    default=18,
    show_default=True,
    help="ONNX opset (17 or newer; the dynamo exporter writes 18 or newer).",
)
@click.option(
    "--simplify", is_flag=True, help="Simplify the ONNX graph with onnxslim (skipped with a note if missing)."
)
@click.option(
    "--fuse/--no-fuse",
    default=True,
    show_default=True,
    help="ONNX, TensorRT and pt2: export the fused inference rewrite of the transformer (fused QKV and K/V products, "
    "the input-independent first decoder step precomputed; same function, verified alike; docs/export.md).",
)
@click.option(
    "--batch-max",
    type=int,
    default=64,
    show_default=True,
    help="Largest batch (TensorRT profile maximum; the dynamic batch axis bound).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare the artifact with the PyTorch reference on real images; a failure exits non-zero and publishes nothing.",
)
@click.option(
    "--verify-images",
    default=None,
    metavar="FOLDER|GLOB",
    help="Images for verification. Default: the checkpoint's held-out calibration images (never a test split); "
    "without them export stops and asks for this option.",
)
@click.option(
    "--workspace-gb",
    type=float,
    default=4.0,
    show_default=True,
    help="TensorRT builder workspace (memory pool limit), GiB.",
)
@click.option(
    "--device", default="cuda:0", show_default=True, help="GPU that builds (and verifies) the TensorRT engine."
)
@click.option(
    "--pt2-device",
    default="cpu",
    show_default=True,
    help="pt2: the device AOTInductor compiles for and verifies on (cpu, cuda, cuda:N); the package runs only there.",
)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="TensorRT timing cache file, reused across builds. Default: OUT/timing.cache.",
)
@click.option(
    "--triton-platform",
    type=click.Choice(["onnx", "tensorrt"]),
    default="onnx",
    show_default=True,
    help="With --format triton: serve model.onnx (onnxruntime_onnx) or a TensorRT plan (GPU instances only).",
)
@click.option("--triton-name", default="adtr", show_default=True, help="With --format triton: the served model's name.")
@click.option(
    "--triton-max-batch", type=int, default=8, show_default=True, help="With --format triton: max_batch_size."
)
@click.option(
    "--triton-instances", type=int, default=1, show_default=True, help="With --format triton: instances per device."
)
@click.option(
    "--triton-kind",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="With --format triton: instance group kind.",
)
@click.option(
    "--triton-backend",
    type=click.Choice(["platform", "python"]),
    default="platform",
    show_default=True,
    help="With --format triton: platform serves the artifact with Triton's own backend (ONNX Runtime, TensorRT; "
    "stock containers); python writes a Python-backend model.py that runs adtr-deploy's runtime (ONNX Runtime, CPU) "
    "inside the server, what the nvidia-pytriton wheel's server (adtr triton serve) can run.",
)
@user_errors
def command(
    model_path,
    fmt,
    out_dir,
    precision,
    calib_images,
    calib_method,
    calib_count,
    quant_scope,
    per_tensor,
    reduce_range,
    quantize_outputs,
    fp32_head,
    exporter,
    opset,
    simplify,
    fuse,
    batch_max,
    verify,
    verify_images,
    workspace_gb,
    device,
    pt2_device,
    timing_cache,
    triton_platform,
    triton_name,
    triton_max_batch,
    triton_instances,
    triton_kind,
    triton_backend,
) -> None:
    """Export a trained ADTR checkpoint and verify it against the PyTorch reference.

    The exported graph is the model's own forward: uint8 RGB images (N, H, W, 3) in, anomaly map (N, 1, H, W) and
    score (N,) out, float32, batch axis dynamic. Each artifact gets model.json (input size, normalization, calibration,
    threshold, versions, sha256) beside it; ONNX also carries it in metadata_props, TorchScript in _extra_files.
    Verification results go to OUT/verification.json.

    \b
    Examples:
      adtr-export --model runs/brick/checkpoint.pt --format onnx --out export/
      adtr-export --model runs/brick --format onnx --precision fp16 --simplify --out export-fp16/
      adtr-export --model runs/brick --format onnx --precision int8 --calib-method entropy --out export-int8/
      adtr-export --model runs/brick --format tensorrt --precision fp16 --batch-max 16 --out export-trt/
      adtr-export --model runs/brick --format all --out export-all/
      adtr-export --model runs/brick --format triton --triton-max-batch 16 --out export-triton/
      adtr-export --model runs/brick --format triton --triton-backend python --out export-triton-py/
    """
    from adtr_deploy.cli.common import require_torch

    require_torch("adtr-export (it reads the training checkpoint with PyTorch)")
    from adtr_deploy.export.exporter import export_checkpoint

    result = export_checkpoint(
        model_path,
        triton_platform if fmt == TRITON else fmt,
        out_dir,
        precision=precision,
        verify=verify,
        verify_images=verify_images,
        batch_max=batch_max,
        dynamo=exporter == "dynamo",
        opset=opset,
        simplify=simplify,
        fuse=fuse,
        workspace_gb=workspace_gb,
        device=device,
        pt2_device=pt2_device,
        timing_cache=timing_cache,
        calib_images=calib_images,
        calib_method=calib_method,
        calib_count=calib_count,
        quant_scope=quant_scope,
        per_channel=not per_tensor,
        reduce_range=reduce_range,
        quantize_outputs=quantize_outputs,
        fp32_head=fp32_head,
    )
    for r in result if isinstance(result, list) else [result]:
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
        for line in _describe(r):
            click.echo(line)
    if fmt == TRITON:
        from pathlib import Path

        from adtr_deploy.export.triton import write_triton_repository

        folder = write_triton_repository(
            result.path,
            Path(out_dir) / "model_repository",
            model_name=triton_name,
            max_batch_size=triton_max_batch,
            instance_count=triton_instances,
            kind=triton_kind,
            backend=triton_backend,
        )
        click.echo(f"Triton model repository: {folder.parent} (model {triton_name!r}: {folder / 'config.pbtxt'})")
        if triton_backend == "python":
            click.echo(
                f"  serve it: adtr triton serve {folder.parent.resolve()} --python-env ENV (see adtr triton env)"
            )
        else:
            click.echo(f"  serve it: tritonserver --model-repository {folder.parent.resolve()}")
