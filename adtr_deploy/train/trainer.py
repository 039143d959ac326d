"""The ADTR training loop: frozen backbone features cached once, the transformer trained on them, then calibration and
evaluation.

The backbone never changes and training uses no augmentation, so each image's features are computed once and kept on the
training device; an epoch then costs only the transformer (`cache_features=False` recomputes them every step, for
comparison and for data too large to cache). A run folder holds:

    checkpoint.pt       written atomically every `checkpoint_every` epochs, with train_state for --resume
    train_log.jsonl     one line per epoch: epoch, loss, lr, seconds, images_per_s
    metrics.json        test-split metrics when the data has a test split (+ metrics_scores.csv)
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adtr_deploy.calibration import calibrate
from adtr_deploy.data.datasets import AnomalyData, image_loader, load_sample
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_text
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from adtr_deploy.model.config import ADTRConfig
from adtr_deploy.train import distributed
from adtr_deploy.train.evaluate import TorchRunner, check_device, evaluate_runner, predict, write_results
from adtr_deploy.train.losses import loss_for
from adtr_deploy.train.resume import apply_schedule, epoch_of

# Default epochs on the CPU. The paper trains 500 epochs on a GPU; with cached features a lite0 epoch of the demo's 72 images
# takes about 13 s on 2 cores, and 30 epochs at batch 4 (600 steps) reach brick's accuracy (see docs/train.md).
DEFAULT_EPOCHS = 30
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
METRICS_NAME = "metrics.json"


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
    cache_features: bool = True
    cache_dtype: str = "float32"  # or "float16": half the cache memory, features rounded to fp16
    workers: int = 0  # DataLoader worker processes for image decoding
    eval_batch_size: int = 32
    checkpoint_every: int = 1
    mode: str = "adtr"  # selects the loss (train/losses.py)
    standardize_features: bool = True  # standardize the transformer's tokens (see init_feature_standardization)
    alpha: float = 0.003  # ADTR+ only: weight of the push terms (the paper's)
    topk: int = 20  # ADTR+ only: k of L_img's top-k mean (the paper's)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def drop_epoch(self) -> int:
        """The epoch count after which the learning rate drops (MultiStepLR milestone)."""
        return max(1, int(round(self.lr_drop_at * self.epochs)))


def split_validation(samples: tuple[Sample, ...] | list[Sample], cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) split of the training images into (train indices, calibration indices)."""
    n = len(samples)
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction {cfg.val_fraction} must be between 0 and 1 (e.g. 0.1)")
    n_val = max(cfg.min_val_images, int(round(cfg.val_fraction * n)))
    if n - n_val < 1:
        raise UserError(
            f"only {n} training images: {n_val} are held out for calibration, so at least {n_val + 1} are needed; "
            "add good images"
        )
    perm = np.random.default_rng(cfg.seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the loop may touch, as tensors and plain data (the checkpoint must load with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


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


class _Log:
    """train_log.jsonl: on resume, lines after the checkpoint's epoch are dropped (those epochs run again), and so is a
    torn last line left by a crash mid-write."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() and keep_until > 0 else []
        kept = [ln for ln in lines if epoch_of(ln) is not None and epoch_of(ln) <= keep_until]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _write_calibration_images(samples: list[Sample], folder: Path) -> list[str]:
    """Absolute paths of the calibration images; samples without a file (CIFAR) are written there as lossless PNGs."""
    import cv2

    paths = []
    for i, s in enumerate(samples):
        if s.pixels is None:
            paths.append(str(Path(s.path).resolve()))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"val_{i:05d}.png"
        cv2.imwrite(str(p), np.ascontiguousarray(s.pixels[..., ::-1]))  # RGB -> BGR for OpenCV
        paths.append(str(p.resolve()))
    return paths


def train(
    model_cfg: ADTRConfig,
    cfg: TrainConfig,
    data: AnomalyData,
    out_dir: str | Path,
    *,
    resume: bool = False,
    evaluate: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    init_from: str | Path | None = None,
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Train ADTR on `data`, calibrate on held-out good images, evaluate on the test split; returns the checkpoint path.

    With `resume`, continue from out_dir/checkpoint.pt (its weights, optimizer, scheduler, RNG states and epoch): the
    result equals that of an uninterrupted run. `on_epoch_end` receives each epoch's log record (tests use it to
    interrupt a run).

    Hooks for other training modes (ADTR+): `train_dataset` replaces the cached training images with a Dataset whose
    items are dicts (image, and e.g. mask/label) stacked by torch's default collate, shuffled per epoch and given
    `set_epoch(epoch)` when it has one; the loss of `cfg.mode` receives each batch. `init_from` starts from the weights
    of an earlier checkpoint (fine-tuning) instead of a fresh transformer. `extra_info` (e.g. {"adtr_plus": ...}) is
    stored in the checkpoint's info and in metrics.json.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    check_device(cfg.device)
    if cfg.epochs < 1:
        raise UserError(f"--epochs {cfg.epochs} must be at least 1")
    w = distributed.world()  # rank 0 of 1 unless launched by torchrun (see train/distributed.py)
    device = distributed.rank_device(cfg.device, w)
    loss_fn = loss_for(cfg)
    train_idx, val_idx = split_validation(data.train, cfg)
    train_samples = [data.train[i] for i in train_idx]
    val_samples = [data.train[i] for i in val_idx]
    data_order = {"train": [str(s.path) for s in train_samples], "val": [str(s.path) for s in val_samples]}

    state = None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        state = ckpt.get("train_state")
        if not state:
            raise UserError(f"{ckpt_path} has no training state to resume from; start a new run without --resume")
        if state["data_order"] != data_order:
            raise UserError(
                f"the training images differ from those of the run in {out_dir} (or --seed/--val-fraction changed); "
                "resume with the same data and options, or start a new run"
            )
        model = model_from_checkpoint(ckpt)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Seed before building: the transformer's initial weights come from the torch RNG.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = ADTR(model_cfg)
        if init_from is not None:
            model.load_state_dict(read_checkpoint(init_from)["state_dict"], strict=True)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[cfg.drop_epoch], gamma=cfg.lr_drop)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        if start > cfg.epochs:
            raise UserError(f"the run in {out_dir} already trained {start} epochs, more than --epochs {cfg.epochs}")
        apply_schedule(opt, sched, cfg, start)

    info = {
        "data": data.info(),
        "train": cfg.to_dict(),
        "split": {"train_images": len(train_samples), "calibration_images": len(val_samples)},
        **(extra_info or {}),
    }
    if w.distributed:
        info["world_size"] = w.size
    log = _Log(out_dir / LOG_NAME, keep_until=start) if w.is_main else None  # only rank 0 writes
    use_cache = cfg.cache_features and train_dataset is None
    # Distributed: each rank caches only its own shard (row k holds item rank + k * world, see local_batches).
    shard = distributed.shard_indices(len(train_samples), w)
    if w.distributed and len(shard) == 0:
        raise UserError(f"only {len(train_samples)} training images for {w.size} processes; use fewer processes")
    cached = [train_samples[i] for i in shard]
    show = cfg.progress and w.is_main
    cache = cache_features(model, cached, cfg, device, progress=show) if use_cache else None
    if state is None and init_from is None and cfg.standardize_features:
        init_feature_standardization(model, cache, cached, cfg, device)
    reconstruct = distributed.ddp_reconstruct(model, device) if w.distributed else model.reconstruct
    for s in val_samples:  # decode the calibration images now: a corrupt one fails the run before training, not after
        load_sample(s, model.cfg.input_size)
    if state is not None:
        _set_rng_state(state["rng"], device)  # after caching: nothing random happens before the next epoch

    def checkpoint(epoch: int, **extra: Any) -> None:
        if not w.is_main:
            return
        train_state = {
            "epoch": epoch,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(device),
            "data_order": data_order,
        }
        save_checkpoint(ckpt_path, model, mode=cfg.mode, train_state=train_state, info=info, **extra)

    from tqdm import tqdm

    bar = tqdm(total=cfg.epochs, initial=start, desc="train", unit="epoch", disable=not show)
    epoch = start
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            n_items = len(train_dataset) if train_dataset is not None else len(train_samples)
            order = epoch_order(n_items, cfg.seed, epoch)
            total, seen = 0.0, 0
            if w.distributed:
                torch.manual_seed(distributed.rank_seed(cfg.seed, epoch, w))  # per-rank dropout masks
                batches = _rank_batches(order, epoch, cache, cached, train_dataset, model, cfg, device, w)
            elif cache is not None:
                batches = (
                    {"index": idx, "label": torch.zeros_like(idx), "features": cache[idx.to(device)].float()}
                    for idx in order.split(cfg.batch_size)
                )
            elif train_dataset is not None:
                if hasattr(train_dataset, "set_epoch"):
                    train_dataset.set_epoch(epoch)
                batches = torch.utils.data.DataLoader(
                    train_dataset,
                    batch_size=cfg.batch_size,
                    sampler=order.tolist(),
                    num_workers=cfg.workers,
                    generator=torch.Generator().manual_seed(0),
                )
            else:
                batches = image_loader(
                    train_samples, model.cfg.input_size, batch_size=cfg.batch_size, workers=cfg.workers, order=order
                )
            steps = tqdm(
                batches,
                total=math.ceil(n_items / cfg.batch_size),
                desc=f"epoch {epoch}",
                unit="batch",
                leave=False,
                disable=not show,
            )
            for batch in steps:
                weight = batch.pop("loss_weight", 1.0)  # distributed: local share of the global batch
                loss = _step(model, batch, loss_fn, opt, scaler, params, cfg, device, use_amp, reconstruct, weight)
                n = len(batch["features"] if "features" in batch else batch["image"]) if weight else 0
                total, seen = total + loss * n, seen + n
                steps.set_postfix(loss=f"{loss:.4g}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            total, seen = distributed.all_reduce_sum([total, seen], device)  # the global epoch (identity on 1)
            lr = opt.param_groups[0]["lr"]
            sched.step()
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
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                checkpoint(epoch)
            if log is not None:
                log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(
            f"training interrupted; {ckpt_path} holds the last complete checkpoint, continue with --resume"
        ) from None
    bar.close()
    del cache
    if not w.is_main:
        distributed.barrier()  # rank 0 calibrates, evaluates and writes; the others wait for its checkpoint
        return ckpt_path

    # Calibration: raw scores and maps of held-out good images -> normalization statistics and a default threshold.
    runner = TorchRunner(model, device)
    val = predict(runner, val_samples, batch_size=cfg.eval_batch_size, workers=cfg.workers, keep_maps=True)
    calibration = calibrate(val.scores, val.maps)
    info["calibration_images"] = _write_calibration_images(val_samples, out_dir / "calibration_images")
    checkpoint(cfg.epochs, calibration=calibration)

    if evaluate and data.has_test:
        metrics, scores = evaluate_runner(
            runner, data, batch_size=cfg.eval_batch_size, workers=cfg.workers, progress=cfg.progress
        )
        metrics = {"model": str(ckpt_path.resolve()), "mode": cfg.mode, **(extra_info or {}), **metrics}
        write_results(metrics, data.test, scores, out_dir / METRICS_NAME)
        checkpoint(cfg.epochs, calibration=calibration, metrics=metrics)
    distributed.barrier()
    return ckpt_path


def _step(
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


def _rank_batches(order, epoch, cache, cached, train_dataset, model, cfg: TrainConfig, device, w: distributed.World):
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
