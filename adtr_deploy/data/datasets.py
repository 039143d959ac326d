"""Opening a data root of any supported layout, and the torch Dataset that loads its images.

Every image goes through `adtr_deploy.preprocess` (load_image / prepare), so training and evaluation see the same pixels as
the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from adtr_deploy.data.cifar import cifar_kind, list_cifar, resolve_class
from adtr_deploy.data.folder import list_folder
from adtr_deploy.data.mvtec import GOOD, Sample, list_mvtec, mvtec_categories
from adtr_deploy.preprocess import ImageDecodeError, load_image, load_mask, prepare


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
        raise ValueError(f"{root} is a file; give --data the data folder (MVTec-AD root, CIFAR batches or images)")
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
        raise ValueError(f"{root} is an MVTec-AD root; choose a category with --category ({', '.join(categories)})")
    return AnomalyData("folder", root, None, tuple(list_folder(root)))


def load_sample(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """A sample's image as uint8 RGB (H, W, 3) at `size`, through the shared preprocessing."""
    if sample.pixels is not None:
        return prepare(sample.pixels, size, bgr=False)
    return load_image(sample.path, size)


class ImageDataset(Dataset):
    """Samples -> dicts of `image` (H, W, 3) uint8 tensor, `label`, `index`, and `mask` (1, H, W) bool when asked.

    A file that cannot be decoded yields `error` (its one-sentence message) instead of raising inside a DataLoader worker,
    where the message would be buried in a worker traceback; `collate` turns it back into an ImageDecodeError.
    """

    def __init__(self, samples: list[Sample] | tuple[Sample, ...], size: tuple[int, int], *, masks: bool = False):
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
        self.masks = masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        try:
            item = {"image": torch.from_numpy(load_sample(s, self.size)), "label": s.label, "index": index}
            if self.masks:
                item["mask"] = torch.from_numpy(load_mask(s.mask, self.size))[None]  # (1, H, W)
        except ImageDecodeError as exc:
            return {"error": str(exc), "index": index}
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch: image (B, H, W, 3) uint8, label (B,), index (B,), mask (B, 1, H, W)."""
    for item in items:
        if "error" in item:
            raise ImageDecodeError(item["error"])
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    return batch


def image_loader(
    samples, size: tuple[int, int], *, batch_size: int, workers: int = 0, masks: bool = False, order=None
) -> torch.utils.data.DataLoader:
    """A DataLoader over samples, in `order` (a list of indices) or as listed, with the error-surfacing collate.

    It has its own generator, so creating it never draws from the global torch RNG that dropout uses (resume equality).
    """
    return torch.utils.data.DataLoader(
        ImageDataset(samples, size, masks=masks),
        batch_size=batch_size,
        sampler=None if order is None else list(order),
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
