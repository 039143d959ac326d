"""`adtr-export` / `adtr export`: checkpoint -> TorchScript, ONNX or TensorRT, each verified against the PyTorch reference."""

from __future__ import annotations

import click

from adtr_deploy.cli.common import user_errors
from adtr_deploy.export.formats import ALL, FORMATS, PRECISIONS


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
    for key in ("map", "score"):
        d = v[key]
        lines.append(
            f"  {key:5s} max |diff| {d['max_abs']:.3g} ({d['max_rel']:.2g} of the map range), mean {d['mean_abs']:.3g}"
        )
    agree = round(v["decision_agreement"] * v["decisions"])
    lines.append(
        f"  decisions at threshold {v['threshold']:.4g} ({v['threshold_source']}): {agree}/{v['decisions']} agree "
        f"({v['reference_anomalies']} anomalous in the reference); tolerance {v['tolerance']:.0e}: "
        f"{'PASS' if v['passed'] else 'FAIL'}"
    )
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
    type=click.Choice([*FORMATS, ALL]),
    default="onnx",
    show_default=True,
    help="Artifact to write: model.onnx, model.torchscript or model.engine; 'all' writes each into OUT/<format>/.",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (created if missing)."
)
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="fp32",
    show_default=True,
    help="fp16: ONNX and TensorRT only; LayerNorm, Softmax, the L2 map and the score stay fp32; uint8 in, fp32 out.",
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
    help="Images for verification. Default: the checkpoint's calibration images if present, else the built-in demo data.",
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
    "--timing-cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="TensorRT timing cache file, reused across builds. Default: OUT/timing.cache.",
)
@user_errors
def command(
    model_path,
    fmt,
    out_dir,
    precision,
    exporter,
    opset,
    simplify,
    batch_max,
    verify,
    verify_images,
    workspace_gb,
    device,
    timing_cache,
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
      adtr-export --model runs/brick --format tensorrt --precision fp16 --batch-max 16 --out export-trt/
      adtr-export --model runs/brick --format all --out export-all/
    """
    from adtr_deploy.export.exporter import export_checkpoint

    result = export_checkpoint(
        model_path,
        fmt,
        out_dir,
        precision=precision,
        verify=verify,
        verify_images=verify_images,
        batch_max=batch_max,
        dynamo=exporter == "dynamo",
        opset=opset,
        simplify=simplify,
        workspace_gb=workspace_gb,
        device=device,
        timing_cache=timing_cache,
    )
    for r in result if isinstance(result, list) else [result]:
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
        for line in _describe(r):
            click.echo(line)
