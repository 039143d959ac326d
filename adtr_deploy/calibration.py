"""Score calibration from held-out good images, and the normalization the runtime applies (numpy only)."""

from __future__ import annotations

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.spec import Calibration

# Default image threshold: mean + K standard deviations of good validation scores, and never below their maximum.
THRESHOLD_SIGMAS = 3.0


def calibrate(scores: np.ndarray, maps: np.ndarray | None = None, *, sigmas: float = THRESHOLD_SIGMAS) -> Calibration:
    """Statistics of raw scores (N,) and maps (N, 1, H, W) of GOOD images -> Calibration with a default threshold."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise UserError("calibration needs at least one good image")
    mean, std = float(scores.mean()), float(scores.std())
    threshold = max(mean + sigmas * std, float(scores.max()) * 1.0001)
    kwargs = dict(
        score_mean=mean,
        score_std=std,
        score_max=float(scores.max()),
        threshold=float(threshold),
        num_images=int(scores.size),
        method=f"good-val mean+{sigmas:g}std",
    )
    if maps is not None:
        px = np.asarray(maps, dtype=np.float64).reshape(-1)
        m_mean, m_std = float(px.mean()), float(px.std())
        kwargs.update(
            map_mean=m_mean,
            map_std=m_std,
            map_threshold=float(max(m_mean + sigmas * m_std, np.quantile(px, 0.999))),
        )
    return Calibration(**kwargs)


def normalize(raw: np.ndarray | float, mean: float, threshold: float) -> np.ndarray:
    """0.5 * (raw - mean) / (threshold - mean), clipped to [0, 1]: good mean -> 0, threshold -> 0.5."""
    span = max(float(threshold) - float(mean), 1e-12)
    return np.clip(0.5 * (np.asarray(raw, dtype=np.float32) - mean) / span, 0.0, 1.0)


def normalize_scores(scores: np.ndarray, cal: Calibration) -> np.ndarray:
    return normalize(scores, cal.score_mean, cal.threshold)


def normalize_maps(maps: np.ndarray, cal: Calibration) -> np.ndarray:
    return normalize(maps, cal.map_mean, cal.map_threshold)
