"""Parity of an exported artifact with the PyTorch reference, on real images, at batch 1 and at a full batch.

Differences are reported absolute and relative to the range (max - min) of the reference's anomaly maps on the same
images; the image score is an average-pooled maximum of the map, in the same units, so it is measured on that scale too.
Decisions are compared at the artifact's calibrated threshold: a flip counts against the export only when the
reference score lies further from the threshold than the tolerance (a flip right at the threshold is numerical noise).
"""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.export.formats import PRECISIONS
from adtr_deploy.preprocess import ImageDecodeError, is_image_file, load_image, prepare, stack_batch

MAX_IMAGES = 16
FULL_BATCH = 8  # every artifact is run at batch 1 and at this batch (or --batch-max when smaller)


class VerificationError(RuntimeError):
    """An exported artifact does not match the PyTorch reference within the tolerance of its precision."""


def _evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def _load_files(paths: list[Path], size: tuple[int, int]) -> list[np.ndarray]:
    images = []
    for p in paths:
        try:
            images.append(load_image(p, size))
        except ImageDecodeError:
            continue  # a broken file says nothing about parity; the others still do
    return images


def _files_from(pattern: str) -> list[Path]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
    if p.is_file():
        return [p]
    return sorted(Path(f) for f in glob.glob(str(p), recursive=True) if is_image_file(f))


def _demo_images(size: tuple[int, int], n: int) -> tuple[list[np.ndarray], str]:
    """The built-in demo data set's test images when that module exists, else crops of scikit-image's photographs."""
    try:
        from adtr_deploy.data.demo import write_demo_dataset
    except ImportError:
        write_demo_dataset = None
    if write_demo_dataset is not None:
        with tempfile.TemporaryDirectory(prefix="adtr-verify-") as tmp:
            root = Path(write_demo_dataset(Path(tmp), categories=("brick",), seed=0, image_size=max(size)))
            files = sorted(f for f in root.rglob("test/**/*") if f.is_file() and is_image_file(f))
            images = _load_files(_evenly(files, n), size)
        if images:
            return images, "built-in demo data (brick test images)"
    from skimage import data

    sources = {"brick": data.brick(), "grass": data.grass(), "gravel": data.gravel(), "chelsea": data.chelsea()}
    images = []
    rs = np.random.default_rng(0)
    names = list(sources)
    for i in range(n):
        src = sources[names[i % len(names)]]
        h, w = src.shape[:2]
        c = min(h, w) // 2
        y, x = rs.integers(0, h - c), rs.integers(0, w - c)
        images.append(prepare(src[y : y + c, x : x + c], size, bgr=False))
    return images, "scikit-image texture crops (" + ", ".join(names) + ")"


def _test_split_files(checkpoint: dict | None) -> list[Path]:
    """Images of the test split of the data the checkpoint was trained on (MVTec layout), where it exists here."""
    data = ((checkpoint or {}).get("info") or {}).get("data") or {}
    if not data.get("root") or not data.get("category"):
        return []
    folder = Path(data["root"]) / str(data["category"]) / "test"
    return sorted(f for f in folder.rglob("*") if f.is_file() and is_image_file(f)) if folder.is_dir() else []


def collect_images(
    size: tuple[int, int],
    *,
    verify_images: str | None = None,
    checkpoint: dict | None = None,
    max_images: int = MAX_IMAGES,
    avoid: tuple[str | Path, ...] = (),
) -> tuple[np.ndarray, str]:
    """Real images for verification, as a uint8 (N, H, W, 3) batch and a description of where they came from.

    Order: the files given with --verify-images (a folder or a glob), else the checkpoint's calibration images
    (held-out good images recorded by training) when they exist on this machine, else the built-in demo data.
    `avoid`: files an INT8 export calibrated on; verification does not reuse them (an in-sample check flatters the
    quantization) and, when that leaves no calibration image, reads the checkpoint's test split (good and defective
    images: a parity check fits nothing to them) before the demo data.
    """
    if verify_images:
        files = _files_from(verify_images)
        images = _load_files(_evenly(files, max_images), size)
        if not images:
            raise ValueError(
                f"--verify-images {verify_images} matches no readable image; give a folder or a glob of images"
            )
        return stack_batch(images), f"{len(images)} images from {verify_images}"
    seen = {Path(p).resolve() for p in avoid}
    recorded = [Path(p) for p in ((checkpoint or {}).get("info") or {}).get("calibration_images") or []]
    present = [p for p in recorded if p.is_file() and p.resolve() not in seen]
    if present:
        images = _load_files(_evenly(present, max_images), size)
        if images:
            return stack_batch(images), f"{len(images)} of the checkpoint's calibration images"
    if seen:
        tests = [p for p in _test_split_files(checkpoint) if p.resolve() not in seen]
        images = _load_files(_evenly(tests, max_images), size)
        if images:
            return stack_batch(images), f"{len(images)} test images of the checkpoint's data (none used to calibrate)"
    images, source = _demo_images(size, max_images)
    return stack_batch(images), source


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
    return {k: row.get(k) for k in ("tolerance", "min_map_correlation", "max_score_rel")}


def compare(
    ref_maps: np.ndarray,
    ref_scores: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float,
    tolerance: float | None = None,
    min_map_correlation: float | None = None,
    max_score_rel: float | None = None,
) -> dict[str, Any]:
    """Numbers of one comparison and whether it passes (pure numpy).

    Bounds (None: reported, not enforced): `tolerance` on the largest |difference| of maps and scores relative to the
    reference map range; `min_map_correlation` on the Pearson correlation of the maps over all pixels; `max_score_rel`
    on the largest |score difference| / |reference score|. A decision flip counts only when the reference score lies
    outside the noise band those bounds allow around the threshold.
    """
    result: dict[str, Any] = {
        "tolerance": tolerance,
        "min_map_correlation": min_map_correlation,
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
    per_image = [_pearson(r, m) for r, m in zip(ref_maps, maps)]
    per_image = [c for c in per_image if c is not None]
    result["map"].update(
        correlation=_pearson(ref_maps, maps), min_image_correlation=min(per_image) if per_image else None
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
    corr = result["map"]["correlation"]
    if tolerance is not None and worst > tolerance:
        which = "anomaly maps" if result["map"]["max_rel"] >= result["score"]["max_rel"] else "scores"
        result.update(
            passed=False,
            reason=f"the {which} differ from the PyTorch reference by up to {worst:.2e} of the reference map's "
            f"range (tolerance {tolerance:.0e})",
        )
    elif min_map_correlation is not None and (corr is None or corr < min_map_correlation):
        shown = "undefined (a constant map)" if corr is None else f"{corr:.4f}"
        result.update(
            passed=False,
            reason=f"the anomaly maps correlate with the PyTorch reference at {shown} (Pearson over all pixels), "
            f"below the bound {min_map_correlation}",
        )
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
        raise ValueError("verification needs a non-empty uint8 (N, H, W, 3) batch of real images")
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
        **result,
    }
