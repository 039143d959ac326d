"""Parity of an exported artifact with the PyTorch reference, on real images, at batch 1 and at a full batch.

Differences are reported absolute and relative to the range (max - min) of the reference's anomaly maps on the same
images; the image score is an average-pooled maximum of the map, in the same units, so it is measured on that scale too.
Decisions are compared at the artifact's calibrated threshold: a flip counts against the export only when the
reference score lies further from the threshold than the tolerance (a flip right at the threshold is numerical noise).

Low-precision artifacts (FP16 on some paths, INT8) are bounded by map correlation PER IMAGE: pooled over all images,
the correlation is dominated by the differences between images (one image's map sits higher than another's) and stays
high even when one image's map is scrambled. An image whose reference map is nearly flat (range below FLAT_FRACTION of
the largest range of any one image's map) has no pattern to correlate and is bounded through its score, its decision
and the pooled correlation instead. INT8 holds the maps of images the reference does not flag to a lower bound
(`min_unflagged_correlation`): with the lite presets' border standardization a good image's map is texture noise, and
its correlation with an INT8 map measures that noise against INT8's (docs/lowprec.md), while a flagged image's map is
the defect an operator sees and must keep its shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import PRECISIONS

FLAT_FRACTION = 0.05  # a map whose own range is below 5% of the most structured map's range counts as flat
FULL_BATCH = 8  # every artifact is run at batch 1 and at this batch (or --batch-max when smaller)


class VerificationError(UserError, RuntimeError):
    """An exported artifact does not match the PyTorch reference within the tolerance of its precision."""


def batch_plan(n: int, batch_size: int) -> list[np.ndarray]:
    """Index arrays: one batch of 1, then full batches over the images (cycled so that at least one batch is full)."""
    batch_size = max(1, int(batch_size))
    total = max(batch_size, -(-n // batch_size) * batch_size)
    cycled = np.arange(total) % n
    return [np.array([0]), *np.split(cycled, total // batch_size)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two equally shaped arrays over all elements; None when either is constant."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else None


def criteria_of(precision: str) -> dict[str, float | None]:
    """The verification bounds of a precision, from its PRECISIONS row."""
    row = PRECISIONS[precision]
    return {k: row.get(k) for k in ("tolerance", "min_map_correlation", "min_unflagged_correlation", "max_score_rel")}


def compare(
    ref_maps: np.ndarray,
    ref_scores: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float,
    tolerance: float | None = None,
    min_map_correlation: float | None = None,
    min_unflagged_correlation: float | None = None,
    max_score_rel: float | None = None,
) -> dict[str, Any]:
    """Numbers of one comparison and whether it passes (pure numpy).

    Bounds (None: reported, not enforced): `tolerance` on the largest |difference| of maps and scores relative to the
    reference map range; `min_map_correlation` on the Pearson correlation of each patterned map and of the maps over all
    pixels, `min_unflagged_correlation` (None: the same) instead for the maps of images the reference does not flag
    (score <= threshold: no defect to show, the map is texture noise); `max_score_rel`
    on the largest |score difference| / |reference score|. A decision flip counts only when the reference score lies
    outside the noise band those bounds allow around the threshold.
    """
    result: dict[str, Any] = {
        "tolerance": tolerance,
        "min_map_correlation": min_map_correlation,
        "min_unflagged_correlation": min_unflagged_correlation,
        "max_score_rel": max_score_rel,
        "threshold": float(threshold),
    }
    if maps.shape != ref_maps.shape or scores.shape != ref_scores.shape:
        return {
            **result,
            "passed": False,
            "reason": f"output shapes {maps.shape}, {scores.shape} differ from the reference's "
            f"{ref_maps.shape}, {ref_scores.shape}",
        }
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        return {**result, "passed": False, "reason": "the artifact produced NaN or infinite values"}
    ref_maps, maps = ref_maps.astype(np.float64), maps.astype(np.float64)
    ref_scores, scores = ref_scores.astype(np.float64), scores.astype(np.float64)
    scale = float(ref_maps.max() - ref_maps.min())
    scale = scale if scale > 0 else max(float(np.abs(ref_maps).max()), 1e-12)
    d_map, d_score = np.abs(maps - ref_maps), np.abs(scores - ref_scores)
    for key, d in (("map", d_map), ("score", d_score)):
        result[key] = {
            "max_abs": float(d.max()),
            "mean_abs": float(d.mean()),
            "max_rel": float(d.max() / scale),
            "mean_rel": float(d.mean() / scale),
        }
    score_rel = d_score / np.maximum(np.abs(ref_scores), 1e-12)
    result["score"].update(max_rel_to_score=float(score_rel.max()), mean_rel_to_score=float(score_rel.mean()))
    ranges = np.ptp(ref_maps.reshape(len(ref_maps), -1), axis=1) if len(ref_maps) else np.zeros(0)
    patterned = [i for i, r in enumerate(ranges) if r > 0 and r >= FLAT_FRACTION * float(ranges.max())]
    per_image = {i: _pearson(ref_maps[i], maps[i]) for i in patterned}
    scored = {i: c for i, c in per_image.items() if c is not None}
    flagged = ref_scores > threshold

    def bound_of(i: int) -> float | None:
        """The correlation an image's map must reach: lower for images the reference does not flag, when set."""
        return (
            min_unflagged_correlation
            if min_unflagged_correlation is not None and not flagged[i]
            else min_map_correlation
        )

    # the worst image is the one furthest below its own bound (or closest above it)
    worst_image = min(scored, key=lambda i: scored[i] - (bound_of(i) or 0.0)) if scored else None
    result["map"].update(
        correlation=_pearson(ref_maps, maps),
        min_image_correlation=None if worst_image is None else scored[worst_image],
        worst_image=worst_image,
        # one entry per image, None for flat maps (and constant ones)
        per_image_correlation=[None if per_image.get(i) is None else round(per_image[i], 6) for i in range(len(maps))],
        flat_images=len(ref_maps) - len(patterned),
    )
    result["reference_map_range"] = scale
    band = max(
        tolerance * scale if tolerance is not None else 0.0,
        max_score_rel * abs(float(threshold)) if max_score_rel is not None else 0.0,
    )
    ref_dec, dec = ref_scores > threshold, scores > threshold
    flips = np.flatnonzero(ref_dec != dec)
    unexplained = [int(i) for i in flips if abs(ref_scores[i] - threshold) > band]
    result.update(
        decisions=int(dec.size),
        decision_agreement=float(np.mean(ref_dec == dec)),
        decision_flips=int(flips.size),
        unexplained_flips=len(unexplained),
        reference_anomalies=int(ref_dec.sum()),
        decision_noise_band=band,
    )
    worst = max(result["map"]["max_rel"], result["score"]["max_rel"])
    corr, pooled = result["map"]["min_image_correlation"], result["map"]["correlation"]
    # correlation checks in order, the first failing one is reported: the worst patterned map against its own bound,
    # then the pool (with every map flat, the pool is all there is)
    corr_checks = []
    if min_map_correlation is not None:
        if patterned:
            bound = min_map_correlation if worst_image is None else bound_of(worst_image)
            which = "" if bound == min_map_correlation else ", an image the reference does not flag"
            where = f"on image {worst_image}{which} (Pearson per image, the worst of {len(patterned)})"
            corr_checks.append((corr, bound, where, "a constant map"))
        corr_checks.append((pooled, min_map_correlation, "over all images' pixels", "constant maps"))
    corr_failure = next(
        (
            f"the anomaly maps correlate with the PyTorch reference at "
            f"{'undefined (' + undefined + ')' if value is None else f'{value:.4f}'} {where}, below the bound {bound}"
            for value, bound, where, undefined in corr_checks
            if value is None or value < bound
        ),
        None,
    )
    if tolerance is not None and worst > tolerance:
        which = "anomaly maps" if result["map"]["max_rel"] >= result["score"]["max_rel"] else "scores"
        result.update(
            passed=False,
            reason=f"the {which} differ from the PyTorch reference by up to {worst:.2e} of the reference map's "
            f"range (tolerance {tolerance:.0e})",
        )
    elif corr_failure is not None:
        result.update(passed=False, reason=corr_failure)
    elif max_score_rel is not None and result["score"]["max_rel_to_score"] > max_score_rel:
        result.update(
            passed=False,
            reason=f"the scores differ from the PyTorch reference by up to "
            f"{100 * result['score']['max_rel_to_score']:.1f}% (bound {100 * max_score_rel:.0f}%)",
        )
    elif unexplained:
        result.update(
            passed=False,
            reason=f"{len(unexplained)} anomaly decisions differ from the reference away from the threshold",
        )
    else:
        result.update(passed=True, reason="within tolerance")
    return result


