"""Which images verify or calibrate an export, in one place (torch-free: paths, OpenCV and numpy).

- Verification (`verification_images`): the files given with --verify-images, else the checkpoint's calibration
  hold-out images, else (when an INT8 export calibrated on those) its other train/good images; with none of these it
  refuses in one sentence. It never reads a test split nor the demo data set (export does not import data/).
- INT8 calibration (`calibration_files`): --calib-images, else the checkpoint's hold-out images topped up with its
  train/good images; never an image of the evaluated test split (adtr_deploy/leak_guard.py).
Both spread a long list evenly (`evenly`) and skip unreadable files: one broken file says nothing about parity and should
not stop a calibration over many.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.export.formats import DEFAULT_CALIB_COUNT
from adtr_deploy.leak_guard import check_no_test_leak, mvtec_test_split
from adtr_deploy.preprocess import ImageDecodeError, is_image_file, load_image, read_image, stack_batch
from adtr_deploy.tiling import Tiling, training_crops

MAX_VERIFY_IMAGES = 16
TILES_PER_IMAGE = 4  # a tiled model is verified on tiles of each image at its tiling scale, spread over its grid


def evenly(items: list, n: int) -> list:
    """At most n of `items`, spread evenly over the list (first and last included)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def files_from(pattern: str | Path) -> list[Path]:
    """The image files of a folder (recursively), a single file, or a glob (** allowed), sorted."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
    if p.is_file():
        return [p]
    return sorted(Path(f) for f in glob.glob(str(p), recursive=True) if is_image_file(f))


def load_files(paths: list[str | Path], size: tuple[int, int], tiling: Tiling | None = None) -> list[np.ndarray]:
    """uint8 RGB images of the readable files, through the shared preprocessing; unreadable files are skipped. With
    `tiling` (a model trained on tiles), TILES_PER_IMAGE tiles of each image, as the runtime cuts them."""
    images = []
    for p in paths:
        try:
            if tiling is None:
                images.append(load_image(p, size))
            else:
                images += evenly(training_crops(read_image(p), tiling, np.random.default_rng(0)), TILES_PER_IMAGE)
        except ImageDecodeError:
            continue
    return images


# --- verification ----------------------------------------------------------------------------------------------------


def verification_images(
    size: tuple[int, int],
    *,
    verify_images: str | None = None,
    checkpoint: dict | None = None,
    max_images: int = MAX_VERIFY_IMAGES,
    avoid: tuple[str | Path, ...] = (),
) -> tuple[np.ndarray, str]:
    """Real images for verification, as a uint8 (N, H, W, 3) batch and a description of where they came from.

    Order: the files given with --verify-images (a folder or a glob), else the checkpoint's calibration images
    (held-out good images recorded by training) when they exist on this machine. `avoid`: files an INT8 export
    calibrated on; verification does not reuse them (an in-sample check flatters the quantization) and, when that
    leaves no calibration image, reads the checkpoint's other train/good images. Never a test split: the images that
    check a deployment are not the ones that measure it. With none of these: a UserError saying what to pass. A model
    trained on tiles is verified on tiles of these images (TILES_PER_IMAGE each), what its graph sees when deployed.
    """
    tiled = ((checkpoint or {}).get("info") or {}).get("tiling")
    tiling = None if tiled is None else Tiling.from_dict({**tiled, "crops": "grid"}, "the checkpoint")
    if verify_images:
        images = load_files(evenly(files_from(verify_images), max_images), size, tiling)
        if not images:
            raise UserError(
                f"--verify-images {verify_images} matches no readable image; give a folder or a glob of images"
            )
        return stack_batch(images), f"{len(images)} images from {verify_images}"
    seen = {Path(p).resolve() for p in avoid}
    recorded = [Path(p) for p in ((checkpoint or {}).get("info") or {}).get("calibration_images") or []]
    present = [p for p in recorded if p.is_file() and p.resolve() not in seen]
    images = load_files(evenly(present, max_images), size, tiling)
    if images:
        what = f"{len(images)} tiles of {len(evenly(present, max_images))}" if tiling else f"{len(images)}"
        return stack_batch(images), f"{what} of the checkpoint's calibration images"
    if seen:
        good = [p for p in _train_good((checkpoint or {}).get("info") or {}) if p.resolve() not in seen]
        images = load_files(evenly(good, max_images), size, tiling)
        if images:
            return stack_batch(images), f"{len(images)} train/good images of the checkpoint's data (none calibrated on)"
    raise UserError(
        "verification needs real images and the checkpoint records none that exist on this machine"
        + (" besides the INT8 calibration images" if seen else "")
        + "; pass --verify-images FOLDER|GLOB with images of the product (not the test split), or --no-verify"
    )


# --- INT8 calibration ------------------------------------------------------------------------------------------------


def evaluated_test_split(info: dict[str, Any]) -> list[Path]:
    """The test folders of the data the checkpoint was trained on (info["data"]), where the layout says so; else []."""
    data = info.get("data") or {}
    root, category = data.get("root"), data.get("category")
    if not root or not category:
        return []
    return [p for p in mvtec_test_split(root, str(category)) if p.exists()]


def check_not_test_images(files: list[Path], test_split: list[Path]) -> None:
    """Refuse calibration images that lie inside (or are byte copies of files of) the evaluated test split."""
    if not files or not test_split:
        return
    try:
        check_no_test_leak(files, test_split)
    except ValueError as exc:
        what = str(exc).split(";")[0].replace("anomaly file", "calibration image", 1)
        raise UserError(
            f"{what}; calibrating INT8 on test images makes its measured accuracy optimistic, so calibrate on good "
            "training images (--calib-images FOLDER|GLOB)"
        ) from None


def _train_good(info: dict[str, Any]) -> list[Path]:
    """ROOT/<category>/train/good images of the checkpoint's data (info["data"]), where they exist here."""
    data = info.get("data") or {}
    if not data.get("root") or not data.get("category"):
        return []
    folder = Path(data["root"]) / str(data["category"]) / "train" / "good"
    return sorted(f for f in folder.iterdir() if f.is_file() and is_image_file(f)) if folder.is_dir() else []


