"""The MVTec-AD folder layout, and the `Sample` record every data source produces.

ROOT/<category>/train/good/*.png
ROOT/<category>/test/good/*.png
ROOT/<category>/test/<defect>/*.png
ROOT/<category>/ground_truth/<defect>/<stem>_mask.png   (optional per defect: without masks, image metrics only)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import is_image_file

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image: where it comes from, its label (0 good, 1 anomalous), its defect type, and its mask file if any.

    `pixels` holds the decoded image for sources that are not files (CIFAR pickle batches); `path` then names the record
    (e.g. `.../test_batch[17]`) for messages and score tables.
    """

    path: Path
    label: int = 0
    defect: str = GOOD
    mask: Path | None = None
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def has_pixel_truth(self) -> bool:
        """Good images are all-normal; an anomalous image has pixel labels only when its mask exists."""
        return self.label == 0 or self.mask is not None


def image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (by suffix), sorted so every listing is deterministic; hidden files are skipped."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def mvtec_categories(root: str | Path) -> list[str]:
    """Category folders of an MVTec-AD root: those with train/good inside."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())


def find_mask(root: Path, category: str, defect: str, image: Path) -> Path | None:
    """The ground-truth mask of a test image: `<stem>_mask.png` (MVTec-AD), or a file with the same stem."""
    folder = root / category / "ground_truth" / defect
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}_mask{image.suffix}"):
        if (folder / name).is_file():
            return folder / name
    return None


def list_mvtec(root: str | Path, category: str, split: str) -> list[Sample]:
    """Samples of one MVTec-AD category and split ("train": the good images; "test": good and every defect folder)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise UserError(f"split {split!r} is not one of train, test")
    base = root / category
    if not (base / "train" / GOOD).is_dir():
        found = mvtec_categories(root)
        hint = (
            f"categories found there: {', '.join(found)}" if found else "no category folder with train/good was found"
        )
        raise FileNotFoundError(
            f"{base / 'train' / GOOD} does not exist; give --data the MVTec-AD root and --category one of its "
            f"categories ({hint})"
        )
    if split == "train":
        samples = [Sample(p) for p in image_files(base / "train" / GOOD)]
        if not samples:
            raise UserError(f"{base / 'train' / GOOD} holds no images; put the good training images there")
        return samples
    test = base / "test"
    if not test.is_dir():
        return []
    samples = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):
        defect = folder.name
        for img in image_files(folder):
            if defect == GOOD:
                samples.append(Sample(img))
            else:
                samples.append(Sample(img, 1, defect, find_mask(root, category, defect, img)))
    return samples
