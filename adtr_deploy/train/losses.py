"""Training losses, chosen by the model's `mode` through a plain dict.

Every loss takes (features, reconstruction, batch): features and reconstruction are (B, C, h, w); `batch` is the dict the
loop built, with `index` and `label` (B,) and, where the data source provides them, `mask` (B, 1, H, W) and `image`.
"adtr+" is the ADTR+ fine-tuning loss (train/losses_plus.py): pixel-level L_px where a batch carries masks (`mask`,
`has_mask`) plus image-level L_img from `label`; its alpha and k come from TrainConfig through LOSS_OPTIONS.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from adtr_deploy.errors import UserError
from adtr_deploy.train.losses_plus import adtr_plus_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def adtr_loss(features: torch.Tensor, reconstruction: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The anomaly-free ADTR loss: mean squared error between features and reconstruction over B*C*h*w (the paper's)."""
    # In float32 even under autocast: the reconstruction error is small and fp16 would lose it.
    return F.mse_loss(reconstruction.float(), features.float())


LOSSES: dict[str, LossFn] = {"adtr": adtr_loss, "adtr+": adtr_plus_loss}

# Loss arguments taken from TrainConfig fields, per mode: {mode: {loss argument: TrainConfig field}}.
LOSS_OPTIONS: dict[str, dict[str, str]] = {"adtr+": {"alpha": "alpha", "k": "topk"}}


def get_loss(mode: str) -> LossFn:
    if mode not in LOSSES:
        raise UserError(f"training mode {mode!r} has no loss; choose one of: {', '.join(LOSSES)}")
    return LOSSES[mode]


def loss_for(cfg: Any) -> LossFn:
    """The loss of `cfg.mode` (a TrainConfig) with its options (LOSS_OPTIONS) bound from the config."""
    fn = get_loss(cfg.mode)
    options = {arg: getattr(cfg, field) for arg, field in LOSS_OPTIONS.get(cfg.mode, {}).items()}
    return partial(fn, **options) if options else fn
