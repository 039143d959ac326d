"""anomalib's PaDiM-ResNet18 inference graph, for a speed comparison (issue 27): built in torch, exported to ONNX.

    python benchmarks/padim_graph.py /tmp/padim/model.onnx

As anomalib's Padim (models/image/padim) computes at inference: resnet18 (torchvision's architecture, written out
here: BasicBlock below; torchvision is not a dependency), the features of layer1, layer2
and layer3 at 224 x 224 px (56, 28, 14 px maps), layer2/3 upsampled (nearest) to 56 x 56 and concatenated (448
channels), 100 of them randomly selected (anomalib's n_features for resnet18), the Mahalanobis distance at each of the
3136 positions with that position's mean and inverse covariance (100 x 100), sqrt, the map upsampled (bilinear) to the
image size and Gaussian-blurred (sigma 4, kernel 33, separable, reflect padding), score = the map's max. The graph takes
our input (uint8 N x H x W x 3) and does the ImageNet normalization itself, as our lite0 export does its own.

No download: the backbone has random weights (BatchNorm in eval mode, folded by both runtimes) and the Gaussian statistics are random (a positive-definite inverse
covariance): the operations and shapes, so the cost, are those of a trained PaDiM; its accuracy is not measured here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

N_FEATURES = 100  # anomalib: resnet18 -> 100 random channels of 448
SIGMA = 4.0


class BasicBlock(torch.nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv + BN, ReLU, a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class PadimGraph(torch.nn.Module):
    def __init__(self, size: int = 224, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(3, 2, 1),
        )
        self.layer1 = torch.nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
        self.layer2 = torch.nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.layer3 = torch.nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.size, side = size, size // 4
        self.register_buffer("idx", torch.randperm(448, generator=gen)[:N_FEATURES])
        self.register_buffer("mean", torch.randn(N_FEATURES, side * side, generator=gen))
        a = torch.randn(side * side, N_FEATURES, N_FEATURES, generator=gen) / N_FEATURES
        self.register_buffer("inv_cov", a @ a.transpose(1, 2) + torch.eye(N_FEATURES))
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
        radius = int(4 * SIGMA + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * SIGMA**2))
        self.register_buffer("kernel", (k / k.sum()).view(1, 1, 1, -1))
        self.radius = radius

    def forward(self, image: torch.Tensor):
        x = (image.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        side = f1.shape[-1]
        emb = torch.cat(
            [f1, F.interpolate(f2, size=(side, side), mode="nearest"), F.interpolate(f3, size=(side, side))], 1
        )
        emb = torch.index_select(emb, 1, self.idx)  # (B, 100, 56, 56)
        b = emb.shape[0]
        delta = (emb.reshape(b, N_FEATURES, -1) - self.mean).permute(2, 0, 1)  # (HW, B, C)
        dist = (torch.matmul(delta, self.inv_cov) * delta).sum(2).permute(1, 0)  # (B, HW)
        amap = dist.reshape(b, 1, side, side).clamp(min=0).sqrt()
        amap = F.interpolate(amap, size=(self.size, self.size), mode="bilinear", align_corners=False)
        r = self.radius
        amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), self.kernel)
        amap = F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), self.kernel.transpose(2, 3))
        return amap, amap.amax(dim=(1, 2, 3))


def export_padim(path: Path, size: int = 224) -> Path:
    """PaDiM's graph -> ONNX at `path` (dynamic batch)."""
    model = PadimGraph(size).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            str(path),
            input_names=["image"],
            output_names=["anomaly_map", "score"],
            dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def tail_names(onnx_path: Path) -> list[str]:
    """The nodes after the feature selection (Gather): the Mahalanobis part and the map, kept float by NNCF."""
    import onnx

    from adtr_deploy.export.fp16 import downstream
    from adtr_deploy.export.quant_graph import consumers_of

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sorted(downstream([n for n in graph.node if n.op_type == "Gather"], consumers_of(graph)))


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/padim_graph.py OUT.onnx [--size 224]`: write PaDiM-ResNet18's graph (openvino_levers.py uses it)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    print(export_padim(args.out, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
