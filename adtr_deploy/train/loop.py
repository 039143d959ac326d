"""One training epoch: this process's batches in the epoch's order (cached features, decoded images or a training
Dataset; its share of every global batch when distributed) and the optimization step."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from adtr_deploy.data.datasets import image_loader
from adtr_deploy.errors import UserError
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.train import distributed
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.features import TrainingSet


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass
class Optimizer:
    """What an optimization step updates: the trainable parameters, AdamW, its lr schedule and the AMP scaler."""

    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler
    use_amp: bool


def run_epoch(
    epoch: int,
    model: ADTR,
    data: TrainingSet,
    optim: Optimizer,
    loss_fn: Any,
    reconstruct: Any,
    cfg: TrainConfig,
    device: torch.device,
    w: distributed.World,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one epoch; returns its log record (epoch, loss, lr, seconds, images_per_s), over all processes."""
    from tqdm import tqdm

    model.train()
    t0 = time.perf_counter()
    order = epoch_order(len(data), cfg.seed, epoch)
    total, seen = 0.0, 0
    batches = epoch_batches(data, order, epoch, model, cfg, device, w)
    steps = tqdm(
        batches,
        total=math.ceil(len(data) / cfg.batch_size),
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=not progress,
    )
    for batch in steps:
        weight = batch.pop("loss_weight", 1.0)  # distributed: local share of the global batch
        o = optim
        loss = train_step(model, batch, loss_fn, o.opt, o.scaler, o.params, cfg, device, o.use_amp, reconstruct, weight)
        n = len(batch["features"] if "features" in batch else batch["image"]) if weight else 0
        total, seen = total + loss * n, seen + n
        steps.set_postfix(loss=f"{loss:.4g}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    total, seen = distributed.all_reduce_sum([total, seen], device)  # the global epoch (identity on 1)
    lr = optim.opt.param_groups[0]["lr"]
    optim.sched.step()
    seconds = time.perf_counter() - t0
    record = {
        "epoch": epoch,
        "loss": total / seen,
        "lr": lr,
        "seconds": round(seconds, 4),
        "images_per_s": round(seen / seconds, 2),
    }
    if not math.isfinite(record["loss"]):
        raise UserError(f"the loss became {record['loss']} at epoch {epoch}; lower --lr or check the data")
    return record


def epoch_batches(
    data: TrainingSet,
    order: torch.Tensor,
    epoch: int,
    model: ADTR,
    cfg: TrainConfig,
    device: torch.device,
    w: distributed.World,
) -> Iterable[dict[str, Any]]:
    """The batches of one epoch in `order`: this rank's share when distributed, else cached features, the Dataset's
    items or decoded images."""
    if w.distributed:
        torch.manual_seed(distributed.rank_seed(cfg.seed, epoch, w))  # per-rank dropout masks
        return rank_batches(order, epoch, data.cache, data.shard, data.dataset, model, cfg, device, w)
    if data.cache is not None:
        return (
            {"index": idx, "label": torch.zeros_like(idx), "features": data.cache[idx.to(device)].float()}
            for idx in order.split(cfg.batch_size)
        )
    if data.dataset is not None:
        if hasattr(data.dataset, "set_epoch"):
            data.dataset.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            data.dataset,
            batch_size=cfg.batch_size,
            sampler=order.tolist(),
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(0),
        )
    return image_loader(data.samples, model.cfg.input_size, batch_size=cfg.batch_size, workers=cfg.workers, order=order)


def train_step(
    model, batch, loss_fn, opt, scaler, params, cfg: TrainConfig, device, use_amp: bool, reconstruct=None, weight=1.0
) -> float:
    """One optimization step; the loss function sees (features, reconstruction, batch)."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        feats = batch.get("features")
        if feats is None:
            with torch.no_grad():
                feats = model.forward_features(batch["image"])
        rec = (reconstruct or model.reconstruct)(feats)
        loss = loss_fn(feats, rec, batch)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * weight).backward()  # weight: distributed share (1.0 on one process)
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())


def rank_batches(order, epoch, cache, cached, train_dataset, model, cfg: TrainConfig, device, w: distributed.World):
    """This rank's part of every global batch of `order` (distributed runs), each with its `loss_weight`.

    A rank that owns no item of a batch still steps (DDP needs every rank in every backward): it repeats its first item
    with weight 0. Items come from the rank's feature cache (row = index // world), its images, or `train_dataset`.
    """
    plan = []
    for idx, n_global in distributed.local_batches(order, cfg.batch_size, w):
        weight = distributed.loss_weight(len(idx), n_global, w)
        plan.append((idx if len(idx) else torch.tensor([w.rank]), weight))
    if cache is not None:
        for idx, weight in plan:
            rows = (idx // w.size).to(device)
            yield {"index": idx, "label": torch.zeros_like(idx), "features": cache[rows].float(), "loss_weight": weight}
        return
    if train_dataset is not None:
        if hasattr(train_dataset, "set_epoch"):
            train_dataset.set_epoch(epoch)
        dataset, collate_fn, batch_sampler = train_dataset, None, [idx.tolist() for idx, _ in plan]
    else:
        from adtr_deploy.data.datasets import ImageDataset, collate

        dataset, collate_fn = ImageDataset(cached, model.cfg.input_size), collate
        batch_sampler = [(idx // w.size).tolist() for idx, _ in plan]  # positions in this rank's shard
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(0),
        **({"collate_fn": collate_fn} if collate_fn else {}),
    )
    for batch, (_, weight) in zip(loader, plan):
        batch["loss_weight"] = weight
        yield batch
