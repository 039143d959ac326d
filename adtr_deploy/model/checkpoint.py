"""The checkpoint format: a dict of tensors and plain data, loadable with `torch.load(weights_only=True)`.

A checkpoint is self-contained: it holds the whole state dict (the frozen backbone too), so exporting or evaluating it needs
neither the weights package nor the user's backbone file on that machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adtr_deploy import __version__
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.config import ADTRConfig
from adtr_deploy.spec import Calibration

CHECKPOINT_FORMAT = "adtr-deploy-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(UserError):
    """A file is not a readable adtr-deploy checkpoint."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), fsync=True)


def save_checkpoint(
    path: str | Path,
    model: ADTR,
    *,
    calibration: Calibration | dict | None = None,
    mode: str = "adtr",
    train_state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. `train_state` (optimizer, scheduler, epoch, RNG) makes it resumable."""
    if isinstance(calibration, Calibration):
        import dataclasses

        calibration = dataclasses.asdict(calibration)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "package_version": __version__,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "calibration": calibration,
        "mode": mode,
        "train_state": train_state,
        "metrics": metrics,
        "info": info or {},
    }
    return atomic_torch_save(ckpt, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict, with one clear sentence for every way it can be wrong."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give the checkpoint.pt that adtr-train wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code, truncated file ...
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: corrupt, truncated or not made by adtr-train); "
            "retrain or give another file"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an adtr-deploy checkpoint; give the checkpoint.pt that adtr-train wrote")
    version = int(ckpt.get("format_version", 0))
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this adtr-deploy reads ({CHECKPOINT_VERSION}); "
            "upgrade adtr-deploy"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ADTR:
    """Rebuild the module from a checkpoint dict (no weights package needed: the backbone is in the state dict)."""
    cfg = ADTRConfig.from_dict(ckpt["config"]).replace(pretrained=False, weights=None)
    model = ADTR(cfg)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit its configuration ({str(exc)[:200]})") from None
    return model.eval()


def load_checkpoint(path: str | Path) -> tuple[ADTR, dict[str, Any]]:
    """Checkpoint path -> (model in eval mode, raw checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt), ckpt


def calibration_of(ckpt: dict[str, Any]) -> Calibration:
    return Calibration(**(ckpt.get("calibration") or {}))


def input_norm_record(cfg: ADTRConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """For model.json: the per-image input standardization the graph applies (cfg.input_norm "image", issue 31) and
    its reference statistics in pixel units; nothing for graphs without it. Informational: the graph does the work."""
    if cfg.input_norm == "none":
        return {}
    state = ckpt.get("state_dict") or {}
    ref = {
        k: [round(float(v), 4) for v in state[f"input_ref_{k}"]] for k in ("mean", "std") if f"input_ref_{k}" in state
    }
    return {"input_norm": {"mode": cfg.input_norm, **{f"reference_{k}": v for k, v in ref.items()}}}