def verify_artifact(
    reference_model,
    artifact_path: str | Path,
    images: np.ndarray,
    precision: str,
    *,
    device: str = "cpu",
    batch_size: int = FULL_BATCH,
    source: str = "",
    reference_cache: dict | None = None,
) -> dict[str, Any]:
    """Run the artifact and the reference (torch, CPU) on the same batches and compare maps, scores and decisions.

    `reference_cache`: a dict shared between calls on the same model and images (export --format all), so the
    reference runs once.
    """
    import torch

    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise UserError("verification needs a non-empty uint8 (N, H, W, 3) batch of real images")
    from adtr_deploy.runtime.backends import open_model

    runner = open_model(artifact_path, device)  # the deployment runtime itself, not a copy of it
    cal = runner.spec.calibration
    reference_model = reference_model.eval()
    outs, refs = [], []
    plan = batch_plan(len(images), batch_size)
    cache = reference_cache if reference_cache is not None else {}
    for i, idx in enumerate(plan):
        batch = np.ascontiguousarray(images[idx])
        outs.append(runner.run(batch))
        key = (id(reference_model), id(images), batch_size, i)
        if key not in cache:
            with torch.no_grad():
                ref_map, ref_score = reference_model(torch.from_numpy(batch))
            cache[key] = (ref_map.numpy(), ref_score.numpy())
        refs.append(cache[key])
    result = compare(
        np.concatenate([r[0] for r in refs]),
        np.concatenate([r[1] for r in refs]),
        np.concatenate([np.asarray(o[0]) for o in outs]),
        np.concatenate([np.asarray(o[1]) for o in outs]),
        threshold=cal.threshold,
        **criteria_of(precision),
    )
    return {
        "artifact": str(artifact_path),
        "format": runner.spec.format,
        "precision": precision,
        "device": device,
        "images": int(len(images)),
        "image_source": source,
        "batch_sizes": sorted({len(i) for i in plan}),
        "threshold_source": "uncalibrated (default threshold)" if cal.method == "uncalibrated" else cal.method,
        "runtime": runner.describe(),  # what ran it (OpenVINO: the inference precision the plugin really used)
        **result,
    }
