"""Score calibration from held-out good images, and the normalization the runtime applies (numpy only)."""

from __future__ import annotations

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.spec import Calibration

# Default image threshold: mean + K standard deviations of good validation scores, and never below their maximum.
THRESHOLD_SIGMAS = 3.0
# Margin toward the defects (issue 31): a handful of calibration images (6-8) puts the rule above at the edge of the good
# scores they happened to have, and good parts the model never saw (another region of the material, another batch) land
# just above it. adtr-train therefore also scores synthetic defects made on the calibration images
# (data/validation.synthetic_defects) and lifts the threshold DEFECT_MARGIN of the way from the good rule to the 10th
# percentile of those defect scores; never lowered (where the synthetic defects score below the good rule, the margin is
# 0). 0.15 was chosen on the validation split (held-out training images with synthetic defects; docs/robustness.md,
# benchmarks/results/threshold_margin_val.md): the largest margin measured (0, 0.1, 0.15, 0.2, 0.25, 0.4, 0.5) that keeps
# the synthetic defects' recall within the issue's 5 points of no margin in every category (brick: 100 -> 96 %; 0.2
# gives 94 %, 0.25 92 %), and it removes the false alarms of the held-out good images there (brick 6 % -> 0 %).
DEFECT_MARGIN = 0.15
DEFECT_QUANTILE = 0.1


def calibrate(
    scores: np.ndarray,
    maps: np.ndarray | None = None,
    *,
    sigmas: float = THRESHOLD_SIGMAS,
    defect_scores: np.ndarray | None = None,
    margin: float = DEFECT_MARGIN,
    keep_margin: float = 0.0,
) -> Calibration:
    """Statistics of raw scores (N,) and maps (N, 1, H, W) of GOOD images -> Calibration with a default threshold.

    `defect_scores`: scores of synthetic defects made on those good images; the threshold is lifted `margin` of the way
    toward their DEFECT_QUANTILE (see DEFECT_MARGIN). `keep_margin`: without defect scores (a recalibration from
    confirmed-good frames), the absolute margin of the previous calibration is kept above the new good rule.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise UserError("calibration needs at least one good image")
    if not 0.0 <= margin <= 1.0:
        raise UserError(f"the threshold margin must lie in [0, 1] (a share of the way to the defects), not {margin!r}")
    mean, std = float(scores.mean()), float(scores.std())
    good_rule = max(mean + sigmas * std, float(scores.max()) * 1.0001)
    method = f"good-val mean+{sigmas:g}std"
    lift = 0.0
    defects = None if defect_scores is None else np.asarray(defect_scores, dtype=np.float64).reshape(-1)
    if defects is not None and defects.size and margin > 0:
        lift = margin * max(0.0, float(np.quantile(defects, DEFECT_QUANTILE)) - good_rule)
        method += f", +{margin:g} of the way to the q{DEFECT_QUANTILE:g} of {defects.size} synthetic defects"
    elif keep_margin > 0:
        lift = float(keep_margin)
        method += f", +{lift:.4g} margin kept from the previous calibration"
    kwargs = dict(
        score_mean=mean,
        score_std=std,
        score_max=float(scores.max()),
        threshold=float(good_rule + lift),
        num_images=int(scores.size),
        method=method,
        margin=float(lift),
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