def calibration_files(
    info: dict[str, Any], calib_images: str | None = None, count: int = DEFAULT_CALIB_COUNT
) -> tuple[list[Path], str]:
    """The good training images INT8 calibration reads, and where they came from.

    --calib-images (a folder or a glob) when given; else the checkpoint's calibration hold-out images
    (info["calibration_images"]) first, topped up with ROOT/<category>/train/good images from info["data"], at most
    `count` in all, evenly spread. Any image inside the evaluated test split is refused.
    """
    count = int(count)
    if count < 1:
        raise UserError(f"--calib-count must be at least 1, not {count}")
    if calib_images:
        files = evenly(files_from(calib_images), count)
        if not files:
            raise UserError(f"--calib-images {calib_images} matches no image; give a folder or a glob of good images")
        source = f"{len(files)} images from --calib-images {calib_images}"
    else:
        held_out = [Path(p) for p in info.get("calibration_images") or [] if Path(p).is_file()]
        held = {p.resolve() for p in held_out}
        more = [f for f in _train_good(info) if f.resolve() not in held]
        files = held_out[:count] + evenly(more, max(0, count - len(held_out)))
        if not files:
            raise UserError(
                "INT8 calibration needs good training images, and the checkpoint records none that exist on this "
                "machine; pass --calib-images FOLDER|GLOB with good images (not test images)"
            )
        source = (
            f"{min(len(held_out), count)} calibration hold-out images and {len(files) - min(len(held_out), count)} "
            "train/good images of the checkpoint's data"
        )
    check_not_test_images(files, evaluated_test_split(info))
    return files, source


def load_calibration_batch(files: list[str | Path], size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W, 3) batch of the readable calibration images, through the shared preprocessing."""
    images = load_files(files, size)
    if not images:
        raise UserError("none of the calibration images could be read; pass --calib-images with readable images")
    return np.stack(images)
