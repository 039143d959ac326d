"""Low-precision verification bounds each image, not the pool (issue 14, item 10). Pure numpy: compare() itself."""

from __future__ import annotations

import numpy as np

from adtr_deploy.export.formats import PRECISIONS
from adtr_deploy.export.verify import compare

BOUNDS = {k: PRECISIONS["int8"][k] for k in ("tolerance", "min_map_correlation", "max_score_rel")}


def _maps(n: int = 8, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Structured maps (a blob at a different place per image) at different levels: image-to-image differences that
    dominate a pooled correlation, as real score levels do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = []
    for i in range(n):
        cy, cx = rng.integers(4, size - 4, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)
        maps.append(2.0 * i + blob)  # level i, pattern blob
    maps = np.stack(maps)[:, None].astype(np.float32)
    return maps, maps.reshape(n, -1).max(axis=1)


def test_one_scrambled_map_fails_although_the_pooled_correlation_is_high():
    ref_map, ref_score = _maps()
    bad = ref_map.copy()
    rng = np.random.default_rng(1)
    bad[3, 0] = rng.permutation(bad[3, 0].ravel()).reshape(bad[3, 0].shape)  # same values, pattern destroyed
    thr = float(np.median(ref_score))
    result = compare(ref_map, ref_score, bad, ref_score, threshold=thr, **BOUNDS)
    assert result["map"]["correlation"] > 0.99  # the old pooled criterion would have passed this
    assert not result["passed"] and "on image 3" in result["reason"] and result["map"]["worst_image"] == 3
    assert result["map"]["per_image_correlation"][3] < 0.5


def test_faithful_maps_pass_and_flat_maps_are_judged_by_score_and_decision():
    ref_map, ref_score = _maps()
    ref_map[5, 0] = ref_map[5, 0].mean()  # a good image: a flat map with no pattern to correlate
    rng = np.random.default_rng(2)
    noisy = ref_map + rng.normal(0, 0.01, ref_map.shape).astype(np.float32)
    thr = float(np.median(ref_score))
    ok = compare(ref_map, ref_score, noisy, ref_score * 1.01, threshold=thr, **BOUNDS)
    assert ok["passed"], ok["reason"]
    assert ok["map"]["flat_images"] == 1 and ok["map"]["per_image_correlation"][5] is None
    # flat means: a range under FLAT_FRACTION (5%) of the most structured map's range, whatever the maps' levels
    faint = ref_map.copy()
    faint[2, 0] = faint[2, 0].mean() + 0.03 * (faint[2, 0] - faint[2, 0].mean())  # 3% of the others' range: flat
    faint[4, 0] = faint[4, 0].mean() + 0.2 * (faint[4, 0] - faint[4, 0].mean())  # 20%: a pattern to keep
    scrambled = faint.copy()
    for i in (2, 4):
        scrambled[i, 0] = rng.permutation(faint[i, 0].ravel()).reshape(faint[i, 0].shape)
    res = compare(faint, ref_score, scrambled, ref_score, threshold=thr, **BOUNDS)
    assert res["map"]["per_image_correlation"][2] is None and res["map"]["flat_images"] == 2
    assert not res["passed"] and "on image 4" in res["reason"]
    # a decision flip far from the threshold fails even when every map correlates
    flipped = ref_score.copy()
    far = int(np.argmax(ref_score))
    flipped[far] = thr - 10.0
    res = compare(ref_map, ref_score, noisy, flipped, threshold=thr, min_map_correlation=0.99)
    assert not res["passed"] and "decisions differ" in res["reason"]


def test_int8_holds_flagged_maps_to_0_99_and_the_others_to_0_95():
    """A flagged image's map is the defect the operator sees; an unflagged one's is texture noise (the lite presets'
    border-standardized maps), held to min_unflagged_correlation. Scrambling fails either."""
    ref_map, ref_score = _maps()
    bounds = {**BOUNDS, "min_unflagged_correlation": PRECISIONS["int8"]["min_unflagged_correlation"]}
    thr = float(np.median(ref_score))  # images 4..7 flagged
    rng = np.random.default_rng(3)

    def noisy(i: int, corr: float) -> np.ndarray:
        out = ref_map.copy()
        m = ref_map[i, 0]
        noise = rng.normal(0, 1, m.shape)
        sigma = m.std() * np.sqrt(1 / corr**2 - 1)  # Pearson of m and m + sigma * noise is about corr
        out[i, 0] = m + sigma * (noise - noise.mean()) / noise.std()
        return out

    unflagged_97 = compare(ref_map, ref_score, noisy(1, 0.97), ref_score, threshold=thr, **bounds)
    assert unflagged_97["passed"], unflagged_97["reason"]
    flagged_97 = compare(ref_map, ref_score, noisy(6, 0.97), ref_score, threshold=thr, **bounds)
    assert not flagged_97["passed"] and "on image 6 (" in flagged_97["reason"] and "bound 0.99" in flagged_97["reason"]
    unflagged_90 = compare(ref_map, ref_score, noisy(1, 0.90), ref_score, threshold=thr, **bounds)
    assert not unflagged_90["passed"] and "does not flag" in unflagged_90["reason"] and "0.95" in unflagged_90["reason"]
    strict = compare(ref_map, ref_score, noisy(1, 0.97), ref_score, threshold=thr, **BOUNDS)  # one bound for all
    assert not strict["passed"]
