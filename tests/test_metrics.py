"""The numpy metrics agree with sklearn and with slow, obviously-correct reference implementations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adtr_deploy import metrics


def _tied_scores(rng: np.random.Generator, labels: np.ndarray, levels: int) -> np.ndarray:
    """Informative but overlapping scores with few distinct values: many exact ties, also between good and anomalous."""
    return (rng.integers(0, levels, labels.shape) + 2 * (labels > 0)).astype(np.float32) / levels


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = _tied_scores(rng, labels, levels=7)
    assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    untied = rng.normal(size=60) + labels
    assert metrics.image_auroc(untied, labels.astype(int)) == pytest.approx(roc_auc_score(labels, untied), abs=1e-12)


def test_pixel_auroc_equals_sklearn_over_all_pixels():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 1, 32, 40), dtype=np.uint8)
    for i in range(1, 6):  # rectangles of different sizes; image 0 is good
        y, x = rng.integers(0, 20, 2)
        masks[i, 0, y : y + 4 + 2 * i, x : x + 3 + i] = 255
    maps = _tied_scores(rng, masks, levels=20)
    expected = roc_auc_score((masks > 0).reshape(-1), maps.reshape(-1))
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert metrics.pixel_auroc(maps[:, 0], masks[:, 0] > 0) == pytest.approx(expected, abs=1e-12)


def test_auroc_of_perfect_inverted_and_random_scores():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(500), np.ones(500)]
    assert metrics.image_auroc(labels + 0.1 * rng.random(1000), labels) == 1.0
    assert metrics.image_auroc(-labels, labels) == 0.0
    assert metrics.image_auroc(np.zeros(1000), labels) == 0.5  # all tied: exactly chance
    assert metrics.image_auroc(rng.random(1000), labels) == pytest.approx(0.5, abs=0.05)


def test_one_class_and_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="only good ones are present"):
        metrics.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="only anomalous ones"):
        metrics.pixel_auroc(np.ones((1, 4, 4)), np.ones((1, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        metrics.image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        metrics.image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="same \\(N, H, W\\) shape"):
        metrics.pixel_auroc(np.ones((2, 8, 8)), np.ones((2, 4, 4)))


# ----------------------------------------------------------------------------------------------------------------- PRO


def _slow_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Reference: threshold at every distinct value, measure each region's overlap, integrate segment by segment."""
    regions = []  # boolean (N, H, W) per connected component
    for i, mask in enumerate(masks):
        n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for r in range(1, n):
            full = np.zeros(masks.shape, dtype=bool)
            full[i] = comp == r
            regions.append(full)
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & ~masks).sum() / (~masks).sum()
        pro = np.mean([(pred & r).sum() / r.sum() for r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= max_fpr or x1 == x0:
            continue
        x_end = min(x1, max_fpr)
        y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        area += (x_end - x0) * (y0 + y_end) / 2
    return area / max_fpr


def _random_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(int(rng.integers(0, 3))):  # 0-2 blobs per image, some touching: varied region counts
            c = rng.integers(2, size - 2, 2)
            cv2.circle(masks[i], (int(c[0]), int(c[1])), int(rng.integers(1, 4)), 1, -1)
    masks[0, 1:3, 1:4] = 1  # at least one region
    return masks.astype(bool)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 6])
def test_pro_equals_slow_reference(seed, levels):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 5, 16)
    maps = rng.random(masks.shape) + 0.4 * masks
    if levels:
        maps = np.round(maps * levels) / levels  # heavy ties
    for max_fpr in (0.3, 0.05, 1.0):
        assert metrics.pro_score(maps, masks, max_fpr=max_fpr) == pytest.approx(
            _slow_pro(maps, masks, max_fpr), abs=1e-9
        )


def test_pro_hand_computed_example():
    # mask [1 1 0 0], map [0.9 0.1 0.5 0.2]: curve (0,0) (0,.5) (.5,.5) (1,.5) (1,1); up to FPR 0.3 the PRO is 0.5.
    maps = np.array([[[0.9, 0.1, 0.5, 0.2]]])
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    fpr, pro = metrics.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.5, 1])
    assert metrics.pro_score(maps, masks) == pytest.approx(0.5)


