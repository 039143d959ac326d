"""How a model is trained (TrainConfig); the model itself is an ADTRConfig (model/config.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Default epochs on the CPU. The paper trains 500 epochs on a GPU; with cached features a lite0 epoch of the demo's 72 images
# takes about 13 s on 2 cores, and 30 epochs at batch 4 (600 steps) reach brick's accuracy (see docs/train.md).
DEFAULT_EPOCHS = 30


@dataclass(frozen=True)
class TrainConfig:
    """Everything about how a model is trained (the model itself is an ADTRConfig)."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 4  # the paper: 16 for 500 epochs on a GPU; 4 gives 4x the steps per CPU minute (docs/train.md)
    lr: float = 1e-4  # AdamW, the paper's defaults
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.1  # max grad norm (UniAD's code)
    lr_drop_at: float = 0.8  # lr x lr_drop after this fraction of the epochs (the paper: 400 of 500)
    lr_drop: float = 0.1
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # float16 autocast + GradScaler; only ever on CUDA
    val_fraction: float = 0.1  # held-out train/good images for calibration, never trained on
    min_val_images: int = 4
    # Lift of the threshold toward synthetic defects made on the calibration images (calibration.DEFECT_MARGIN); 0 = off
    threshold_margin: float = 0.15
    cache_features: bool = True
    cache_dtype: str = "float32"  # or "float16": half the cache memory, features rounded to fp16
    workers: int = 0  # DataLoader worker processes for image decoding
    eval_batch_size: int = 32
    checkpoint_every: int = 1
    mode: str = "adtr"  # selects the loss (train/losses.py)
    standardize_features: bool = True  # standardize the transformer's tokens (see init_feature_standardization)
    # Photometric augmentation of the good training images (train/augment.py): the strength s of a random global
    # brightness (1 +- s), contrast and per-channel gain (1 +- s/2) change per image and epoch, also in the error
    # statistics' fit; 0 = off. The features are then computed every batch instead of cached.
    photometric: float = 0.0
    # Sensor-noise augmentation (train/augment.py, with the photometric one): Gaussian noise of a random std in
    # [0, noise] pixel levels per image and epoch; 0 = off. A lever of issue 31 (noise), measured in docs/robustness.md.
    noise: float = 0.0
    # Highlight augmentation (train/augment.py, lever (g) of issue 31): each training image brightened by a gain in
    # [1, 1 + highlights] and clipped at 255; None = automatic (augment.AUTO_HIGHLIGHTS when the training images leave
    # less than preprocess.HEADROOM_WARN_GAIN of headroom, with the input standardization; else off), 0 = off.
    highlights: float | None = None
    alpha: float = 0.003  # ADTR+ only: weight of the push terms (the paper's)
    topk: int = 20  # ADTR+ only: k of L_img's top-k mean (the paper's)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if data and "highlights" not in data:  # a run stored before the automatic highlights trained without them
            kwargs["highlights"] = 0.0
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def drop_epoch(self) -> int:
        """The epoch count after which the learning rate drops (MultiStepLR milestone)."""
        return max(1, int(round(self.lr_drop_at * self.epochs)))
