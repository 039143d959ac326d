"""Photometric shifts a production line meets (issue 31): the lamp ages or dims, daylight leaks in, a camera is swapped
for one with another colour response, the lens gathers dust, the sensor gets noisier. Pure numpy (plus OpenCV's Gaussian
blur), uint8 RGB (..., H, W, 3) in and out, applied to the whole image the way the camera would see it.

`SHIFTS` names the set the drift benchmark (benchmarks/drift.py) and the tests use; `apply_shift(name, images)` applies
one. The goal of issue 31 covers the `GOAL_SHIFTS` (brightness within +-15 % and the mild colour casts); the others are
reported whatever they give.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def brightness(images: np.ndarray, factor: float) -> np.ndarray:
    """Every pixel times `factor` (a dimmer or brighter lamp), clipped at 0 and 255."""
    return _to_uint8(images.astype(np.float32) * factor)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Each image's deviations from its own mean grey level times `factor`."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(-3, -2, -1), keepdims=True)
    return _to_uint8((x - mean) * factor + mean)


def channel_gains(images: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """Each channel (R, G, B) times its gain: a colour cast of the light or a white-balance change of the camera."""
    return _to_uint8(images.astype(np.float32) * np.asarray(gains, dtype=np.float32))


def channel_offsets(images: np.ndarray, offsets: tuple[float, float, float]) -> np.ndarray:
    """Each channel (R, G, B) plus its offset in pixel levels: coloured stray light added to the scene."""
    return _to_uint8(images.astype(np.float32) + np.asarray(offsets, dtype=np.float32))


def gamma(images: np.ndarray, g: float) -> np.ndarray:
    """255 * (x / 255) ** g: a camera with another tone curve (not a linear change, so not undone exactly by any
    per-image affine normalization)."""
    return _to_uint8(255.0 * (images.astype(np.float32) / 255.0) ** g)


def defocus(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation `sigma` pixels (a slightly defocused or dusty lens)."""
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack([cv2.GaussianBlur(im, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT) for im in flat])
    return out.reshape(images.shape)


def noise(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian sensor noise of `std` pixel levels, seeded (the same images give the same noise)."""
    rng = np.random.default_rng(seed)
    return _to_uint8(images.astype(np.float32) + rng.normal(0.0, std, size=images.shape).astype(np.float32))


Shift = Callable[[np.ndarray], np.ndarray]

# name -> (what it is, function). "none" first: the reference every shifted row is compared with.
SHIFTS: dict[str, tuple[str, Shift]] = {
    "none": ("no shift", lambda x: x.copy()),
    "bright+8": ("brightness +8 %", lambda x: brightness(x, 1.08)),
    "bright+15": ("brightness +15 %", lambda x: brightness(x, 1.15)),
    "bright+20": ("brightness +20 %", lambda x: brightness(x, 1.20)),
    "bright-8": ("brightness -8 %", lambda x: brightness(x, 0.92)),
    "bright-15": ("brightness -15 %", lambda x: brightness(x, 0.85)),
    "bright-20": ("brightness -20 %", lambda x: brightness(x, 0.80)),
    "contrast-15": ("contrast -15 %", lambda x: contrast(x, 0.85)),
    "contrast+15": ("contrast +15 %", lambda x: contrast(x, 1.15)),
    "cast-issue": ("colour cast R -8 %, B +10 % (the issue's)", lambda x: channel_gains(x, (0.92, 1.0, 1.10))),
    "cast-warm": ("warm colour cast R +8 %, B -10 %", lambda x: channel_gains(x, (1.08, 1.0, 0.90))),
    "white-balance": ("white balance R +5 %, G -2 %, B -6 %", lambda x: channel_gains(x, (1.05, 0.98, 0.94))),
    "stray-light": ("coloured stray light R +10, B -10 levels", lambda x: channel_offsets(x, (10.0, 0.0, -10.0))),
    "gamma-0.9": ("tone curve gamma 0.9", lambda x: gamma(x, 0.9)),
    "defocus-1.2": ("slight defocus (Gaussian sigma 1.2 px)", lambda x: defocus(x, 1.2)),
    "noise-5": ("sensor noise (Gaussian, std 5 levels)", lambda x: noise(x, 5.0)),
}

# The shifts the goal covers: brightness within +-15 % and mild colour casts / white-balance changes.
GOAL_SHIFTS = ("bright+8", "bright+15", "bright-8", "bright-15", "cast-issue", "cast-warm", "white-balance")


def apply_shift(name: str, images: np.ndarray) -> np.ndarray:
    """Apply the named shift of SHIFTS to uint8 RGB images (..., H, W, 3)."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose one of: {', '.join(SHIFTS)}")
    return SHIFTS[name][1](images)


def stain(
    image: np.ndarray, centre: tuple[int, int], radius: int, colour: tuple[float, float, float], alpha: float = 0.6
):
    """A local stain: a soft-edged disc of `colour` blended into `image` (H, W, 3) with opacity `alpha` -> (stained image,
    bool mask of the disc). For tests: a local colour change that must stay detectable under global normalization."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    weight = alpha * np.clip(radius + 0.5 - d, 0.0, 1.0)[..., None]
    out = image.astype(np.float32) * (1 - weight) + np.asarray(colour, dtype=np.float32) * weight
    return _to_uint8(out), d <= radius
