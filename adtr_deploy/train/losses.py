"""Training losses, chosen by the model's `mode` through a plain dict.

Every loss takes (features, reconstruction, batch): features and reconstruction are (B, C, h, w); `batch` is the dict the
loop built, with `index` and `label` (B,) and, where the data source provides them, `mask` (B, 1, H, W) and `image`.
ADTR+ adds its pixel/image losses here under "adtr+".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def adtr_loss(features: torch.Tensor, reconstruction: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The anomaly-free ADTR loss: mean squared error between features and reconstruction over B*C*h*w (the paper's)."""
    # In float32 even under autocast: the reconstruction error is small and fp16 would lose it.
    return F.mse_loss(reconstruction.float(), features.float())


LOSSES: dict[str, LossFn] = {"adtr": adtr_loss}


def get_loss(mode: str) -> LossFn:
    if mode not in LOSSES:
        raise ValueError(f"training mode {mode!r} has no loss; choose one of: {', '.join(LOSSES)}")
    return LOSSES[mode]
