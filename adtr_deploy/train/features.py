"""The training set's features: the frozen backbone's features cached once (an epoch then costs only the transformer),
and the standardization of the transformer's tokens set from their statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adtr_deploy.data.datasets import image_loader
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError
from adtr_deploy.model.adtr import ADTR, token_rings
from adtr_deploy.train import distributed
from adtr_deploy.train.augment import PhotometricImages
from adtr_deploy.train.config import TrainConfig

# With photometric augmentation, the error statistics are fitted on this many freshly shifted copies of each image.
PHOTOMETRIC_FIT_PASSES = 3


@torch.no_grad()
def cache_features(model: ADTR, samples, cfg: TrainConfig, device: torch.device, *, progress: bool) -> torch.Tensor:
    """Backbone features of every sample, once: (N, C, h, w) on `device` in cfg.cache_dtype."""
    from tqdm import tqdm

    dtype = {"float32": torch.float32, "float16": torch.float16}.get(cfg.cache_dtype)
    if dtype is None:
        raise ValueError(f"cache dtype {cfg.cache_dtype!r} is not float32 or float16")
    h, w = model.cfg.grid
    cache = torch.empty((len(samples), model.channels, h, w), dtype=dtype, device=device)
    loader = image_loader(samples, model.cfg.input_size, batch_size=cfg.eval_batch_size, workers=cfg.workers)
    for batch in tqdm(loader, desc="caching features", unit="batch", disable=not progress, leave=False):
        cache[batch["index"].to(device)] = model.forward_features(batch["image"].to(device)).to(dtype)
    return cache


@torch.no_grad()
def init_feature_standardization(
    model: ADTR, cache: torch.Tensor | None, samples, cfg: TrainConfig, device: torch.device
) -> None:
    """Set the transformer's standardization buffers to the per-channel mean and std of the training features.

    The backbone's features are not normalized: lite0's channels have means of several units and standard deviations
    from about 0.1 to 10. The transformer's input and output projections are plain linear layers, and AdamW moves each
    weight by about `lr` per step, so at the paper's lr 1e-4 they need thousands of steps just to match those scales
    (measured on the demo data: docs/train.md). With tokens standardized on the way in and the output scaled back by
    std plus mean (the output bias starts at zero, so the reconstruction starts at the mean feature), the steps go to
    what matters, the image-specific reconstruction. The loss and the anomaly map stay in raw feature units (the
    paper's). Over all processes when distributed (each holds a shard), so every rank sets the same values.
    """
    c = model.channels
    total = torch.zeros(2 * c, dtype=torch.float64, device=device)  # sum of x, sum of x^2 per channel
    count = 0

    def add(f: torch.Tensor) -> None:
        f = f.double()
        total[:c] += f.sum(dim=(0, 2, 3))
        total[c:] += (f * f).sum(dim=(0, 2, 3))

    if cache is not None:
        for part in cache.split(64):
            add(part)
        count = cache.shape[0] * cache.shape[2] * cache.shape[3]
    else:
        loader = image_loader(samples, model.cfg.input_size, batch_size=cfg.eval_batch_size, workers=cfg.workers)
        for batch in loader:
            f = model.forward_features(batch["image"].to(device))  # (B, C, h, w)
            add(f)
            count += f.shape[0] * f.shape[2] * f.shape[3]
    sums = distributed.all_reduce_sum([*total.tolist(), float(count)], device)
    n = max(sums[-1], 1.0)
    mean = torch.tensor(sums[:c], dtype=torch.float64) / n
    var = (torch.tensor(sums[c : 2 * c], dtype=torch.float64) / n - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    # A channel that never varies (a dead unit) must not divide by ~0: floor at 1e-3 of the typical std.
    std = std.clamp_min(max(float(std.mean()) * 1e-3, 1e-6))
    t = model.transformer
    t.feature_mean.copy_(mean.to(t.feature_mean))
    t.feature_std.copy_(std.to(t.feature_std))
    t.output_proj.bias.zero_()


@torch.no_grad()
def fit_input_reference(model: ADTR, samples, cfg: TrainConfig, device: torch.device) -> None:
    """cfg.input_norm "image": the reference statistics every image is mapped onto, the mean over the training images
    of each image's per-channel mean and std (pixel units), over all processes when distributed."""
    sums = torch.zeros(7, dtype=torch.float64)  # sum of per-image means (3), of per-image stds (3), image count
    loader = image_loader(samples, model.cfg.input_size, batch_size=cfg.eval_batch_size, workers=cfg.workers)
    for batch in loader:
        x = batch["image"].double().permute(0, 3, 1, 2)  # (B, 3, H, W), 0..255
        sums[:3] += x.mean(dim=(2, 3)).sum(dim=0)
        sums[3:6] += x.std(dim=(2, 3), unbiased=False).sum(dim=0)
        sums[6] += x.shape[0]
    total = distributed.all_reduce_sum(sums.tolist(), device)
    n = max(total[6], 1.0)
    model.set_input_reference(torch.tensor(total[:3]) / n, torch.tensor(total[3:6]) / n)


@dataclass
class TrainingSet:
    """Where an epoch's batches come from: the training samples, this process's shard of them (all of them on one
    process; shard row k holds item rank + k * world, see distributed.local_batches) with their cached features, or a
    Dataset that replaces them (ADTR+)."""

    samples: list[Sample]
    shard: list[Sample]
    cache: torch.Tensor | None = None
    dataset: torch.utils.data.Dataset | None = None

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.samples)


