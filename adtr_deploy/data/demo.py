"""The built-in demo data set: real texture photographs with synthesized defects and exact masks, in the MVTec-AD layout.

The images (texture photographs, defects, masks) are made by demo_synth.make_sample; this module writes them as a data set.

Output for each category (deterministic: the same seed gives byte-identical files):
    ROOT/<cat>/train/good/000.png ...            (NUM_TRAIN)
    ROOT/<cat>/test/good/000.png ...             (NUM_TEST_GOOD)
    ROOT/<cat>/test/<defect>/000.png ...         (NUM_PER_DEFECT per defect type)
    ROOT/<cat>/ground_truth/<defect>/000_mask.png  (0/255 grey)
    ROOT/<cat>/.adtr_demo.json                   (written last; a category folder without it is incomplete)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.data.demo_synth import (
    ALL_CATEGORIES,
    DEFECTS,
    DEMO_CATEGORIES,
    PALETTES,
    family,
    make_sample,
    source_photo,
)
from adtr_deploy.errors import UserError

NUM_TRAIN = 80
NUM_TEST_GOOD = 20
NUM_PER_DEFECT = 10

FORMAT_VERSION = 1
MARKER_NAME = ".adtr_demo.json"


# ----------------------------------------------------------------------------------------------------------------- writer


def _write_png(path: Path, img: np.ndarray) -> None:
    arr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    path.write_bytes(buf.tobytes())


def _marker(seed: int, image_size: int, counts: dict[str, int]) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": int(seed), "image_size": int(image_size), "counts": counts}


def _split_dirs(split: str) -> tuple[str, str | None]:
    """Image folder and mask folder (None for good images) of a split, relative to the category folder."""
    if split == "train":
        return "train/good", None
    return f"test/{split}", (f"ground_truth/{split}" if split in DEFECTS else None)


def _is_complete(folder: Path, expected: dict) -> bool:
    """The folder holds a finished demo category written with the same parameters, with every file still there."""
    try:
        if json.loads((folder / MARKER_NAME).read_text()) != expected:
            return False
    except (OSError, ValueError):
        return False
    for split, n in expected["counts"].items():
        for sub in _split_dirs(split):
            if sub is not None and len(list((folder / sub).glob("*.png"))) != n:
                return False
    return True


def _write_category(tmp: Path, category: str, seed: int, image_size: int, counts: dict[str, int]) -> None:
    def write_one(split: str, i: int) -> None:
        image, _, mask = make_sample(category, split, i, seed=seed, image_size=image_size)
        image_dir, mask_dir = _split_dirs(split)
        _write_png(tmp / image_dir / f"{i:03d}.png", image)
        if mask is not None:
            _write_png(tmp / mask_dir / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)

    for split in counts:
        for sub in _split_dirs(split):
            if sub is not None:
                (tmp / sub).mkdir(parents=True)
    for name in family(category):  # load the photos once, before the threads start ("patch" uses the other ones)
        source_photo(name)
    jobs = [(split, i) for split, n in counts.items() for i in range(n)]
    # Every image has its own random stream, so the order the threads finish in cannot change a byte. OpenCV and numpy
    # release the GIL for the heavy parts (PNG encoding, resizing, array arithmetic).
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        for future in [pool.submit(write_one, split, i) for split, i in jobs]:
            future.result()
    finally:  # on an error or Ctrl-C, drop the images not started yet instead of writing them all first
        pool.shutdown(wait=True, cancel_futures=True)


def write_demo_dataset(
    root: str | Path,
    categories: Sequence[str] = DEMO_CATEGORIES,
    *,
    seed: int = 0,
    image_size: int = 256,
    num_train: int = NUM_TRAIN,
    num_test_good: int = NUM_TEST_GOOD,
    num_per_defect: int = NUM_PER_DEFECT,
) -> Path:
    """Write the demo data set in the MVTec-AD layout under `root` and return `root`.

    Each category is written into a hidden temporary folder and renamed into place when complete, so an interrupted run
    never leaves a category that looks finished. A category already written with the same parameters is kept as it is;
    one written with other parameters is replaced. A folder of the same name that is not a demo category is never touched.
    """
    root = Path(root)
    categories = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in categories if c not in PALETTES]
    if unknown or not categories:
        raise UserError(f"unknown demo categories {unknown or '(none)'}; choose from {', '.join(ALL_CATEGORIES)}")
    if not 32 <= int(image_size) <= 2048:
        raise UserError(f"image_size {image_size} is out of range; use a size between 32 and 2048 pixels")
    if min(num_train, num_test_good, num_per_defect) < 1:
        raise UserError("every split of the demo data set needs at least one image; use counts of 1 or more")
    counts = {"train": int(num_train), "good": int(num_test_good), **{d: int(num_per_defect) for d in DEFECTS}}
    expected = _marker(seed, image_size, counts)
    root.mkdir(parents=True, exist_ok=True)
    for category in categories:
        final = root / category
        if _is_complete(final, expected):
            continue
        if final.exists() and not (final / MARKER_NAME).exists() and any(final.iterdir()):
            raise UserError(
                f"{final} exists and is not a demo data set folder; choose another --out folder or remove it"
            )
        tmp = root / f".tmp-{category}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_category(tmp, category, seed, image_size, counts)
            (tmp / MARKER_NAME).write_text(
                json.dumps(expected, indent=1, allow_nan=False) + "\n"
            )  # last: marks the folder complete
            if _is_complete(final, expected):  # another process finished the same category meanwhile
                continue
            if final.exists():  # an older demo category (other parameters) or an empty folder: replace it
                old = root / f".old-{category}-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old)
            try:
                tmp.rename(final)
            except OSError:
                if not _is_complete(final, expected):  # lost a race to a process that wrote the same category
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def preview_image(
    categories: Sequence[str] = DEMO_CATEGORIES, *, seed: int = 0, index: int = 0, tile: int = 128
) -> np.ndarray:
    """A uint8 RGB grid with a label row: per category a good test image, then each defect type beside its mask."""
    gap = 3
    labels = ["good"] + [name for d in DEFECTS for name in (d, "mask")]
    header = np.full((20, len(labels) * (tile + gap) - gap, 3), 255, dtype=np.uint8)
    for j, label in enumerate(labels):
        cv2.putText(
            header, label, (j * (tile + gap) + 4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
    rows = [header]
    for category in categories:
        tiles = [make_sample(category, "good", index, seed=seed)[0]]
        for defect in DEFECTS:
            image, _, mask = make_sample(category, defect, index, seed=seed)
            tiles += [image, np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)]
        row = np.full((tile, header.shape[1], 3), 255, dtype=np.uint8)
        for j, t in enumerate(tiles):
            row[:, j * (tile + gap) : j * (tile + gap) + tile] = cv2.resize(
                t, (tile, tile), interpolation=cv2.INTER_AREA
            )
        rows += [np.full((gap, header.shape[1], 3), 255, dtype=np.uint8), row]
    return np.concatenate(rows, axis=0)


def write_preview(
    path: str | Path, categories: Sequence[str] = DEMO_CATEGORIES, *, seed: int = 0, tile: int = 128
) -> Path:
    """Save `preview_image` as a small PNG (256-colour palette through Pillow, which scikit-image already depends on)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = preview_image(categories, seed=seed, tile=tile)
    Image.fromarray(grid).quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    return path
