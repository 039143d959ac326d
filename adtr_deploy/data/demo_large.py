"""The large-image demo set (`adtr data demo --large`): 1024-pixel images of the demo's real texture photographs with
small defects (scratches, pinholes, small stains, 3-24 px across) and exact masks, in the MVTec-AD layout.

What tiling at native resolution is for (issue 28): resized to a 224-pixel input, a 6-pixel scratch on a 1024-pixel image
becomes about one pixel. Each image shows the whole 512-pixel height of the category's scikit-image photograph at 2x
(`size` / 512): a 192-column strip of the split's columns (train: [0, 320), test: [320, 512), as in the small demo, so
no test pixel was seen in training) mirror-tiled across to a square, at a random phase, randomly flipped and
transposed, with the small demo's colour map and brightness jitter. Train and test images are made alike, seams
included. A defective test image has one defect; the mask rule is the small demo's (alpha >= 0.5, or a channel changed
by at least MASK_MIN_CHANGE grey levels), and each defect's size (the longer side of its mask's bounding box, in
pixels) is listed in `<category>/defect_sizes.json`, so results can be split by size band (< 8, 8-16, > 16 px).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.data.demo_synth import (
    DEMO_CATEGORIES,
    MASK_MIN_CHANGE,
    PALETTES,
    SOURCE_SIZE,
    TRAIN_COLUMNS,
    _blend,
    _blob,
    _rng,
    _tint,
    source_photo,
)
from adtr_deploy.errors import UserError

LARGE_SIZE = 1024
STRIP = 192  # source columns per strip: the test columns' width, used for both splits so their seams look alike
NUM_TRAIN = 32
NUM_TEST_GOOD = 16
NUM_PER_DEFECT = 12
MARKER_NAME = ".adtr_demo_large.json"
SIZES_NAME = "defect_sizes.json"
SIZE_BANDS = ((0, 8, "< 8 px"), (8, 16, "8-16 px"), (16, 10**9, "> 16 px"))  # a defect of s px is in [lo, hi)


def size_band(size_px: float) -> str:
    return next(name for lo, hi, name in SIZE_BANDS if lo <= size_px < hi)


def _good(category: str, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free float32 RGB image (size, size) of the split's columns (see the module docstring)."""
    src = source_photo(category).astype(np.float32)
    lo, hi = (0, TRAIN_COLUMNS) if split == "train" else (TRAIN_COLUMNS, SOURCE_SIZE)
    x = int(rng.integers(lo, hi - STRIP + 1))
    strip = src[:, x : x + STRIP]
    if rng.random() < 0.5:
        strip = strip[::-1]
    period = np.concatenate([strip, strip[:, ::-1]], axis=1)  # mirrored: no jump at the seams
    phase = int(rng.integers(0, 2 * STRIP))
    grey = np.tile(period, (1, SOURCE_SIZE // (2 * STRIP) + 2))[:, phase : phase + SOURCE_SIZE]
    if rng.random() < 0.5:
        grey = grey.T
    grey = cv2.resize(np.ascontiguousarray(grey), (size, size), interpolation=cv2.INTER_CUBIC)
    return _tint(grey * (1.0 + rng.uniform(-0.06, 0.06)), category)


def _place(size: int, rng: np.random.Generator, margin: int = 40) -> tuple[float, float]:
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _scratch(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight or slightly bent line, 4-24 px long and 1-2 px wide, bright or dark."""
    size, ss, win = img.shape[0], 4, 64  # drawn at 4x in a 64-pixel window, then area-averaged: anti-aliased
    length, width = rng.uniform(4.0, 24.0), rng.uniform(1.0, 2.0)
    angle = rng.uniform(0, np.pi)
    start = np.array([win / 2, win / 2]) - length / 2 * np.array([np.cos(angle), np.sin(angle)])
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = (start + end) / 2 + rng.normal(0, 0.08 * length, 2)
    t = np.linspace(0, 1, 32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    canvas = np.zeros((win * ss, win * ss), np.uint8)
    pts = np.round(curve * ss).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], isClosed=False, color=255, thickness=max(1, round(width * ss)), lineType=cv2.LINE_8)
    local = cv2.resize(canvas.astype(np.float32) / 255.0, (win, win), interpolation=cv2.INTER_AREA)
    cy, cx = (int(v) for v in _place(size, rng))
    alpha = np.zeros((size, size), np.float32)
    alpha[cy - win // 2 : cy + win // 2, cx - win // 2 : cx + win // 2] = local
    dark, _, light = (np.asarray(c, dtype=np.float32) for c in PALETTES[category])
    colour = light * 1.08 if rng.random() < 0.6 else dark * 0.8
    strength = rng.uniform(0.6, 0.9)
    return _blend(img, img * (1 - strength) + colour * strength, alpha), alpha


def _pinhole(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small dark pit, 3-8 px across."""
    size = img.shape[0]
    radius = rng.uniform(1.5, 4.0)
    alpha = _blob(size, _place(size, rng), radius, rng, edge=0.8)
    dark = np.asarray(PALETTES[category][0], dtype=np.float32)
    return _blend(img, dark * 0.6 + img * rng.uniform(0.15, 0.35), alpha), alpha


def _stain(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small discoloured spot, 5-24 px across: darker or lighter, shifted in hue."""
    size = img.shape[0]
    radius = rng.uniform(2.5, 12.0)
    alpha = _blob(size, _place(size, rng), radius, rng, edge=rng.uniform(1.0, 2.5))
    tints = (np.array([1.0, 0.85, 0.65]), np.array([0.8, 0.9, 1.0]), np.array([1.0, 1.0, 0.8]))
    tint = tints[int(rng.integers(len(tints)))].astype(np.float32)
    gain = rng.uniform(0.55, 0.72) if rng.random() < 0.65 else rng.uniform(1.28, 1.45)
    return _blend(img, img * gain * tint, alpha), alpha


DEFECTS: dict[str, Callable[[np.ndarray, str, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "pinhole": _pinhole,
    "stain": _stain,
}


def make_large_sample(
    category: str, split: str, index: int, *, seed: int = 0, size: int = LARGE_SIZE, columns: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image: (uint8 RGB, mask bool or None for good ones). `split`: train, good or a defect of DEFECTS.
    `columns` ("train"/"test"): the photograph's columns the image is cut from; by default the split's own (a
    validation split draws defects on the training columns, benchmarks/tiling_score_window.py)."""
    rng = _rng(seed, category, f"large-{split}", index)
    clean = _good(category, columns or ("train" if split == "train" else "test"), size, rng)
    clean_u8 = np.clip(np.round(clean), 0, 255).astype(np.uint8)
    if split in ("train", "good"):
        return clean_u8, None
    out, alpha = DEFECTS[split](clean_u8.astype(np.float32), category, rng)
    image = np.clip(np.round(out), 0, 255).astype(np.uint8)
    change = np.abs(image.astype(np.int16) - clean_u8.astype(np.int16)).max(axis=2)
    return image, (alpha >= 0.5) | (change >= MASK_MIN_CHANGE)


def mask_size(mask: np.ndarray) -> int:
    """A defect's size: the longer side of its mask's bounding box, in pixels (0 for an empty mask)."""
    ys, xs = np.nonzero(mask)
    return 0 if ys.size == 0 else int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
    if not ok:
        raise UserError(f"could not encode {path} as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def write_large_dataset(
    root: str | Path,
    categories: Sequence[str] = DEMO_CATEGORIES[:1],
    *,
    seed: int = 0,
    size: int = LARGE_SIZE,
    counts: tuple[int, int, int] = (NUM_TRAIN, NUM_TEST_GOOD, NUM_PER_DEFECT),
) -> Path:
    """Write the large-image set under `root` (MVTec-AD layout; a category written with the same settings is kept)."""
    root = Path(root)
    unknown = [c for c in categories if c not in PALETTES]
    if unknown or not categories:
        raise UserError(f"unknown demo categories {unknown or '(none)'}; choose from {', '.join(PALETTES)}")
    if not 256 <= int(size) <= 4096:
        raise UserError(f"--image-size {size} is out of range for --large; use 256 to 4096 pixels")
    splits = {"train": counts[0], "good": counts[1], **{d: counts[2] for d in DEFECTS}}
    marker = {"format_version": 1, "seed": int(seed), "size": int(size), "counts": splits}
    for category in categories:
        final = root / category
        try:
            if json.loads((final / MARKER_NAME).read_text()) == marker:
                continue
        except (OSError, ValueError):
            pass
        if final.exists() and not (final / MARKER_NAME).exists() and any(final.iterdir()):
            raise UserError(f"{final} exists and is not a demo data set folder; choose another --out or remove it")
        tmp = root / f".tmp-large-{category}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            sizes = {}
            for split, n in splits.items():
                folder = "train/good" if split == "train" else f"test/{split}"
                for i in range(n):
                    image, mask = make_large_sample(category, split, i, seed=seed, size=size)
                    _write_png(tmp / folder / f"{i:03d}.png", image)
                    if mask is not None:
                        _write_png(tmp / "ground_truth" / split / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
                        sizes[f"{folder}/{i:03d}.png"] = mask_size(mask)
            (tmp / SIZES_NAME).write_text(json.dumps(sizes, indent=1, sort_keys=True, allow_nan=False) + "\n")
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1, allow_nan=False) + "\n")  # last: complete
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
