"""Anomaly sources for ADTR+ fine-tuning (numpy + OpenCV only; the torch wrapper is plus_dataset.py).

Every source draws one anomalous example at the model's input size: (image uint8 RGB (H, W, 3), mask bool (H, W) or None).

* Synthetic, pasted on a normal training image, with an exact mask of the changed region:
  `ConfettiNoise` (FCDD's "confetti": small rotated rectangles of random colour plus per-pixel noise) and
  `CutPaste` (a patch cut from the same image, optionally scaled/rotated/colour-jittered, pasted elsewhere);
  `Compose` applies several in turn (union of masks).
* Real labelled anomalies the user provides: `MaskedAnomalyFolder` (MVTec ground-truth layout).
* Image-level anomalies without masks: `ImageFolder` (any folder of irrelevant images) and `ArrayImages`
  (an in-memory array, e.g. CIFAR-100 for the CIFAR-10 protocol).

`MixedAnomalySampler` mixes sources by weight and yields {"image", "mask", "label": 1, "source"} deterministically from
(seed, epoch, index). Anomaly files that lie inside, or are byte copies of files of, the evaluated test split are refused
(adtr_deploy/leak_guard.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.leak_guard import check_no_test_leak
from adtr_deploy.preprocess import is_image_file, load_image, load_mask, prepare

Size = tuple[int, int]  # (H, W)
Drawn = tuple[np.ndarray, np.ndarray | None]  # (image uint8 (H, W, 3), mask bool (H, W) or None)


@runtime_checkable
class AnomalySource(Protocol):
    """One kind of anomaly. `needs_normal`: draws on a normal image; `gives_masks`: its examples carry pixel masks."""

    name: str
    needs_normal: bool
    gives_masks: bool

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None) -> Drawn: ...

    def files(self) -> list[Path]:
        """The files on disk it takes anomalies from (for the leak guard); [] for synthetic sources."""
        ...


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(lo) if hi <= lo else float(rng.uniform(lo, hi))


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return math.exp(_uniform(rng, (math.log(lo_hi[0]), math.log(lo_hi[1]))))


@dataclass(frozen=True)
class ConfettiNoise:
    """FCDD-style confetti: `count` blobs, each a rectangle (sides a fraction `side` of the shorter image side, rotated by
    up to `max_rotation` degrees) filled with one random colour plus Gaussian per-pixel noise of std `noise_std`, pasted
    opaquely. The mask is exactly the union of the blobs (the only pixels that change)."""

    count: tuple[int, int] = (1, 6)
    side: tuple[float, float] = (0.03, 0.15)
    max_rotation: float = 90.0
    noise_std: float = 20.0
    name: str = "confetti"
    needs_normal: ClassVar[bool] = True
    gives_masks: ClassVar[bool] = True

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None) -> Drawn:
        img = _require_normal(normal, size, self.name)
        h, w = img.shape[:2]
        short = min(h, w)
        mask = np.zeros((h, w), dtype=np.uint8)
        out = img.copy()
        noise = rng.normal(0.0, self.noise_std, size=(h, w, 3)) if self.noise_std > 0 else np.zeros((h, w, 3))
        for _ in range(int(rng.integers(self.count[0], self.count[1] + 1))):
            bw = max(1.0, _uniform(rng, self.side) * short)
            bh = max(1.0, _uniform(rng, self.side) * short)
            centre = (float(rng.uniform(0, w)), float(rng.uniform(0, h)))
            angle = _uniform(rng, (-self.max_rotation, self.max_rotation))
            corners = cv2.boxPoints((centre, (bw, bh), angle))
            blob = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(blob, [np.round(corners).astype(np.int32)], 1)
            sel = blob.astype(bool)
            colour = rng.integers(0, 256, size=3).astype(np.float64)
            out[sel] = np.clip(colour + noise[sel], 0, 255).round().astype(np.uint8)
            mask |= blob
        return out, mask.astype(bool)

    def files(self) -> list[Path]:
        return []


@dataclass(frozen=True)
class CutPaste:
    """CutPaste-style patch: a rectangle of `area` (fraction of the image) and aspect ratio w/h in `aspect` (log-uniform)
    is cut from the image, colour-jittered (brightness/contrast/saturation factors within +-`jitter`, hue within
    +-`hue` degrees), scaled by `scale` and rotated by up to `max_rotation` degrees, and pasted at another place.
    The mask is exactly the pasted footprint. `CutPaste.scar()` gives the thin "scar" variant."""

    area: tuple[float, float] = (0.02, 0.15)
    aspect: tuple[float, float] = (0.3, 3.3)
    scale: tuple[float, float] = (0.8, 1.2)
    max_rotation: float = 45.0
    jitter: float = 0.1
    hue: float = 10.0
    name: str = "cutpaste"
    needs_normal: ClassVar[bool] = True
    gives_masks: ClassVar[bool] = True

    @classmethod
    def scar(cls) -> CutPaste:
        """Long thin patches (CutPaste-Scar): ~0.3-1 % of the image, 1:4 to 1:12 wide, any rotation."""
        return cls(
            area=(0.003, 0.01), aspect=(1 / 12, 1 / 4), scale=(1.0, 1.0), max_rotation=90.0, name="cutpaste-scar"
        )

    def files(self) -> list[Path]:
        return []

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None) -> Drawn:
        img = _require_normal(normal, size, self.name)
        h, w = img.shape[:2]
        area = _uniform(rng, self.area) * h * w
        aspect = _log_uniform(rng, self.aspect)
        ph = int(np.clip(round(math.sqrt(area / aspect)), 1, h // 2))
        pw = int(np.clip(round(math.sqrt(area * aspect)), 1, w // 2))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        patch = self._jitter(rng, img[sy : sy + ph, sx : sx + pw])
        patch, footprint = self._warp(rng, patch, (h, w))
        fh, fw = footprint.shape
        # Paste away from where it was cut (else a plain cut-paste would change nothing yet be labelled anomalous).
        for _ in range(10):
            dy, dx = int(rng.integers(0, h - fh + 1)), int(rng.integers(0, w - fw + 1))
            if abs(dy - sy) >= ph // 2 or abs(dx - sx) >= pw // 2:
                break
        out = img.copy()
        region = out[dy : dy + fh, dx : dx + fw]
        region[footprint] = patch[footprint]
        mask = np.zeros((h, w), dtype=bool)
        mask[dy : dy + fh, dx : dx + fw] = footprint
        return out, mask

    def _jitter(self, rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
        j = self.jitter
        x = patch.astype(np.float32)
        x = x * _uniform(rng, (1 - j, 1 + j))  # brightness
        x = (x - x.mean()) * _uniform(rng, (1 - j, 1 + j)) + x.mean()  # contrast
        grey = x.mean(axis=2, keepdims=True)
        x = (x - grey) * _uniform(rng, (1 - j, 1 + j)) + grey  # saturation
        x = np.clip(x, 0, 255).round().astype(np.uint8)
        if self.hue > 0:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # OpenCV hue is in [0, 180): 2 degrees per step
            shift = int(round(_uniform(rng, (-self.hue, self.hue)) / 2))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return x

    def _warp(self, rng: np.random.Generator, patch: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray]:
        """Scale and rotate the patch about its centre into its own bounding box -> (pixels, footprint bool)."""
        ph, pw = patch.shape[:2]
        s = _uniform(rng, self.scale)
        angle = _uniform(rng, (-self.max_rotation, self.max_rotation))
        rad = math.radians(angle)
        bw = abs(pw * math.cos(rad)) + abs(ph * math.sin(rad))
        bh = abs(pw * math.sin(rad)) + abs(ph * math.cos(rad))
        s = min(s, (size[1] - 1) / bw, (size[0] - 1) / bh)  # the footprint must fit in the image
        fw, fh = max(1, math.ceil(bw * s)), max(1, math.ceil(bh * s))
        m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, s)
        m[:, 2] += (fw / 2 - pw / 2, fh / 2 - ph / 2)  # centre the patch in the footprint box
        # Reflect at the border so edge pixels do not blend with black; the footprint decides what is pasted.
        pixels = cv2.warpAffine(patch, m, (fw, fh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        ones = np.ones((ph, pw), dtype=np.uint8)
        footprint = cv2.warpAffine(ones, m, (fw, fh), flags=cv2.INTER_NEAREST, borderValue=0).astype(bool)
        if not footprint.any():  # a 1-pixel patch can round away entirely
            footprint[fh // 2, fw // 2] = True
        return pixels, footprint


@dataclass(frozen=True)
class Compose:
    """Apply several synthetic sources to the same normal image in turn; the mask is the union of theirs."""

    sources: tuple[AnomalySource, ...]
    name: str = "compose"
    needs_normal: ClassVar[bool] = True
    gives_masks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.sources or not all(s.needs_normal and s.gives_masks for s in self.sources):
            raise UserError("Compose takes one or more synthetic sources (ConfettiNoise, CutPaste); give it those")

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None) -> Drawn:
        img = _require_normal(normal, size, self.name)
        mask = np.zeros(img.shape[:2], dtype=bool)
        for source in self.sources:
            img, m = source.draw(rng, size, img)
            mask |= m
        return img, mask

    def files(self) -> list[Path]:
        return []


def _require_normal(normal: np.ndarray | None, size: Size, name: str) -> np.ndarray:
    if normal is None:
        raise UserError(f"the {name} anomaly source pastes on normal images; give the sampler normal training images")
    return prepare(normal, size)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


class MaskedAnomalyFolder:
    """Real anomalous images with pixel masks in the MVTec ground-truth layout:

        ROOT/<defect>/<stem>.png  and  ROOT/ground_truth/<defect>/<stem>_mask.png

    (images directly in ROOT pair with ROOT/ground_truth/<stem>_mask.png). A "good" folder is skipped. An image without
    a mask file is used as an image-level anomaly (mask None). This is a folder of anomalies set apart for training:
    never point it at the evaluated test split (`check_no_test_leak` refuses that).
    """

    needs_normal = False
    gives_masks = True

    def __init__(self, root: str | Path, name: str = "masked-folder"):
        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise UserError(f"anomaly folder {self.root} does not exist; give a folder in the MVTec layout")
        gt = self.root / "ground_truth"
        self.items: list[tuple[Path, Path | None]] = []
        groups = [(self.root, gt)] + [
            (d, gt / d.name)
            for d in sorted(self.root.iterdir())
            if d.is_dir() and d.name not in ("ground_truth", "good")
        ]
        for folder, mask_dir in groups:
            for img in _image_files(folder):
                mask = mask_dir / f"{img.stem}_mask.png"
                self.items.append((img, mask if mask.is_file() else None))
        if not self.items:
            raise UserError(
                f"no anomalous images found in {self.root}; expected ROOT/<defect>/*.png with masks in "
                "ROOT/ground_truth/<defect>/<stem>_mask.png"
            )

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None = None) -> Drawn:
        img_path, mask_path = self.items[int(rng.integers(len(self.items)))]
        return load_image(img_path, size), (load_mask(mask_path, size) if mask_path else None)

    def files(self) -> list[Path]:
        return [p for item in self.items for p in item if p is not None]


class ImageFolder:
    """Image-level anomalies: every image under ROOT (recursively), e.g. irrelevant images of another data set. No masks."""

    needs_normal = False
    gives_masks = False

    def __init__(self, root: str | Path, name: str = "image-folder"):
        self.root = Path(root)
        self.name = name
        if not self.root.is_dir():
            raise UserError(f"anomaly image folder {self.root} does not exist; give a folder of images")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and is_image_file(p))
        if not self.paths:
            raise UserError(f"no images found under {self.root}; give a folder with .png/.jpg images")

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None = None) -> Drawn:
        return load_image(self.paths[int(rng.integers(len(self.paths)))], size), None

    def files(self) -> list[Path]:
        return list(self.paths)


class ArrayImages:
    """Image-level anomalies from an in-memory uint8 RGB array (N, h, w, 3), e.g. CIFAR-100 for the CIFAR-10 protocol."""

    needs_normal = False
    gives_masks = False

    def __init__(self, images: np.ndarray, name: str = "array"):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0 or images.dtype != np.uint8:
            raise UserError(
                f"anomaly images must be a non-empty uint8 array (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        self.images = images
        self.name = name

    def draw(self, rng: np.random.Generator, size: Size, normal: np.ndarray | None = None) -> Drawn:
        return prepare(self.images[int(rng.integers(len(self.images)))], size), None

    def files(self) -> list[Path]:
        return []


class MixedAnomalySampler:
    """A fixed-length, indexable stream of anomalies mixed from several sources.

    sources: sources, or (source, weight) pairs (weights are relative). normals: normal training images (paths, uint8
    RGB arrays, or data `Sample`s) that synthetic sources paste on. Item i is a pure function of (seed, epoch, i): the same index gives the
    same anomaly in any worker and any order; `set_epoch` draws fresh ones each epoch. `exclude`: the evaluated test
    split (folders and/or files); construction fails if any anomaly file lies in it (see `check_no_test_leak`).
    """

    def __init__(
        self,
        sources: Sequence[AnomalySource | tuple[AnomalySource, float]],
        size: Size,
        *,
        normals: Sequence[object] | np.ndarray = (),
        length: int = 1000,
        seed: int = 0,
        exclude: str | Path | Iterable[str | Path] | None = None,
    ):
        pairs = [s if isinstance(s, tuple) else (s, 1.0) for s in sources]
        if not pairs:
            raise UserError(
                "no anomaly source given; add synthetic (confetti, cutpaste), --anomalies or external images"
            )
        self.sources = [s for s, _ in pairs]
        weights = np.asarray([float(w) for _, w in pairs])
        if (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"anomaly source weights {weights.tolist()} must be >= 0 with a positive sum")
        self.weights = weights / weights.sum()
        self.size = (int(size[0]), int(size[1]))
        self.normals = normals
        if any(s.needs_normal for s in self.sources) and len(normals) == 0:
            raise UserError("synthetic anomaly sources need normal training images to paste on; pass normals=")
        if length <= 0:
            raise UserError(f"length must be positive, got {length}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        if exclude is not None:
            check_no_test_leak(self.files(), exclude)

    @property
    def gives_masks(self) -> bool:
        """True when any source yields pixel masks (then normal images are pixel-labelled too, see plus_dataset)."""
        return any(s.gives_masks for s in self.sources)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def files(self) -> list[Path]:
        return [p for s in self.sources for p in s.files()]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        k = int(rng.choice(len(self.sources), p=self.weights))
        source = self.sources[k]
        normal = None
        if source.needs_normal:
            normal = load_normal(self.normals[int(rng.integers(len(self.normals)))], self.size)
        image, mask = source.draw(rng, self.size, normal)
        return {"image": image, "mask": mask, "label": 1, "source": source.name}


def load_normal(ref: object, size: Size) -> np.ndarray:
    """A normal image reference -> uint8 RGB at `size`: an RGB array, a path, or a data Sample (its `pixels` for CIFAR
    records, else its `path`)."""
    if isinstance(ref, np.ndarray):
        return prepare(ref, size)
    pixels = getattr(ref, "pixels", None)
    if pixels is not None:
        return prepare(pixels, size)
    return load_image(getattr(ref, "path", ref), size)
