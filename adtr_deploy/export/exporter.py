"""export_checkpoint: checkpoint -> artifact + model.json (+ verification.json), written atomically and verified.

Every artifact is first written into a hidden staging folder inside the output folder, verified there, and only then
renamed into place; a failure or an interruption removes the staging folder, so no half-written or unverified artifact
ever appears under its real name.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adtr_deploy import __version__
from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import (
    ALL,
    DEFAULT_CALIB_COUNT,
    DEFAULT_CALIB_METHOD,
    FORMATS,
    PRECISIONS,
    ExportOptions,
    QuantOptions,
    check_format_precision,
)
from adtr_deploy.export.images import verification_images
from adtr_deploy.export.verify import FULL_BATCH, VerificationError, verify_artifact
from adtr_deploy.fileio import sha256_file, write_json_atomic
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec

VERIFICATION_FILENAME = "verification.json"


@dataclass(frozen=True)
class ExportResult:
    """One exported artifact: where it is, its spec, and the verification numbers (None with verify=False)."""

    format: str
    path: Path
    spec_path: Path
    spec: ModelSpec
    verification: dict[str, Any] | None
    notes: tuple[str, ...] = ()


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(data, path, sort_keys=True)


def versions() -> dict[str, str]:
    """Versions of what made the artifact (those that are installed)."""
    out = {"package": __version__, "python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "tensorrt"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or broken: leave it out
            continue
    return out


def preset_of(config: dict[str, Any], info: dict[str, Any]) -> str:
    """The preset whose architecture the checkpoint has (weights source aside), else what training recorded."""
    from adtr_deploy.model.config import PRESETS, ADTRConfig

    def arch(cfg: ADTRConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("pretrained", "weights", "dropout")}

    mine = arch(ADTRConfig.from_dict(config))
    return next((name for name, cfg in PRESETS.items() if arch(cfg) == mine), str(info.get("preset") or "custom"))


def base_spec(ckpt: dict[str, Any], fmt: str, options: ExportOptions, checkpoint_path: Path) -> ModelSpec:
    from adtr_deploy.model.checkpoint import calibration_of, input_norm_record
    from adtr_deploy.model.config import ADTRConfig

    cfg = ADTRConfig.from_dict(ckpt["config"])
    info = ckpt.get("info") or {}
    return ModelSpec(
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        calibration=calibration_of(ckpt),
        preset=preset_of(ckpt["config"], info),
        backbone=cfg.backbone,
        format=fmt,
        precision=options.precision,
        package_version=__version__,
        tiling=info.get("tiling"),  # trained on tiles (adtr_deploy/tiling.py): the runtime tiles the same way
        extra={
            "versions": versions(),
            "batch": {"min": 1, "max": options.batch_max, "dynamic": FORMATS[fmt]["dynamic_batch"]},
            "checkpoint": {
                "path": str(checkpoint_path),
                "sha256": sha256_file(checkpoint_path),
                "format_version": ckpt.get("format_version"),
                "package_version": ckpt.get("package_version"),
                "mode": ckpt.get("mode"),
            },
            "metrics": ckpt.get("metrics"),
            "data": info.get("data"),
            **({"feedback": info["feedback"]} if info.get("feedback") else {}),  # adtr-train --feedback's provenance
            **input_norm_record(cfg, ckpt),
            **({"headroom": info["headroom"]} if info.get("headroom") else {}),  # the training images' (issue 31)
        },
    )


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _publish(files: list[Path], spec_file: Path, out_dir: Path) -> None:
    """Rename staged files into place: old artifact out first, spec next, the artifact last (its presence = done)."""
    artifact, companions = files[0], files[1:]
    final = out_dir / artifact.name
    if final.exists():
        final.unlink()
    for f in (*companions, spec_file):
        os.replace(f, out_dir / f.name)
    os.replace(artifact, final)


def _remove_stale_staging(out_dir: Path) -> None:
    """Hidden .export-FMT-PID-* folders left by an export that was killed: removed unless their process still runs
    (two exports into one folder at once keep each other's staging)."""
    for folder in out_dir.glob(".export-*"):
        parts = folder.name.split("-")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _export_one(
    model,
    ckpt: dict[str, Any],
    checkpoint_path: Path,
    fmt: str,
    out_dir: Path,
    options: ExportOptions,
    images,
    source: str,
    reference_cache: dict | None = None,
) -> ExportResult:
    row = FORMATS[fmt]
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "tensorrt" and options.timing_cache is None:
        options = dataclasses.replace(options, timing_cache=str(out_dir / "timing.cache"))
    spec = base_spec(ckpt, fmt, options, checkpoint_path)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{fmt}-{os.getpid()}-", dir=out_dir))
    try:
        artifact = staging / row["filename"]
        made = _resolve(row["exporter"])(model, artifact, spec=spec, options=options)
        files = [Path(f) for f in made["files"]]
        extra = {**spec.extra, **made["extra"], "sha256": sha256_file(artifact), "files": [f.name for f in files]}
        opset = (made["extra"].get("onnx") or made["extra"].get("tensorrt", {}).get("onnx") or {}).get("opset")
        if opset is not None:
            extra["versions"] = {**extra["versions"], "opset": opset}
        spec = spec.replace(extra=extra)
        spec_file = spec.save(staging / SPEC_FILENAME)
        verification: dict[str, Any] | None = None
        if images is not None:
            device = options.device if row["needs_gpu"] else getattr(options, row.get("device_option") or "", "cpu")
            verification = verify_artifact(
                model,
                artifact,
                images,
                options.precision,
                device=device,
                batch_size=min(FULL_BATCH, options.batch_max),
                source=source,
                reference_cache=reference_cache,
            )
            verification["artifact"] = str(out_dir / artifact.name)
            verification["published"] = bool(verification["passed"])
            _write_json(out_dir / VERIFICATION_FILENAME, verification)
            if not verification["passed"]:
                raise VerificationError(
                    f"verification failed: {verification['reason']}; {fmt} {options.precision} artifact not written "
                    f"(numbers in {out_dir / VERIFICATION_FILENAME})"
                )
        else:
            _write_json(out_dir / VERIFICATION_FILENAME, {"skipped": True, "reason": "--no-verify", "passed": None})
        _publish(files, spec_file, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        format=fmt,
        path=out_dir / artifact.name,
        spec_path=out_dir / SPEC_FILENAME,
        spec=spec,
        verification=verification,
        notes=tuple(made.get("notes", ())),
    )


# FP32 leads an INT8 export retries with when its verification fails (QuantOptions.fp32_lead): the encoder, where the
# rounding noise starts and compounds, goes back to FP32 first.
INT8_FP32_LEADS = (0.5, 0.75)


def _export_one_int8_fallback(
    model, ckpt, checkpoint_path, fmt, out_dir, options, images, source, reference_cache=None
):
    """_export_one; for a verified INT8 export that fails verification, again with more of the leading ops in FP32
    (INT8_FP32_LEADS) until one passes. The last failure is raised when none does."""
    leads = [options.quant.fp32_lead]
    if images is not None and options.precision in ("int8", "int8-dynamic", "int8-bf16"):
        leads += [x for x in INT8_FP32_LEADS if x > options.quant.fp32_lead]
    failures: list[str] = []
    for i, lead in enumerate(leads):
        opts = dataclasses.replace(options, quant=dataclasses.replace(options.quant, fp32_lead=lead))
        try:
            result = _export_one(model, ckpt, checkpoint_path, fmt, out_dir, opts, images, source, reference_cache)
        except VerificationError as exc:
            if i == len(leads) - 1:
                raise
            failures.append(f"FP32 lead {lead:.0%}: {exc}")
            continue
        if failures:
            note = (
                f"INT8 verification failed with {leads[0]:.0%} of the quantizable ops kept FP32, passed with the first "
                f"{lead:.0%} FP32 (their rounding noise is what the map magnified); the attempts: "
                + " | ".join(failures)
            )
            result = dataclasses.replace(result, notes=(*result.notes, note))
        return result
    raise AssertionError("unreachable")


def _tensorrt_ready(device: str) -> str | None:
    """None when TensorRT and a GPU are usable, else the one-sentence reason."""
    from adtr_deploy.export.tensorrt import TensorRTUnavailable, environment

    try:
        environment(device)
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    verify: bool = True,
    verify_images: str | None = None,
    batch_max: int = 64,
    dynamo: bool = True,
    opset: int = 18,
    simplify: bool = False,
    batch_opt: int | None = None,
    workspace_gb: float = 4.0,
    device: str = "cuda:0",
    timing_cache: str | None = None,
    calib_images: str | None = None,
    calib_method: str = DEFAULT_CALIB_METHOD,
    calib_count: int = DEFAULT_CALIB_COUNT,
    quant_scope: str = "transformer",
    per_channel: bool = True,
    reduce_range: bool = False,
    quantize_outputs: bool = False,
    fp32_head: bool = True,
    fuse: bool = True,
    pt2_device: str = "cpu",
) -> ExportResult | list[ExportResult]:
    """Export a checkpoint (file or run folder) to `fmt` in `out_dir`, with model.json, verified against the reference.

    fmt is one of FORMATS ("onnx", "torchscript", "pt2", "tensorrt"), or "all": then every format that supports `precision`
    goes into its own sub-folder (out_dir/onnx, ...), TensorRT only where it and a GPU are present, and a list of
    results comes back. Raises ValueError/RuntimeError with one sentence on bad input, VerificationError on a failed
    parity check (nothing is published then).

    INT8 (precision "int8"): calibrated on `calib_images` (a folder or glob of good images), else on the checkpoint's
    calibration hold-out images plus its train/good images, at most `calib_count`, with `calib_method` (percentile, the
    default; minmax, entropy); images inside the evaluated test split are refused. `quant_scope` (all, backbone,
    transformer), `per_channel`, `reduce_range` and `quantize_outputs` (True: Conv/MatMul outputs are quantized too)
    choose what and how it quantizes (adtr_deploy/export/quantize.py); "int8-dynamic" uses per_channel/reduce_range.
    `pt2_device`: what the pt2 format compiles for and is verified on. `fuse` (ONNX, TensorRT, pt2): export the fused
    inference rewrite of the transformer (adtr_deploy/export/fuse.py). "all" leaves pt2 out (minutes of C++
    compilation): ask for it with fmt="pt2".
    """
    from adtr_deploy.export.onnx import check_opset
    from adtr_deploy.export.tensorrt import TensorRTUnavailable, profile_shapes

    if fmt != ALL:
        check_format_precision(fmt, precision)
    else:
        check_format_precision("onnx", precision)
    if int(batch_max) < 1:
        raise UserError(f"--batch-max must be at least 1, not {batch_max}")
    check_opset(opset, dynamo)
    options = ExportOptions(
        precision=precision,
        opset=opset,
        dynamo=dynamo,
        simplify=simplify,
        fuse=fuse,
        pt2_device=pt2_device,
        batch_max=int(batch_max),
        batch_opt=batch_opt,
        workspace_gb=workspace_gb,
        device=device,
        timing_cache=timing_cache,
        quant=QuantOptions(
            method=calib_method,
            count=int(calib_count),
            per_channel=per_channel,
            reduce_range=reduce_range,
            scope=quant_scope,
            quantize_outputs=quantize_outputs,
            fp32_head=fp32_head,
        ),
    )
    notes: list[str] = []
    if fmt == ALL:
        formats = [f for f, row in FORMATS.items() if precision in row["precisions"] and row.get("in_all", True)]
        notes += [
            f"{f} skipped: it supports {', '.join(FORMATS[f]['precisions'])} only"
            for f in FORMATS
            if precision not in FORMATS[f]["precisions"]
        ]
        notes += [f"{f} skipped: {FORMATS[f]['in_all_note']}" for f in FORMATS if not FORMATS[f].get("in_all", True)]
        if "tensorrt" in formats:
            reason = _tensorrt_ready(device)
            if reason:
                formats.remove("tensorrt")
                notes.append(f"tensorrt skipped: {reason}")
    else:
        formats = [fmt]
        if fmt == "tensorrt":
            reason = _tensorrt_ready(device)
            if reason:
                raise TensorRTUnavailable(reason)
            profile_shapes((1, 1), options.batch_max, options.batch_opt)  # validates the batch range early

    from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    path = Path(checkpoint)
    checkpoint_path = path / "checkpoint.pt" if path.is_dir() else path
    model = model_from_checkpoint(ckpt)
    calib_files: tuple[str, ...] = ()
    if PRECISIONS[precision]["calibrated"]:
        from adtr_deploy.export.images import calibration_files

        files, calib_source = calibration_files(ckpt.get("info") or {}, calib_images, calib_count)
        calib_files = tuple(str(f) for f in files)
        quant = dataclasses.replace(options.quant, calib_files=calib_files, calib_source=calib_source)
        options = dataclasses.replace(options, quant=quant)
    images, source = (None, "")
    if verify:
        images, source = verification_images(
            model.cfg.input_size, verify_images=verify_images, checkpoint=ckpt, avoid=calib_files
        )

    out_dir = Path(out_dir)
    if fmt != ALL:
        result = _export_one_int8_fallback(model, ckpt, checkpoint_path, fmt, out_dir, options, images, source)
        return dataclasses.replace(result, notes=(*notes, *result.notes))
    results = []
    summary: dict[str, Any] = {}
    reference_cache: dict = {}  # the reference runs once for all formats
    try:
        for f in formats:
            result = _export_one_int8_fallback(
                model, ckpt, checkpoint_path, f, out_dir / f, options, images, source, reference_cache
            )
            results.append(result)
            summary[f] = result.verification
    finally:
        if summary:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_json(out_dir / VERIFICATION_FILENAME, {**summary, "notes": notes})
    if results:
        results[0] = dataclasses.replace(results[0], notes=(*notes, *results[0].notes))
    return results
