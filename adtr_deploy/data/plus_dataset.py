"""Torch data set for ADTR+ fine-tuning: the good training images followed by anomalies from a MixedAnomalySampler;
`build_plus_dataset` makes it from adtr-train's options (--synthetic, --anomalies, --external).

Every item is a dict of tensors that torch's default collate stacks into the batch `adtr_plus_loss` takes:
  "image"    uint8 (H, W, 3) RGB at the model's input size (the model's input layout);
  "mask"     bool (H, W) pixel labels (all False for good images and for anomalies without a mask);
  "has_mask" bool (): whether "mask" is a real pixel label (good images: True when pixel labels are in use at all);
  "label"    int64 (): 0 good, 1 anomalous.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from adtr_deploy.data.anomalies import (
    AnomalySource,
    ArrayImages,
    ConfettiNoise,
    CutPaste,
    ImageFolder,
    MaskedAnomalyFolder,
    MixedAnomalySampler,
    load_normal,
)
from adtr_deploy.data.cifar import _load as _load_cifar
from adtr_deploy.data.cifar import cifar_kind
from adtr_deploy.data.datasets import AnomalyData
from adtr_deploy.errors import UserError
from adtr_deploy.leak_guard import mvtec_test_split


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


# --- Building the ADTR+ training set from command-line style options (adtr-train --mode adtr+) ---

SYNTHETIC = {"confetti": ConfettiNoise, "cutpaste": CutPaste, "scar": CutPaste.scar}
DEFAULT_SYNTHETIC = ("confetti", "cutpaste")


def parse_synthetic(text: str | None) -> tuple[str, ...]:
    """--synthetic text -> names: "confetti,cutpaste" -> ("confetti", "cutpaste"); "none" -> ()."""
    names = tuple(n.strip().lower() for n in (text or "").split(",") if n.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in SYNTHETIC]
    if unknown:
        raise UserError(
            f"unknown synthetic anomaly {unknown[0]!r}; choose from {', '.join(SYNTHETIC)} (comma-separated)"
        )
    return names


def test_split_of(data: AnomalyData) -> list[Path]:
    """What evaluation reads from `data`, i.e. where anomalies must never come from (the leak guard's exclude)."""
    if data.kind == "mvtec":
        return mvtec_test_split(data.root, data.category)
    if data.kind == "cifar10":
        return [data.root / "test_batch"]
    if data.kind == "cifar100":
        return [data.root / "test"]
    return []  # a plain folder of good images has no test split


def external_source(spec: str, data: AnomalyData | None = None) -> AnomalySource:
    """--external SPEC -> an image-level source: "cifar100:PATH" / "cifar10:PATH" (the TRAIN images of a local CIFAR copy,
    all classes), a folder holding CIFAR batches (detected), or any folder of images (ImageFolder)."""
    kind, _, rest = spec.partition(":")
    path = Path(rest if kind in ("cifar10", "cifar100") and rest else spec).expanduser()
    found = cifar_kind(path) if path.is_dir() else None
    if kind in ("cifar10", "cifar100") and (found is None or found[0] != kind):
        raise UserError(f"--external {spec}: {path} holds no {kind.upper()} python-version batches; check the path")
    if found is None:
        return ImageFolder(path, name="external")
    if data is not None and data.kind == found[0] and found[1].resolve() == data.root.resolve():
        raise UserError(
            f"--external {spec} is the data set being trained and evaluated; give another data set (e.g. CIFAR-100 "
            "for CIFAR-10)"
        )
    images, _, _ = _load_cifar(found[0], found[1], "train")  # only the train split: never the evaluated test images
    return ArrayImages(images, name=f"external-{found[0]}")


def build_plus_dataset(
    data: AnomalyData,
    normals: Sequence[object],
    size: tuple[int, int],
    *,
    synthetic: Sequence[str] | None = None,
    anomalies: str | Path | None = None,
    external: str | None = None,
    extra_sources: Sequence[AnomalySource] = (),
    seed: int = 0,
) -> tuple[PlusDataset, dict]:
    """The ADTR+ training set for `data`: its good training images `normals` (calibration images left out) and one
    anomaly per good image per epoch, mixed with equal weight from the chosen sources. synthetic None means the default
    (confetti + cutpaste) when neither `anomalies` nor `external` is given, else none. Anomaly files inside the
    evaluated test split are refused (check_no_test_leak). `extra_sources` (the review's confirmed defects, adtr-train
    --feedback) join the mix with the same weight and do not change the synthetic default. Returns (dataset, record of
    the sources for the checkpoint).
    """
    if synthetic is None:
        synthetic = DEFAULT_SYNTHETIC if anomalies is None and external is None else ()
    sources: list[AnomalySource] = [SYNTHETIC[n]() for n in synthetic]
    if anomalies is not None:
        sources.append(MaskedAnomalyFolder(anomalies, name="anomalies"))
    if external is not None:
        sources.append(external_source(external, data))
    sources += list(extra_sources)
    sampler = MixedAnomalySampler(
        sources, size, normals=normals, length=len(normals), seed=seed, exclude=test_split_of(data) or None
    )
    record = {
        "sources": [s.name for s in sources],
        "synthetic": list(synthetic),
        "anomalies": None if anomalies is None else str(Path(anomalies).resolve()),
        "external": external,
        "anomalies_per_epoch": len(sampler),
    }
    return PlusDataset(normals, sampler), record
