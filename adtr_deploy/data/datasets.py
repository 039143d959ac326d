"""The torch Dataset and DataLoader that load a data set's images (opening a data root lives in data/layout.py).

Every image goes through `adtr_deploy.preprocess` (load_image / prepare), so training and evaluation see the same pixels as
the runtime.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from adtr_deploy.data.layout import AnomalyData, load_sample, open_dataset
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.preprocess import ImageDecodeError, load_mask

__all__ = ["AnomalyData", "ImageDataset", "collate", "image_loader", "load_sample", "open_dataset"]


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
