"""The demo images themselves: real texture photographs with synthesized defects and exact masks (numpy + OpenCV).

Source photographs are the 512x512 grey texture images that scikit-image ships (`brick`, `grass`, `gravel`), tinted with a
per-category colour map so that the images are colour PNGs like MVTec-AD's textures. Each photo is split by columns: train
crops come from columns [0, 320), test crops from columns [320, 512), so no test pixel was ever seen in training. Crops get a
random flip / 90-degree rotation and a slight brightness jitter.

Every defect is a blend `defective = clean * (1 - alpha) + altered * alpha`, where `altered` is the fully defective look and
`alpha` in [0, 1] is how much of it a pixel receives. A pixel is in the mask iff alpha >= 0.5 or the defect changed one of
its channels by at least MASK_MIN_CHANGE grey levels; so every pixel outside the mask differs from the clean crop by less than
that, and pixels outside the defect's support are byte-identical to it.

`make_sample(category, split, index, seed=, image_size=)` draws one image from its own random stream; demo.py writes the
data set from it.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import cv2
import numpy as np

from adtr_deploy.errors import UserError

DEMO_CATEGORIES = ("brick", "grass", "gravel")
# A second set made the same way from other real photographs scikit-image ships, kept apart from the demo so that model
# choices are checked on textures they were not tuned on (benchmarks/quality_levers.py --set eval): the lunar surface
# (craters), the Hubble deep field (scattered stars and galaxies on black), an immunohistochemistry slide (tissue).
EVAL_CATEGORIES = ("moon", "stars", "tissue")
ALL_CATEGORIES = DEMO_CATEGORIES + EVAL_CATEGORIES
SOURCES = {  # category -> scikit-image data function
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "stars": "hubble_deep_field",
    "tissue": "immunohistochemistry",
}
DEFECT_TYPES = ("patch", "scratch", "stain", "hole")

# A pixel is in the mask iff it is at least half defect (alpha >= 0.5) or the defect changed one of its channels by at
# least this many grey levels: solid masks without holes, and every clearly visible change is marked.
MASK_MIN_CHANGE = 16

SOURCE_SIZE = 512
SOURCE_CROP = 192  # source pixels per crop side; resized to image_size
TRAIN_COLUMNS = (
    320  # columns [0, 320) -> train crops, [320, 512) -> test crops (and other categories' "patch" textures)
)

# Grey level -> RGB through three colour stops (dark, mid, light): makes colour images from the grey photographs.
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "brick": ((52, 24, 20), (150, 72, 52), (222, 196, 170)),
    "grass": ((18, 34, 12), (82, 118, 44), (196, 206, 132)),
    "gravel": ((40, 36, 32), (128, 118, 104), (226, 218, 200)),
    "moon": ((30, 30, 34), (120, 118, 112), (236, 232, 220)),
    "stars": ((4, 6, 14), (120, 110, 150), (255, 244, 220)),
    "tissue": ((70, 40, 20), (170, 120, 90), (240, 236, 246)),
}


@functools.cache
def source_photo(name: str) -> np.ndarray:
    """The grey 512x512 scikit-image photograph for a category (the centre of a larger or colour one, in grey)."""
    try:
        from skimage import data
    except ImportError:
        raise UserError(
            "the demo data set needs scikit-image; install it with `pip install adtr-deploy[train]`"
        ) from None
    img = getattr(data, SOURCES[name])()
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)
    y, x = (img.shape[0] - SOURCE_SIZE) // 2, (img.shape[1] - SOURCE_SIZE) // 2
    if min(y, x) < 0:
        raise UserError(f"scikit-image's {name} photo has shape {img.shape}, expected at least 512x512; reinstall it")
    return np.ascontiguousarray(img[y : y + SOURCE_SIZE, x : x + SOURCE_SIZE])


def family(category: str) -> tuple[str, ...]:
    """The set a category belongs to: its "patch" defects come from the other photos of the same set."""
    return DEMO_CATEGORIES if category in DEMO_CATEGORIES else EVAL_CATEGORIES


@functools.cache
def _palette_lut(category: str) -> np.ndarray:
    """(256, 1, 3) uint8 table: grey level -> RGB, linear between the category's dark, mid and light stops."""
    stops = np.asarray(PALETTES[category], dtype=np.float64)  # (3 stops, 3 channels)
    levels = np.arange(256, dtype=np.float64)
    table = [np.interp(levels, [0.0, 127.5, 255.0], stops[:, c]) for c in range(3)]
    return np.round(np.stack(table, axis=-1)).astype(np.uint8).reshape(256, 1, 3)


