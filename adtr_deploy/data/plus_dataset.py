"""Torch data set for ADTR+ fine-tuning: the good training images followed by anomalies from a MixedAnomalySampler.

Every item is a dict of tensors that torch's default collate stacks into the batch `adtr_plus_loss` takes:
  "image"    uint8 (H, W, 3) RGB at the model's input size (the model's input layout);
  "mask"     bool (H, W) pixel labels (all False for good images and for anomalies without a mask);
  "has_mask" bool (): whether "mask" is a real pixel label (good images: True when pixel labels are in use at all);
  "label"    int64 (): 0 good, 1 anomalous.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from adtr_deploy.data.anomalies import MixedAnomalySampler, load_normal


class PlusDataset(Dataset):
    """Index i < len(normals): good image i (label 0); then the anomaly sampler's items (label 1), at the sampler's size.

    normals: the good TRAINING images (paths, uint8 RGB arrays or data `Sample`s), without the held-out calibration ones.
    normal_masks: whether good images carry pixel labels (an all-False mask, has_mask True), i.e. take part in L_px.
    Default: exactly when some anomaly source gives masks. With image-level anomalies only (CIFAR-10 + CIFAR-100, an
    external folder) nothing carries pixel labels, so the loss is L_img alone, as in the paper's CIFAR protocol.
    """

    def __init__(
        self,
        normals: Sequence[object] | np.ndarray,
        anomalies: MixedAnomalySampler,
        *,
        normal_masks: bool | None = None,
    ):
        self.normals = normals
        self.anomalies = anomalies
        self.size = anomalies.size  # one input size for good images and anomalies
        self.normal_masks = anomalies.gives_masks if normal_masks is None else bool(normal_masks)

    def set_epoch(self, epoch: int) -> None:
        """Fresh synthetic anomalies each epoch (still deterministic given the sampler's seed)."""
        self.anomalies.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.normals) + len(self.anomalies)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        h, w = self.size
        if index < len(self.normals):
            image = load_normal(self.normals[index], self.size)
            mask, has_mask, label = np.zeros((h, w), dtype=bool), self.normal_masks, 0
        else:
            item = self.anomalies[index - len(self.normals)]
            image, mask, label = item["image"], item["mask"], item["label"]
            has_mask = mask is not None
            if mask is None:
                mask = np.zeros((h, w), dtype=bool)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
            "has_mask": torch.tensor(has_mask),
            "label": torch.tensor(label, dtype=torch.int64),
        }
