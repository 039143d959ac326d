"""Block-wise Mahalanobis, the no-training proxy (the features' Gaussian, stages 1-4 of the default lite0, shrink 0.001):
the full norm against the stages 1-3 block (80 channels) and the stage-4 block (112) each standardized as a chi-square
and combined by max or sum. Recorded in benchmarks/results/knn_levers.md ("Block-wise Mahalanobis").

    python benchmarks/maha_blocks.py grass DEMO_ROOT
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import gaussian_distance

from adtr_deploy.data.datasets import image_loader, open_dataset
from adtr_deploy.metrics import image_auroc, pixel_auroc
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.config import get_preset
from adtr_deploy.preprocess import load_mask

torch.set_num_threads(2)
cat, root = sys.argv[1], sys.argv[2]
data = open_dataset(root, cat)
m = ADTR(get_preset("lite0", pretrained=True)).eval()


def feats(samples):
    with torch.no_grad():
        return torch.cat([m.forward_features(b["image"]) for b in image_loader(samples, (224, 224), batch_size=16)])


A, B = feats(data.train[:72]), feats(data.test)
labels = np.array([s.label for s in data.test])
masks = np.stack([load_mask(s.mask, (224, 224)) for s in data.test]).astype(bool)


def maha2(A, B, sl):
    """Squared distance of B's tokens to the Gaussian of A's over the channel block `sl`, and the block's width."""
    return gaussian_distance(A[:, sl], B[:, sl])[:, 0].double() ** 2, sl.stop - sl.start


def score(d):
    amap = F.interpolate(d.unsqueeze(1).float(), size=(224, 224), mode="bilinear", align_corners=True)
    sc = F.avg_pool2d(amap, 16, 1).amax((1, 2, 3)).numpy()
    return 100 * image_auroc(sc, labels), 100 * pixel_auroc(amap.numpy()[:, 0], masks)


full, C = maha2(A, B, slice(0, 192))
d1, c1 = maha2(A, B, slice(0, 80))
d2, c2 = maha2(A, B, slice(80, 192))
z1 = (d1 - c1) / (2 * c1) ** 0.5
z2 = (d2 - c2) / (2 * c2) ** 0.5
for name, d in [
    ("full", full.sqrt()),
    ("max-z", torch.maximum(z1, z2)),
    ("sum-z", z1 + z2),
    ("123 only", d1.sqrt()),
    ("4 only", d2.sqrt()),
]:
    i, p = score(d)
    print(f"{cat} {name}: img {i:.1f} px {p:.1f}", flush=True)
