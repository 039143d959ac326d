"""The one preprocessing implementation (numpy + OpenCV), shared by training, evaluation and the runtime.

Training, evaluation and deployment must see identical pixels, so every path that turns a file or a frame into model input
goes through `load_image` / `prepare` here. The graph itself does normalization (see ModelSpec.mean/std), so the output here is
uint8 RGB at the model's input size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.imageheader import pixel_limit_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")

# One resize rule everywhere (training, evaluation, export verification, runtime): shrinking uses INTER_AREA, which
# averages every source pixel under an output pixel (no aliasing or moire on camera frames); enlarging uses INTER_LINEAR,
# because OpenCV's INTER_AREA degenerates to nearest neighbour when enlarging (CIFAR's 32x32 at 224 came out as 7x7
# blocks). "Enlarging" means either side grows: there INTER_AREA would copy pixels along that side.
SHRINK_INTERPOLATION = cv2.INTER_AREA
ENLARGE_INTERPOLATION = cv2.INTER_LINEAR


class ImageDecodeError(UserError):
    """A file could not be read or decoded as an image."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_rgb_uint8(img: np.ndarray, *, bgr: bool = True) -> np.ndarray:
    """Convert any decoded image (grey, 16-bit, float, RGBA/BGRA) to contiguous uint8 RGB (H, W, 3).

    `bgr` says the colour order of a 3/4-channel input: True for OpenCV-decoded images and frames, False for RGB arrays.
    """
    if img is None or not isinstance(img, np.ndarray) or img.size == 0:
        raise ImageDecodeError("empty image")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img * (255.0 if float(img.max(initial=0)) <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3:
        raise ImageDecodeError(f"unsupported image shape {img.shape}")
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return np.ascontiguousarray(img[:, :, ::-1]) if bgr else np.ascontiguousarray(img)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    raise ImageDecodeError(f"unsupported number of channels {channels}")


def decode_image(data: bytes | np.ndarray, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to uint8 RGB. With `max_pixels`, an image whose header declares more
    pixels is refused before decoding (a decompression bomb would otherwise take gigabytes)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    if buf.size == 0:
        raise ImageDecodeError(f"{name} is empty (0 bytes); replace it with a valid image file")
    too_big = pixel_limit_error(buf[: 1 << 20].tobytes(), name, max_pixels)
    if too_big:
        raise ImageDecodeError(too_big)
    # libjpeg decodes a JPEG cut short (a file still being written) and fills the rest with grey, which would be scored
    # as a defect; a complete JPEG ends with the EOI marker (FF D9), possibly followed by a little padding.
    if buf[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in buf[-4096:].tobytes():
        raise ImageDecodeError(
            f"{name} is a truncated JPEG (no end-of-image marker: cut short, or still being written); replace it"
        )
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageDecodeError(f"{name} is not a readable image (corrupt or unsupported format); replace or remove it")
    return to_rgb_uint8(img, bgr=True)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) at its original size. Raises ImageDecodeError with a clear message."""
    path = Path(path)
    try:
        # A file larger than any encoding of max_pixels pixels can hold (8 bytes a pixel: 16-bit RGBA, uncompressed) is
        # refused before it is read into memory.
        if max_pixels and path.stat().st_size > 8 * max_pixels + (1 << 20):
            raise ImageDecodeError(
                f"{path} is {path.stat().st_size / 1e6:.0f} MB, more than an image within the limit of "
                f"{max_pixels / 1e6:g} MP can take; raise --max-pixels if the image is genuine"
            )
        data = np.fromfile(str(path), dtype=np.uint8)  # works with non-ASCII paths, unlike cv2.imread
    except FileNotFoundError:
        raise ImageDecodeError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path} is a folder, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path} cannot be read ({exc.strerror}); check the file and its permissions") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def interpolation_for(src_hw: Sequence[int], dst_hw: Sequence[int]) -> int:
    """The OpenCV interpolation of the project's resize rule: INTER_AREA when no side grows, else INTER_LINEAR."""
    shrinking = int(dst_hw[0]) <= int(src_hw[0]) and int(dst_hw[1]) <= int(src_hw[1])
    return SHRINK_INTERPOLATION if shrinking else ENLARGE_INTERPOLATION


def resize(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize uint8 RGB to (H, W) = size with the project's one rule (area when shrinking, linear when enlarging)."""
    h, w = int(size[0]), int(size[1])
    if img.shape[0] == h and img.shape[1] == w:
        return np.ascontiguousarray(img)
    return cv2.resize(img, (w, h), interpolation=interpolation_for(img.shape[:2], (h, w)))


def prepare(image: np.ndarray, size: Sequence[int], *, bgr: bool = False) -> np.ndarray:
    """Any decoded image or frame -> uint8 RGB (H, W, 3) at the model's input size."""
    return resize(to_rgb_uint8(image, bgr=bgr), size)


def load_image(path: str | Path, size: Sequence[int]) -> np.ndarray:
    """Read and prepare an image file: the path every training and runtime image takes."""
    return resize(read_image(path), size)


def load_mask(path: str | Path | None, size: Sequence[int]) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W) at `size` (nearest neighbour, so labels stay exact). None -> all False."""
    h, w = int(size[0]), int(size[1])
    if path is None:
        return np.zeros((h, w), dtype=bool)
    data = np.fromfile(str(path), dtype=np.uint8)
    m = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if m is None:
        raise ImageDecodeError(f"mask {path} is not a readable image; replace it with a PNG mask")
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return m > (127 if int(m.max(initial=0)) > 1 else 0)  # 0/255 masks, and 0/1 masks too


def saturated_fraction(img: np.ndarray, stride: int = 2, max_samples: int = 65536) -> float:
    """The share of an RGB uint8 image's channel values at 255 (clipped highlights), on every `stride`-th row and column
    (a larger stride on large frames, so that at most about `max_samples` pixels are read: ~0.1 ms a frame).

    Clipped texture is the one change of the light that the input standardization cannot undo (docs/robustness.md):
    the drift monitor shows it beside the scores so an operator sees when the exposure, not the parts, moved."""
    step = max(int(stride), int(np.sqrt(img.shape[0] * img.shape[1] / max_samples)))
    view = img[::step, ::step]
    return float(np.count_nonzero(view == 255)) / max(view.size, 1)


# Headroom of the training images (issue 31): the brightest values, their HEADROOM_QUANTILE per channel, set against
# 255. A light brighter than 255 / that value clips the texture there, which no standardization undoes; adtr-train warns
# below HEADROOM_WARN_GAIN (the goal covers brightness +15 %).
HEADROOM_QUANTILE = 0.999
HEADROOM_WARN_GAIN = 1.15
CHANNELS = ("red", "green", "blue")


def value_histogram(img: np.ndarray) -> np.ndarray:
    """Counts of each value 0..255 per channel of a uint8 RGB image (H, W, 3) -> (3, 256) int64: summed over images,
    the whole set's value distribution at the cost of 768 numbers."""
    flat = np.ascontiguousarray(img).reshape(-1, 3)
    return np.stack([np.bincount(flat[:, c], minlength=256)[:256] for c in range(3)]).astype(np.int64)


def headroom(hist: np.ndarray, quantile: float = HEADROOM_QUANTILE) -> dict:
    """(3, 256) value counts -> how much brighter the light can get before the brightest values clip: per channel the
    `quantile` value, the share already at 255, and `gain` (255 / the highest of those values, at most 255)."""
    hist = np.asarray(hist, dtype=np.float64)
    cum = np.cumsum(hist, axis=1) / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    top = [int(np.searchsorted(cum[c], quantile)) for c in range(3)]
    brightest = int(np.argmax(top))
    return {
        "quantile": quantile,
        "values": top,
        "at_255": [round(float(hist[c, 255] / max(hist[c].sum(), 1.0)), 6) for c in range(3)],
        "channel": CHANNELS[brightest],
        "gain": round(255.0 / max(top[brightest], 1), 4),
    }


def headroom_warning(room: dict, threshold: float = HEADROOM_WARN_GAIN) -> str | None:
    """One sentence when the training images leave less than `threshold` of brightening before they clip, else None."""
    if room["gain"] >= threshold:
        return None
    advice = f"lower the camera's exposure or gain so good parts stay below about {int(255 / threshold)}"
    if max(room["values"]) >= 255:
        return (
            f"{100 * max(room['at_255']):.2f} % of the training images' {room['channel']} values are already clipped at "
            "255: that texture is lost, and a brighter light clips more of it, a change the model cannot undo "
            f"(docs/robustness.md); {advice}"
        )
    return (
        f"the training images' brightest values reach {max(room['values'])} ({room['channel']}, "
        f"{100 * room['quantile']:.1f}th percentile): a light {100 * (room['gain'] - 1):.0f} % brighter clips them at "
        "255, and clipped texture is a change the model cannot undo (docs/robustness.md); if the line's light can rise, "
        f"{advice}"
    )


def stack_batch(images: Iterable[np.ndarray]) -> np.ndarray:
    """A list of prepared images -> contiguous uint8 batch (N, H, W, 3)."""
    return np.ascontiguousarray(np.stack(list(images), axis=0).astype(np.uint8, copy=False))
