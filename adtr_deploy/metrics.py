"""Anomaly-detection metrics in numpy (and OpenCV for connected components): no sklearn, no torch.

- image AUROC: area under the ROC of image scores; ties count one half (the Mann-Whitney statistic), exactly as
  sklearn.metrics.roc_auc_score.
- pixel AUROC: the same over every pixel of every test image.
- PRO: per-region overlap (Bergmann et al., MVTec-AD). Every connected component (8-connectivity) of every ground-truth mask
  is a region; at a threshold, a region's overlap is the fraction of its pixels predicted anomalous, and PRO is the mean over
  all regions. The PRO-vs-FPR curve is integrated from FPR 0 to max_fpr (0.3) and divided by max_fpr, so 1.0 is perfect.
  The curve is computed exactly, at every distinct map value, from one sort of all pixels.
- F1-max: the best F1 of "anomalous iff score >= threshold" over all thresholds, and that threshold.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from adtr_deploy.errors import UserError

# f1_max_threshold_on_test: the score threshold at which F1 peaks, picked on the evaluated (test) labels. It measures
# the map, it is not a setting: deployment uses the spec's threshold, calibrated on held-out good training images.
TEST_THRESHOLD = "f1_max_threshold_on_test"
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "f1_max", TEST_THRESHOLD, "num_images")
# new key -> the key metrics.json files written before 2026-12-03 used for it
OLD_KEYS = {TEST_THRESHOLD: "threshold"}
MAX_FPR = 0.3


# ------------------------------------------------------------------------------------------------------------- validation


def _scores_labels(scores, labels, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Flattened float64 scores and bool labels, checked: same length, finite, labels 0/1."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels)
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            raise UserError(f"labels must be 0 (good) or 1 (anomalous); got values {np.unique(y)[:5].tolist()}")
        y = y.astype(bool)
    y = y.reshape(-1)
    if s.size != y.size:
        raise UserError(f"got {s.size} {what} but {y.size} labels; pass one label per score")
    if s.size and not np.isfinite(s).all():
        raise UserError(f"{what} contain NaN or infinite values; check the model outputs")
    return s, y


def _need_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous" if n_pos else "good"
        raise UserError(
            f"{what} needs both good and anomalous examples but only {present} ones are present; "
            "evaluate on a test set that contains both"
        )


def _maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Maps as float64 (N, H, W) and masks as bool (N, H, W); (N, 1, H, W) is accepted for either."""
    m = np.asarray(maps)
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float64)
    g = np.asarray(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim == 2:
        m, g = m[None], (g[None] if g.ndim == 2 else g)
    if m.shape != g.shape or m.ndim != 3:
        raise UserError(
            f"anomaly maps {tuple(np.shape(maps))} and masks {tuple(np.shape(masks))} must have the same (N, H, W) shape; "
            "resize the maps to the mask size first"
        )
    if not np.isfinite(m).all():
        raise UserError("anomaly maps contain NaN or infinite values; check the model outputs")
    g = g if g.dtype == np.bool_ else g > (127 if g.size and g.max() > 1 else 0.5)  # 0/1 and 0/255 masks
    return m, g


# ---------------------------------------------------------------------------------------------------------------- metrics


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney U / (P * N): for each positive, the negatives below it plus half the negatives tied with it."""
    neg = np.sort(s[~y])
    pos = s[y]
    below = np.searchsorted(neg, pos, side="left")
    below_or_tied = np.searchsorted(neg, pos, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))  # exact integer
    return twice_u / (2.0 * pos.size * neg.size)


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores (higher = more anomalous) against labels (1 = anomalous)."""
    s, y = _scores_labels(scores, labels)
    _need_both_classes(y, "image AUROC")
    return _auroc(s, y)


def pixel_auroc(maps, masks) -> float:
    """Area under the ROC curve over all pixels: maps (N, H, W) or (N, 1, H, W), masks of the same shape."""
    m, g = _maps_masks(maps, masks)
    y = g.reshape(-1)
    _need_both_classes(y, "pixel AUROC")
    return _auroc(m.reshape(-1), y)


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel region id (0 = normal, 1..R) over all images: each 8-connected component of each mask is one region."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        labels[i] = np.where(comp > 0, comp + count, 0)
        count += n - 1
    return labels, count


def pro_curve(maps, masks, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO-vs-FPR curve (fpr, pro), both increasing from (0, 0), one point per distinct map value.

    At threshold t (anomalous iff value >= t), FPR is the fraction of normal pixels >= t and PRO the mean over regions of
    the fraction of the region's pixels >= t, i.e. the sum of the weights 1 / (R * |region|) of anomalous pixels >= t.
    The curve stops at its first point with FPR > max_fpr (it reaches (1, 1) for max_fpr = 1).
    """
    m, g = _maps_masks(maps, masks)
    _need_both_classes(g.reshape(-1), "PRO")
    regions, num_regions = _region_labels(g)
    regions, values = regions.reshape(-1), m.reshape(-1)
    sizes = np.bincount(regions, minlength=num_regions + 1)
    normal_sorted = np.sort(values[regions == 0])  # (num_normal,) ascending
    num_normal = normal_sorted.size
    in_region = regions > 0
    order = np.argsort(values[in_region])  # only the anomalous pixels: a few percent of all
    anomalous_sorted = values[in_region][order]
    weights = 1.0 / (num_regions * sizes[regions[in_region]][order])
    weight_below = np.concatenate([[0.0], np.cumsum(weights)])  # [k] = total weight of the k lowest anomalous pixels
    # Thresholds below the normal value at rank `cut` give FPR > max_fpr: leave them out (except that one point).
    cut = max(num_normal - math.floor(max_fpr * num_normal) - 1, 0)
    thresholds = np.unique(values[values >= normal_sorted[cut]] if cut > 0 else values)  # ascending, distinct
    fp = num_normal - np.searchsorted(normal_sorted, thresholds, side="left")
    pro = weight_below[-1] - weight_below[np.searchsorted(anomalous_sorted, thresholds, side="left")]
    # Highest threshold first, so both curves increase; (0, 0) is the threshold above every value.
    fpr = np.concatenate([[0.0], fp[::-1] / num_normal])
    pro = np.concatenate([[0.0], np.clip(pro[::-1], 0.0, 1.0)])
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], with y linearly interpolated at x_max (x increasing)."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    if xs[-1] < x_max:  # the next point lies beyond x_max: add the partial trapezoid up to x_max
        j = int(np.count_nonzero(inside))
        y_max = ys[-1] + (y[j] - ys[-1]) * (x_max - xs[-1]) / (x[j] - xs[-1])
        area += (x_max - xs[-1]) * (ys[-1] + y_max) / 2.0
    return area


def pro_score(maps, masks, max_fpr: float = MAX_FPR) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (MVTec-AD's normalized AU-PRO)."""
    if not 0.0 < max_fpr <= 1.0:
        raise UserError(f"max_fpr must be in (0, 1]; got {max_fpr}")
    fpr, pro = pro_curve(maps, masks, max_fpr=max_fpr)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over thresholds, predicting anomalous iff score >= threshold: returns (f1, threshold).

    Among thresholds with the same best F1, the highest is returned.
    """
    s, y = _scores_labels(scores, labels)
    num_pos = int(y.sum())
    if num_pos == 0:
        raise UserError("F1 needs at least one anomalous example but none is present; evaluate on anomalous images too")
    order = np.argsort(-s, kind="stable")
    values = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    fp = np.arange(1, s.size + 1) - tp
    last_of_tie = np.r_[values[1:] != values[:-1], True]
    tp, fp, values = tp[last_of_tie], fp[last_of_tie], values[last_of_tie]
    f1 = 2.0 * tp / (tp + fp + num_pos)  # = 2PR / (P + R), with FN = num_pos - tp
    best = int(np.argmax(f1))
    return float(f1[best]), float(values[best])


def evaluate(scores, labels, maps=None, masks=None, *, max_fpr: float = MAX_FPR) -> dict:
    """All metrics of one test set as a plain dict with keys METRIC_KEYS.

    `pixel_auroc` and `pro` are None when there are no masks (masks None, or no anomalous pixel in them). Anomalous images
    whose mask is empty (a defect folder without ground truth) are left out of the pixel metrics, since their pixels are
    not known to be normal.
    """
    s, y = _scores_labels(scores, labels)
    f1, threshold = f1_max(s, y)
    result = {
        "image_auroc": image_auroc(s, y),
        "pixel_auroc": None,
        "pro": None,
        "f1_max": f1,
        TEST_THRESHOLD: threshold,
        "num_images": int(s.size),
    }
    if masks is None:
        return result
    if maps is None:
        raise UserError("masks were given without anomaly maps; pass the maps to compute pixel metrics")
    m, g = _maps_masks(maps, masks)
    if m.shape[0] != s.size:
        raise UserError(f"got {m.shape[0]} anomaly maps for {s.size} scores; pass one map per image")
    known = ~(y & ~g.any(axis=(1, 2)))  # drop anomalous images without any mask pixel
    m, g = m[known], g[known]
    if g.any():
        result["pixel_auroc"] = pixel_auroc(m, g)
        result["pro"] = pro_score(m, g, max_fpr=max_fpr)
    return result


# ----------------------------------------------------------------------------------------------------------------- tables


def metric(metrics: dict, key: str):
    """metrics[key], also from a metrics.json written before a key was renamed (OLD_KEYS); None when absent."""
    return metrics.get(key, metrics.get(OLD_KEYS.get(key, key)))


def per_category_table(results: dict[str, dict]) -> tuple[list[dict], dict]:
    """Per-category metric dicts -> (rows, mean row).

    Each row is {"category": name, **metrics}. The mean row averages each metric over the categories where it is not None
    (None if none has it) and sums num_images.
    """
    rows = [{"category": name, **{k: metric(metrics, k) for k in METRIC_KEYS}} for name, metrics in results.items()]
    mean: dict = {"category": "mean"}
    for key in METRIC_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        if key == "num_images":
            mean[key] = int(sum(values))
        else:
            mean[key] = float(np.mean(values)) if values else None
    return rows, mean


def format_table(rows: list[dict], mean: dict | None = None, *, extra: tuple[str, ...] = ()) -> str:
    """A Markdown table of per_category_table's output: AUROC, PRO and F1 in percent, one decimal; `extra` names more
    columns (for example a run's "status") printed as they are."""

    def cell(key: str, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if key in extra:
            return str(value)
        if key == "num_images":
            return str(int(value))
        if key == TEST_THRESHOLD:
            return f"{value:.4g}"
        return f"{100.0 * value:.1f}"

    names = ["category", "image AUROC", "pixel AUROC", "PRO", "F1-max", "F1-max threshold (test)", "images", *extra]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows + ([mean] if mean else []):
        cells = [str(row["category"])] + [cell(k, row.get(k)) for k in (*METRIC_KEYS, *extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
