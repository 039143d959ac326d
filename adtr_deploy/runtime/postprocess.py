"""From raw model outputs to decisions and pictures (numpy + OpenCV).

Scores are normalized with the calibration in the model's metadata (adtr_deploy.calibration): the mean score of good
images maps to 0 and the threshold to 0.5, so `is_anomaly` is exactly `normalized_score > 0.5`. A threshold given by the
user replaces the calibrated one in both places.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from adtr_deploy.calibration import normalize_maps, normalize_scores
from adtr_deploy.errors import UserError
from adtr_deploy.spec import Calibration


@dataclass(frozen=True)
class Prediction:
    """One image's result. `anomaly_map` is the raw (H, W) float32 map at the model's input size (a tiled model's: at
    the image's size times the tiling scale)."""

    anomaly_map: np.ndarray
    score: float
    normalized_score: float
    is_anomaly: bool


class Postprocessor:
    """Turns (maps (N, 1, H, W) or N maps (1, h, w), scores (N,)) into Predictions with the calibration's (or the
    given) threshold."""

    def __init__(self, calibration: Calibration, threshold: float | None = None):
        if threshold is not None:
            if not np.isfinite(threshold):
                raise UserError(f"--threshold {threshold} is not a finite number; give a raw score threshold")
            if threshold <= calibration.score_mean and calibration.method != "uncalibrated":
                raise UserError(
                    f"--threshold {threshold:g} is not above the mean score of good images ({calibration.score_mean:g}); "
                    "give a larger threshold"
                )
            calibration = dataclasses.replace(calibration, threshold=float(threshold))
        self.calibration = calibration
        self.threshold = float(calibration.threshold)

    def __call__(self, maps: np.ndarray, scores: np.ndarray) -> list[Prediction]:
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        anomalous = scores > self.threshold  # the decision is on raw scores, exactly
        normalized = normalize_scores(scores, self.calibration)
        # float32 rounding can put a score that equals the threshold a hair above 0.5: keep the two views in agreement
        normalized = np.where(
            anomalous, np.maximum(normalized, np.nextafter(np.float32(0.5), 1)), np.minimum(normalized, 0.5)
        )
        return [
            Prediction(
                anomaly_map=np.asarray(maps[i][0], dtype=np.float32),  # maps: (N, 1, H, W), or a list (tiled)
                score=float(scores[i]),
                normalized_score=float(normalized[i]),
                is_anomaly=bool(anomalous[i]),
            )
            for i in range(scores.shape[0])
        ]

    def heat(self, anomaly_map: np.ndarray) -> np.ndarray:
        """A map in [0, 1] for display: calibrated (pixel threshold -> 0.5) or, uncalibrated, stretched per image."""
        if self.calibration.method == "uncalibrated":
            lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
            return (anomaly_map - lo) / max(hi - lo, 1e-12)
        return normalize_maps(anomaly_map, self.calibration)


def overlay(image_rgb: np.ndarray, prediction: Prediction, heat: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The heatmap blended over the image at the image's own size, with score and decision written on it. Returns BGR
    uint8 (H, W, 3), ready for cv2.imwrite / VideoWriter / imshow."""
    h, w = image_rgb.shape[:2]
    heat = cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    base = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(colored, alpha, base, 1 - alpha, 0)
    color = (0, 0, 255) if prediction.is_anomaly else (0, 200, 0)
    label = f"{'ANOMALY' if prediction.is_anomaly else 'OK'}  {prediction.normalized_score:.2f} (raw {prediction.score:.4g})"
    scale = max(0.35, min(w, h) / 600)
    thick = max(1, int(round(scale * 2)))
    (tw, th), base_line = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(out, (0, 0), (min(w, tw + 8), th + base_line + 8), (0, 0, 0), -1)
    cv2.putText(out, label, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    if prediction.is_anomaly:
        cv2.rectangle(out, (0, 0), (w - 1, h - 1), color, max(2, thick))
    return out