def _tint(grey: np.ndarray, category: str) -> np.ndarray:
    """Grey float image (H, W) in [0, 255] -> float32 RGB (H, W, 3) through the category's colour stops."""
    grey_u8 = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return cv2.LUT(cv2.merge([grey_u8] * 3), _palette_lut(category)).astype(np.float32)


def _crop(src: np.ndarray, columns: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random SOURCE_CROP square from the column range, randomly flipped/rotated, resized to size: float32 (size, size)."""
    x = int(rng.integers(columns[0], columns[1] - SOURCE_CROP + 1))
    y = int(rng.integers(0, SOURCE_SIZE - SOURCE_CROP + 1))
    patch = src[y : y + SOURCE_CROP, x : x + SOURCE_CROP]
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=cv2.INTER_CUBIC)
    return patch.astype(np.float32)


def _good_image(category: str, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free colour crop (float32 RGB) of the category from the split's columns, with brightness jitter."""
    columns = (0, TRAIN_COLUMNS) if split == "train" else (TRAIN_COLUMNS, SOURCE_SIZE)
    grey = _crop(source_photo(category), columns, size, rng)
    gain = 1.0 + rng.uniform(-0.06, 0.06)
    return _tint(grey * gain, category)


# ----------------------------------------------------------------------------------------------------------------- shapes


def _blob(
    size: int, center: tuple[float, float], radius: float, rng: np.random.Generator, *, edge: float
) -> np.ndarray:
    """Soft irregular blob: an ellipse whose radius wobbles with angle. float32 (size, size) in [0, 1]; 0.5 on the outline."""
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.55, 1.0)
    harmonics = [(k, rng.uniform(0, 0.28 / k), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    # Only a window around the centre can be non-zero: the wobble is at most 1 + sum(0.28 / k) < 1.4 times the radius.
    reach = 1.4 * radius + edge + 2
    y0, y1 = max(int(center[0] - reach), 0), min(int(center[0] + reach) + 1, size)
    x0, x1 = max(int(center[1] - reach), 0), min(int(center[1] + reach) + 1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    wobble = np.ones_like(theta)
    for k, amplitude, phase in harmonics:  # low harmonics: lumpy outlines, not star shapes
        wobble += amplitude * np.cos(k * theta + phase)
    out = np.zeros((size, size), dtype=np.float32)
    out[y0:y1, x0:x1] = np.clip((radius * wobble - dist) / edge + 0.5, 0.0, 1.0)
    return out


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1]: a cells x cells random grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _center(size: int, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    margin = min(radius * 1.2 + 4, size / 2 - 1)
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _blend(img: np.ndarray, altered: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + altered * a


# ---------------------------------------------------------------------------------------------------------------- defects
# Each returns (defective float32 RGB, alpha float32 (H, W)); the mask is alpha >= 0.5.


def _patch(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of another texture photo, in this category's colours and brightness, pasted with a soft irregular outline."""
    size = img.shape[0]
    others = [c for c in family(category) if c != category]
    other = others[int(rng.integers(len(others)))]
    grey = _crop(source_photo(other), (TRAIN_COLUMNS, SOURCE_SIZE), size, rng)
    # Match the brightness statistics of this image so the patch differs in texture, not mainly in tone.
    lum = img.mean(axis=2)
    grey = (grey - grey.mean()) / max(float(grey.std()), 1e-6) * lum.std() * rng.uniform(0.8, 1.2) + lum.mean()
    altered = _tint(grey * rng.uniform(0.9, 1.1), category)
    radius = rng.uniform(0.07, 0.18) * size
    alpha = _blob(size, _center(size, radius, rng), radius, rng, edge=rng.uniform(2.0, 5.0))
    return _blend(img, altered, alpha), alpha


def _scratch(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One to three thin curved lines (quadratic Bezier curves), all bright or all dark."""
    size = img.shape[0]
    ss = 4  # draw at 4x and downsample: anti-aliased coverage without OpenCV's LINE_AA quirks
    canvas = np.zeros((size * ss, size * ss), dtype=np.uint8)
    thickness = max(1, round(rng.uniform(0.9, 2.4) * size / 256 * ss))
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(0.25, 0.6) * size
        start = rng.uniform(0.1 * size, 0.9 * size, 2)
        direction = rng.uniform(0, 2 * np.pi)
        end = np.clip(start + length * np.array([np.cos(direction), np.sin(direction)]), 2, size - 3)
        bend = (start + end) / 2 + rng.normal(0, 0.15 * length, 2)
        t = np.linspace(0, 1, 64)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # (64, 2) as (x, y)
        pts = np.round(curve * ss).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], isClosed=False, color=255, thickness=thickness, lineType=cv2.LINE_8)
    alpha = cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    dark, _, light = (np.asarray(c, dtype=np.float32) for c in PALETTES[category])
    colour = light * 1.08 if rng.random() < 0.6 else dark * 0.8
    strength = rng.uniform(0.65, 0.9)
    altered = img * (1 - strength) + colour * strength
    return _blend(img, altered, alpha), alpha


def _stain(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blotchy discoloured area: darker or lighter and shifted in hue, strength varying across it."""
    size = img.shape[0]
    radius = rng.uniform(0.07, 0.17) * size
    shape = _blob(size, _center(size, radius, rng), radius, rng, edge=rng.uniform(4.0, 8.0))
    # Blotches: a smooth noise field cut at a level, with a transition a few pixels wide, so that (as everywhere) the
    # pixels that are visibly changed are the ones with alpha >= 0.5.
    noise = _smooth_noise(size, int(rng.integers(5, 10)), rng)
    blotch = np.clip((noise - rng.uniform(0.2, 0.45)) * 12.0 + 0.5, 0.0, 1.0)
    alpha = np.minimum(shape, blotch)
    tints = (np.array([1.0, 0.85, 0.65]), np.array([0.8, 0.9, 1.0]), np.array([1.0, 1.0, 0.8]), np.ones(3))
    tint = tints[int(rng.integers(len(tints)))].astype(np.float32)
    gain = rng.uniform(0.55, 0.75) if rng.random() < 0.65 else rng.uniform(1.25, 1.45)
    strength = (0.75 + 0.25 * _smooth_noise(size, 7, rng))[..., None]  # uneven colour inside the stain
    altered = img * (1.0 + (gain * tint - 1.0) * strength)
    return _blend(img, altered, alpha), alpha


def _hole(img: np.ndarray, category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, shaded cavity with a lighter torn rim around it."""
    size = img.shape[0]
    radius = rng.uniform(0.03, 0.09) * size
    center = _center(size, radius * 1.4, rng)
    inner = _blob(size, center, radius, rng, edge=1.2)
    rim_width = rng.uniform(0.25, 0.45) * radius + 1.5
    outer = _blob(size, center, radius + rim_width, rng, edge=1.5)
    rim = np.clip(outer - inner, 0.0, 1.0)
    # Shade the cavity: darker on one side, as if lit from the opposite direction.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light_dir = rng.uniform(0, 2 * np.pi)
    side = ((xx - center[1]) * np.cos(light_dir) + (yy - center[0]) * np.sin(light_dir)) / max(radius, 1.0)
    shade = np.clip(0.22 + 0.12 * side, 0.08, 0.4)[..., None]
    dark = np.asarray(PALETTES[category][0], dtype=np.float32)
    cavity = dark * 0.6 + img * shade
    raised = img * rng.uniform(1.12, 1.3) + 8.0
    out = _blend(_blend(img, raised, rim), cavity, inner)
    return out, np.maximum(inner, rim)


DEFECTS: dict[str, Callable[[np.ndarray, str, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "patch": _patch,
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
}


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """One independent stream per image: an image does not change when other images or categories are added."""
    key = [int(seed), zlib.crc32(category.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def make_sample(
    category: str, split: str, index: int, *, seed: int = 0, image_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One demo image: (image uint8 RGB, its clean version uint8 RGB, mask bool or None for good images).

    `split` is "train", "good" (test good) or a defect type. The clean version is what the image looked like before the
    defect was added (identical to the image for good ones).
    """
    if category not in PALETTES:
        raise UserError(f"unknown demo category {category!r}; choose from {', '.join(ALL_CATEGORIES)}")
    if split not in ("train", "good", *DEFECTS):
        raise UserError(f"unknown demo split {split!r}; choose train, good or one of {', '.join(DEFECTS)}")
    rng = _rng(seed, category, split, index)
    clean = _good_image(category, "train" if split == "train" else "test", image_size, rng)
    clean_u8 = np.clip(np.round(clean), 0, 255).astype(np.uint8)
    if split in ("train", "good"):
        return clean_u8, clean_u8, None
    out, alpha = DEFECTS[split](clean_u8.astype(np.float32), category, rng)
    image = np.clip(np.round(out), 0, 255).astype(np.uint8)
    change = np.abs(image.astype(np.int16) - clean_u8.astype(np.int16)).max(axis=2)
    return image, clean_u8, (alpha >= 0.5) | (change >= MASK_MIN_CHANGE)
