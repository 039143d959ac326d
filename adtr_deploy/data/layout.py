"""Opening a data root of any supported layout (MVTec-AD, CIFAR batches, a folder of images), torch-free.

Evaluating an exported model needs these listings but not torch, so they live apart from the torch Dataset
(data/datasets.py, which re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.data.cifar import cifar_kind, list_cifar, resolve_class
from adtr_deploy.data.folder import list_folder
from adtr_deploy.data.mvtec import GOOD, Sample, list_mvtec, mvtec_categories
from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import load_image, prepare


@dataclass(frozen=True)
class AnomalyData:
    """The train and test samples of one data root and category, and what kind of layout they came from."""

    kind: str  # "mvtec" | "cifar10" | "cifar100" | "folder"
    root: Path
    category: str | None
    train: tuple[Sample, ...]
    test: tuple[Sample, ...] = ()  # empty when the data has no test split

    @property
    def has_test(self) -> bool:
        return len(self.test) > 0

    @property
    def has_masks(self) -> bool:
        """True when some anomalous test image has a ground-truth mask, so pixel metrics mean something."""
        return any(s.label == 1 and s.mask is not None for s in self.test)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root.resolve()), "category": self.category}


def open_dataset(root: str | Path, category: str | int | None = None, *, test: bool = True) -> AnomalyData:
    """Find the layout of `root` and list its samples.

    - CIFAR-10/100 pickle batches in `root` (or its cifar-10-batches-py / cifar-100-python folder): one-class protocol,
      `category` = the normal class by name or index.
    - MVTec-AD: `root/category/train/good`; `root` may also be a category folder itself (category omitted).
    - Otherwise, with no category: a plain folder of good images (training only).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; check --data")
    if not root.is_dir():
        raise UserError(f"{root} is a file; give --data the data folder (MVTec-AD root, CIFAR batches or images)")
    found = cifar_kind(root)
    if found is not None:
        kind, folder = found
        split = resolve_class(kind, folder, category)
        return AnomalyData(
            kind,
            folder,
            split.category,
            tuple(list_cifar(split, "train")),
            tuple(list_cifar(split, "test")) if test else (),
        )
    cat = None if category is None else str(category).strip() or None
    if cat is None and (root / "train" / GOOD).is_dir():  # a single MVTec category folder
        root, cat = root.parent, root.name
    if cat is not None:
        train = list_mvtec(root, cat, "train")
        return AnomalyData("mvtec", root, cat, tuple(train), tuple(list_mvtec(root, cat, "test")) if test else ())
    categories = mvtec_categories(root)
    if categories:
        raise UserError(f"{root} is an MVTec-AD root; choose a category with --category ({', '.join(categories)})")
    return AnomalyData("folder", root, None, tuple(list_folder(root)))


def load_sample(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """A sample's image as uint8 RGB (H, W, 3) at `size`, through the shared preprocessing."""
    if sample.pixels is not None:
        return prepare(sample.pixels, size, bgr=False)
    return load_image(sample.path, size)