def test_pro_weights_regions_equally_not_pixels():
    # A large region found perfectly and a small one missed: pixel recall is high, but PRO averages regions -> 0.5.
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 2:22, 2:22] = True  # 400 px
    masks[0, 30:32, 30:32] = True  # 4 px
    maps = np.zeros(masks.shape) + np.random.default_rng(0).random(masks.shape) * 0.1
    maps[0, 2:22, 2:22] += 1.0
    maps[0, 30:32, 30:32] = -1.0  # below every normal pixel
    assert metrics.pro_score(maps, masks) == pytest.approx(0.5, abs=1e-9)


def test_pro_of_perfect_inverted_and_random_maps():
    rng = np.random.default_rng(3)
    masks = _random_masks(rng, 8, 32)
    assert metrics.pro_score(masks.astype(float), masks) == pytest.approx(1.0)
    assert metrics.pro_score(-masks.astype(float), masks) == pytest.approx(0.0)
    # Random maps: PRO ~ FPR, so the area up to 0.3 is ~0.3^2/2 and normalized ~0.15.
    assert metrics.pro_score(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.04)


# ---------------------------------------------------------------------------------------------------------------- F1-max


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(50) < 0.3
    scores = _tied_scores(rng, labels, levels=9)
    best, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:  # descending: keep the highest threshold among equal F1
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best + 1e-15:
            best, best_t = f1, t
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert threshold == pytest.approx(float(best_t))


def test_f1_max_perfect_separation_returns_the_separating_threshold():
    f1, threshold = metrics.f1_max([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1])
    assert (f1, threshold) == (1.0, pytest.approx(0.7))


# -------------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_keys_and_pixel_metrics_none_without_masks():
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    scores = rng.random(20) + labels
    result = metrics.evaluate(scores, labels)
    assert tuple(result) == metrics.METRIC_KEYS
    assert result["pixel_auroc"] is None and result["pro"] is None
    assert result["num_images"] == 20 and result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    maps = rng.random((20, 1, 16, 16))
    assert metrics.evaluate(scores, labels, maps, np.zeros((20, 1, 16, 16), bool))["pixel_auroc"] is None


def test_evaluate_leaves_anomalous_images_without_masks_out_of_pixel_metrics():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[2, 4:9, 4:9] = True  # image 3 is anomalous but has no mask (a defect folder without ground truth)
    maps = rng.random(masks.shape) + masks
    result = metrics.evaluate([0.1, 0.2, 0.8, 0.9], labels, maps, masks)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks[:3].reshape(-1), maps[:3].reshape(-1)))
    assert result["pro"] == pytest.approx(metrics.pro_score(maps[:3], masks[:3]))
    with pytest.raises(ValueError, match="without anomaly maps"):
        metrics.evaluate([0.1, 0.9], [0, 1], None, masks[:2])


def test_per_category_table_means_and_markdown():
    results = {
        "brick": {
            "image_auroc": 0.9,
            "pixel_auroc": 0.8,
            "pro": 0.7,
            "f1_max": 0.6,
            "f1_max_threshold_on_test": 1.5,
            "num_images": 60,
        },
        "grass": {
            "image_auroc": 0.7,
            "pixel_auroc": None,
            "pro": None,
            "f1_max": 0.4,
            "threshold": 2.5,  # the key of metrics.json files written before the rename: still read
            "num_images": 40,
        },
    }
    rows, mean = metrics.per_category_table(results)
    assert [r["category"] for r in rows] == ["brick", "grass"]
    assert mean["image_auroc"] == pytest.approx(0.8) and mean["pixel_auroc"] == pytest.approx(0.8)
    assert mean["num_images"] == 100
    assert [r["f1_max_threshold_on_test"] for r in rows] == [1.5, 2.5] and mean["f1_max_threshold_on_test"] == 2.0
    table = metrics.format_table(rows, mean)
    assert "| brick | 90.0 | 80.0 | 70.0 | 60.0 | 1.5 | 60 |" in table
    assert "| grass | 70.0 | - | - |" in table and "| mean | 80.0 |" in table
    with_status = metrics.format_table(rows, {**mean, "status": "2 ok"}, extra=("status",))
    assert with_status.splitlines()[0].endswith("| images | status |") and with_status.endswith("| 100 | 2 ok |")
