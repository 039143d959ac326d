"""Fast sweep of the nearest-neighbour ceiling over token-layout levers (no training): which features can a
reconstruction model on this backbone separate at all? Used to choose what benchmarks/quality_levers.py trains.

Each spec on standard input is STAGES:STRIDE:RESIZE:AGG:NORM:BLUR:POOL, e.g. 1234:16:area:1:raw:0:16 =
stages 1-4 on the stride-16 grid, finer stages averaged (area) or resampled (bilinear), AGG x AGG local averaging of
each stage first (AGGp: zero-padded at the border, as PatchCore's unfold), NORM raw | z (per-channel standardized) | stage (each stage scaled to unit mean token norm) | maha
(not kNN: the Mahalanobis distance to one Gaussian of all training tokens, shrink 0.001 as the model's error metric;
what the trained transformer's Mahalanobis error came within a point or two of on grass and brick) | maharing (maha
standardized per ring of tokens at the same distance to the border by the training tokens' distances, as the model's
border standardization), map blur
sigma, image score = max of the POOL x POOL average-pooled map. Backbone lite0 (stages 1-5 computed once).

    echo "1234:16:area:1:raw:0:16 123:16:area:1:raw:0:16" | python benchmarks/knn_levers.py grass 224 DEMO_ROOT [BACKBONE]

Prints one line per spec: image AUROC, pixel AUROC, per-defect image AUROC (%). The recorded runs are in
benchmarks/results/knn_levers.md.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import gaussian_distance, nearest_training_distance, standardize_by_ring

from adtr_deploy.data.datasets import image_loader, open_dataset
from adtr_deploy.metrics import image_auroc, pixel_auroc
from adtr_deploy.model.adtr import ADTR, gaussian_kernel
from adtr_deploy.model.config import get_preset
from adtr_deploy.preprocess import load_mask

torch.set_num_threads(2)
cat = sys.argv[1]
size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
data = open_dataset(sys.argv[3] if len(sys.argv) > 3 else "/tmp/demo", cat)
backbone = sys.argv[4] if len(sys.argv) > 4 else "efficientnet-lite0"
m = ADTR(get_preset("lite0-classic", input_size=(size, size), backbone=backbone)).eval()


def stages(samples):
    out = [[] for _ in range(5)]
    with torch.no_grad():
        for b in image_loader(samples, (size, size), batch_size=16):
            x = b["image"].permute(0, 3, 1, 2).float() * m.pixel_scale + m.pixel_shift
            for i, f in enumerate(m.backbone.forward_stages(x, (1, 2, 3, 4, 5))):
                out[i].append(f)
    return [torch.cat(o) for o in out]


tr = stages(data.train[:72])
te = stages(data.test)
labels = np.array([s.label for s in data.test])
masks = np.stack([load_mask(s.mask, (size, size)) for s in data.test]).astype(bool)
defs = sorted({s.defect for s in data.test if s.label})


def feats(S, st, grid, resize, agg, pad=False):
    fs = []
    for i in st:
        f = S[i - 1]
        if agg > 1:  # AGGp: zero-padded (border tokens shrink toward 0, as PatchCore's unfold does)
            f = F.avg_pool2d(f, agg, 1, agg // 2, count_include_pad=pad)
        if f.shape[-1] > grid and resize == "area":
            f = F.avg_pool2d(f, f.shape[-1] // grid)
        elif f.shape[-1] != grid:
            f = F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=True)
        fs.append(f)
    return fs


def run(st, stride, resize, agg, norm, blur, pool):
    grid = size // stride
    pad = agg.endswith("p")
    agg = int(agg.rstrip("p"))
    a = feats(tr, st, grid, resize, agg, pad)
    b = feats(te, st, grid, resize, agg, pad)
    if norm == "z":
        A = torch.cat(a, 1)
        mu = A.mean((0, 2, 3), keepdim=True)
        sd = A.std((0, 2, 3), keepdim=True) + 1e-6
        A = (A - mu) / sd
        B = (torch.cat(b, 1) - mu) / sd
    elif norm == "stage":  # each stage's tokens scaled to unit mean norm, so stages weigh alike
        sc = [x.pow(2).sum(1).sqrt().mean() for x in a]
        A = torch.cat([x / s for x, s in zip(a, sc)], 1)
        B = torch.cat([x / s for x, s in zip(b, sc)], 1)
    else:
        A = torch.cat(a, 1)
        B = torch.cat(b, 1)
    if norm.startswith("maha"):
        d = gaussian_distance(A, B)
        if norm == "maharing":  # standardized per distance to the border by the training tokens' own distances
            d = standardize_by_ring(d, gaussian_distance(A, A))
    else:
        d = nearest_training_distance(A, B)
    amap = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=True)
    if blur:
        k = gaussian_kernel(blur)
        p = k.shape[-1] // 2
        amap = F.conv2d(F.pad(amap, (p,) * 4, mode="replicate"), k)
    sc = (F.avg_pool2d(amap, pool, 1) if pool > 1 else amap).amax((1, 2, 3)).numpy()
    pd = []
    for dd in defs:
        sel = np.array([not s.label or s.defect == dd for s in data.test])
        pd.append(f"{dd[:3]} {100 * image_auroc(sc[sel], labels[sel]):.0f}")
    print(
        f"{st} s{stride} {resize} agg{agg}{'p' if pad else ''} {norm} blur{blur} pool{pool}: img {100 * image_auroc(sc, labels):.1f} px {100 * pixel_auroc(amap.numpy()[:, 0], masks):.1f} | "
        + " ".join(pd),
        flush=True,
    )


for spec in sys.stdin.read().split():
    st, stride, resize, agg, norm, blur, pool = spec.split(":")
    run(tuple(int(c) for c in st), int(stride), resize, agg, norm, float(blur), int(pool))
