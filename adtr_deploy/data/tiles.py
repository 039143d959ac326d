"""Training crops of large good images (adtr-train --tile): each image's tiles at the model's input size, at the tiling's
scale, as in-memory samples, so the feature cache, the training loop and the error statistics work on them unchanged.

The crops come from adtr_deploy/tiling.py (`training_crops`), the same grid the runtime scores with (crops="grid"), or
as many crops at random positions (crops="random", drawn once per run from the seed). `auto` is resolved here, from the
first training image's size, so the model, model.json and the runtime all hold the same concrete scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adtr_deploy.data.mvtec import Sample
from adtr_deploy.preprocess import read_image, to_rgb_uint8
from adtr_deploy.tiling import Tiling, resolve, training_crops


def full_image(sample: Sample) -> np.ndarray:
    """A sample's image as uint8 RGB at its own size (no resize)."""
    return to_rgb_uint8(sample.pixels, bgr=False) if sample.pixels is not None else read_image(sample.path)


def tile_samples(samples: list[Sample], tiling: Tiling, seed: int) -> tuple[list[Sample], Tiling]:
    """Good images -> (their crops as samples with `pixels`, the tiling with `auto` resolved). A crop's path names its
    image and index, e.g. `.../003.png[tile 7]`, for messages and logs."""
    if not samples:
        return [], tiling
    tiling = resolve(tiling, full_image(samples[0]).shape[:2])
    out: list[Sample] = []
    for i, s in enumerate(samples):
        rng = np.random.default_rng((int(seed), i))
        crops = training_crops(full_image(s), tiling, rng)
        out.extend(Sample(path=Path(f"{s.path}[tile {k}]"), pixels=crop) for k, crop in enumerate(crops))
    return out, tiling