def training_set(
    model: ADTR,
    samples: list[Sample],
    cfg: TrainConfig,
    device: torch.device,
    w: distributed.World,
    *,
    dataset: torch.utils.data.Dataset | None = None,
    standardize: bool = True,
    progress: bool = False,
) -> TrainingSet:
    """The training set of this process: features cached once when cfg.cache_features (never with a `dataset`, whose
    items change every epoch); with `standardize`, the model's token standardization set from them."""
    shard_idx = distributed.shard_indices(len(samples), w)
    if w.distributed and len(shard_idx) == 0:
        raise UserError(f"only {len(samples)} training images for {w.size} processes; use fewer processes")
    shard = [samples[i] for i in shard_idx]
    use_cache = cfg.cache_features and dataset is None
    if standardize and model.input_ref_mean is not None:  # before any feature is computed: they depend on it
        fit_input_reference(model, shard, cfg, device)
    cache = cache_features(model, shard, cfg, device, progress=progress) if use_cache else None
    if standardize:
        init_feature_standardization(model, cache, shard, cfg, device)
    return TrainingSet(samples, shard, cache, dataset)


@torch.no_grad()
def fit_error_metric(model: ADTR, training: TrainingSet, cfg: TrainConfig, device: torch.device) -> dict | None:
    """After training, what the map's error needs from good images, summed over DDP ranks (this process's shard):

    - cfg.error_metric "mahalanobis": the residual's mean and channel covariance over every token of the training
      images set the model's error whitening (ADTR.set_error_statistics);
    - cfg.border_rings > 0: then, each border ring's error mean and std (ADTR.set_border_statistics), after the
      whitening because the errors depend on it. The residuals of the first pass are kept for it (the size of the
      feature cache), so the backbone and the transformer run once.

    From the cached features when there are some, else from the good training images (ADTR+ trains on a dataset of
    synthetic anomalies; the statistics describe good images only). In eval mode: dropout off, as at inference.
    Returns what was fitted for the checkpoint's info; None when there is nothing to fit (the paper's L2, no rings).
    """
    mcfg = model.cfg
    if mcfg.error_metric != "mahalanobis" and mcfg.border_rings == 0:
        return None
    was_training = model.training
    model.eval()

    def feature_batches():
        if training.cache is not None:
            yield from (part.float() for part in training.cache.split(cfg.eval_batch_size))
            return
        if isinstance(training.dataset, PhotometricImages):  # good images only, under several fresh light changes
            mine = torch.tensor(distributed.shard_indices(len(training.dataset), distributed.world()))
            for p in range(PHOTOMETRIC_FIT_PASSES):
                training.dataset.set_epoch(10**6 + p)  # epochs training never draws
                for idx in mine.split(cfg.eval_batch_size):
                    images = torch.stack([training.dataset[int(i)]["image"] for i in idx])
                    yield model.forward_features(images.to(device))
            return
        loader = image_loader(training.shard, mcfg.input_size, batch_size=cfg.eval_batch_size, workers=cfg.workers)
        for batch in loader:
            yield model.forward_features(batch["image"].to(device))

    def residual_batches():
        for f in feature_batches():
            yield f - model.reconstruct(f)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if distributed.world().distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    info: dict = {"error_metric": mcfg.error_metric}
    residuals = residual_batches()
    if mcfg.error_metric == "mahalanobis":
        c = model.channels
        sums = torch.zeros(c + c * c + 1, dtype=torch.float64, device=device)  # sum r, sum r r^T, token count
        kept = []
        for res in residuals:
            if mcfg.border_rings > 0:
                kept.append(res)
            r = res.permute(0, 2, 3, 1).reshape(-1, c).double()
            sums[:c] += r.sum(dim=0)
            sums[c:-1] += (r.T @ r).flatten()
            sums[-1] += r.shape[0]
        all_reduce(sums)
        n = float(sums[-1])
        mean = sums[:c] / n
        cov = sums[c:-1].view(c, c) / n - torch.outer(mean, mean)
        model.set_error_statistics(mean.cpu(), cov.cpu())
        info.update(tokens=int(n), shrink=mcfg.error_shrink)
        residuals = iter(kept)
    if mcfg.border_rings > 0:
        ring = token_rings(mcfg.grid, mcfg.border_rings).to(device).flatten()
        k = mcfg.border_rings + 1
        sums = torch.zeros(3, k, dtype=torch.float64, device=device)  # per ring: sum e, sum e^2, token count
        for res in residuals:
            e = model.token_errors(res, torch.zeros_like(res), border=False).flatten(1).double()  # (N, hw)
            sums[0].index_add_(0, ring, e.sum(dim=0))
            sums[1].index_add_(0, ring, e.pow(2).sum(dim=0))
            sums[2].index_add_(0, ring, torch.full_like(e[0], e.shape[0]))
        all_reduce(sums)
        count = sums[2].clamp(min=1)
        mean = sums[0] / count
        std = (sums[1] / count - mean**2).clamp(min=0).sqrt()
        model.set_border_statistics(mean.float().cpu(), std.float().cpu())
        present = sums[2] > 0
        info.update(
            border_rings=mcfg.border_rings,
            ring_mean=[round(float(v), 4) for v in mean[present]],
            ring_std=[round(float(v), 4) for v in std[present]],
        )
    model.train(was_training)
    return info
