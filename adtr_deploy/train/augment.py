"""Photometric augmentation of the good training images (TrainConfig.photometric, issue 31's lever (b)).

Each epoch every training image gets a fresh random global change of its light, drawn from (seed, epoch, index) so a run
is reproducible: brightness times 1 +- s, contrast times 1 +- s/2 and each channel's gain times 1 +- s/2 (a colour
cast), s = the strength. The transformer then learns to reconstruct the features of differently lit good parts, and the
error statistics fitted after training (Mahalanobis whitening, border standardization: train/features.py
fit_error_metric) see them too. With `noise`, each image also gets Gaussian sensor noise of a random std in
[0, noise] pixel levels (a raised camera gain), after the light change. With `highlights` (issue 31's lever (g)), each
image is also brightened by a gain drawn from [1, 1 + highlights] and clipped at 255 as a camera clips: the in-graph
input standardization undoes the gain exactly, so all the model learns from it is that clipped highlights belong to
good parts (adtr-train turns it on by itself for training images with little headroom below 255, see
AUTO_HIGHLIGHTS). The calibration images are left as they are.
The backbone runs on every batch (the features change every epoch), which costs about 35 ms per 224 px image on 2 CPU
cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from adtr_deploy.data.datasets import load_sample
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.data.shifts import brightness, channel_gains, contrast
from adtr_deploy.data.shifts import noise as add_noise

# What adtr-train uses when the training images leave less headroom than the drift goal's +15 % brighter light
# (preprocess.headroom_warning): gains up to 1.25, chosen on tissue's validation split (docs/robustness.md, lever g).
AUTO_HIGHLIGHTS = 0.25


def highlights(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """uint8 RGB (H, W, 3) brightened by a random gain in [1, 1 + strength], clipped at 255 (a brighter light)."""
    return brightness(image, rng.uniform(1.0, 1.0 + float(strength)))


def photometric(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """One random global light change of uint8 RGB (H, W, 3) (see the module docstring)."""
    s = float(strength)
    out = brightness(image, rng.uniform(1 - s, 1 + s))
    out = contrast(out, rng.uniform(1 - s / 2, 1 + s / 2))
    return channel_gains(out, tuple(rng.uniform(1 - s / 2, 1 + s / 2, size=3)))


class PhotometricImages(torch.utils.data.Dataset):
    """Training images with a fresh photometric change per epoch: items {"image" uint8 (H, W, 3), "label", "index"}."""

    def __init__(
        self,
        samples: list[Sample],
        size: tuple[int, int],
        strength: float,
        seed: int = 0,
        noise: float = 0.0,
        highlights: float = 0.0,
    ):
        self.samples = list(samples)
        self.noise = float(noise)
        self.highlights = float(highlights)
        self.size = (int(size[0]), int(size[1]))
        self.strength = float(strength)
        self.seed = int(seed)
        self.epoch = 0
        self._images = [load_sample(s, self.size) for s in self.samples]  # decoded once: small at the model's size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = photometric(self._images[index], rng, self.strength)  # identity at strength 0 (same random stream)
        if self.highlights > 0:
            image = highlights(image, rng, self.highlights)
        if self.noise > 0:
            image = add_noise(image, rng.uniform(0.0, self.noise), seed=int(rng.integers(2**31)))
        return {"image": torch.from_numpy(image), "label": 0, "index": index}
