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

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adtr_deploy.calibration import calibrate
from adtr_deploy.data.datasets import AnomalyData, load_sample
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.data.tiles import full_image, tile_samples
from adtr_deploy.data.validation import synthetic_defects
from adtr_deploy.errors import UserError
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from adtr_deploy.model.config import ADTRConfig
from adtr_deploy.preprocess import HEADROOM_WARN_GAIN, headroom, headroom_warning, read_image, value_histogram
from adtr_deploy.tiling import Tiling, run_tiled
from adtr_deploy.train import distributed
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.evaluate import TorchRunner, check_device, evaluate_runner, predict, write_results
from adtr_deploy.train.features import TrainingSet, fit_error_metric, training_set
from adtr_deploy.train.loop import Optimizer, run_epoch
from adtr_deploy.train.losses import loss_for
from adtr_deploy.train.resume import TrainLog, apply_schedule, rng_state, set_rng_state

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
METRICS_NAME = "metrics.json"


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
    tiling: Tiling | None = None,
    extra_good: tuple[Sequence[Sample], Sequence[Sample]] = ((), ()),
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

    `tiling` (adtr-train --tile) trains on crops of the training images at native resolution (data/tiles.py), and
    calibrates and evaluates on whole images tiled and stitched (adtr_deploy/tiling.py); it is kept in the
    checkpoint's info, from where adtr-export writes it into model.json.

    `extra_good` = (trained, calibration only): good images beyond data.train, already split (adtr-train --feedback:
    the operator's reviewed goods, train/feedback.py), added after the data's own split on each side.
    """
    out_dir = Path(out_dir)
    check_device(cfg.device)
    if cfg.epochs < 1:
        raise UserError(f"--epochs {cfg.epochs} must be at least 1")
    w = distributed.world()  # rank 0 of 1 unless launched by torchrun (see train/distributed.py)
    device = distributed.rank_device(cfg.device, w)
    loss_fn = loss_for(cfg)
    train_idx, val_idx = split_validation(data.train, cfg)
    train_samples = [data.train[i] for i in train_idx] + list(extra_good[0])
    val_samples = [data.train[i] for i in val_idx] + list(extra_good[1])
    data_order = {"train": [str(s.path) for s in train_samples], "val": [str(s.path) for s in val_samples]}
    room = training_headroom(train_samples, None if tiling is not None else model_cfg.input_size)
    room["highlights"] = highlights = _highlights(cfg, room, model_cfg, tiling, train_dataset)
    warning = headroom_warning(room)
    if w.is_main and warning:
        did = (
            f"; adtr-train therefore trains with clipped highlights (gains up to {1 + highlights:g}; "
            "--augment-highlights 0 turns it off)"
            if cfg.highlights is None and highlights > 0
            else ""
        )
        print(f"warning: {warning}{did}", file=sys.stderr, flush=True)
    if tiling is not None:
        if train_dataset is not None:
            raise UserError(f"--tile trains on crops of good images only; train --mode {cfg.mode} without --tile")
        train_samples, tiling = tile_samples(train_samples, tiling, cfg.seed)

    model, state = _start_model(model_cfg, cfg, out_dir, data_order, resume=resume, init_from=init_from)
    model.to(device)
    optim, start = _optimizer(model, cfg, device, state, out_dir)
    info = {
        "data": data.info(),
        "train": cfg.to_dict(),
        "split": {"train_images": len(train_samples), "calibration_images": len(val_samples)},
        "headroom": room,
        **(extra_info or {}),
        **({"tiling": tiling.to_dict()} if tiling is not None else {}),
    }
    if w.distributed:
        info["world_size"] = w.size
    run = _Run(cfg, out_dir / CHECKPOINT_NAME, model, optim, device, w, info, data_order, tiling)
    log = TrainLog(out_dir / LOG_NAME, keep_until=start) if w.is_main else None  # only rank 0 writes
    show = cfg.progress and w.is_main
    standardize = state is None and init_from is None and cfg.standardize_features
    if (cfg.photometric > 0 or cfg.noise > 0 or highlights > 0) and train_dataset is None:
        from adtr_deploy.train.augment import PhotometricImages

        train_dataset = PhotometricImages(
            train_samples, model.cfg.input_size, cfg.photometric, cfg.seed, cfg.noise, highlights=highlights
        )
    training = training_set(
        model, train_samples, cfg, device, w, dataset=train_dataset, standardize=standardize, progress=show
    )
    reconstruct = distributed.ddp_reconstruct(model, device) if w.distributed else model.reconstruct
    for s in val_samples:  # decode the calibration images now: a corrupt one fails the run before training, not after
        load_sample(s, model.cfg.input_size)
    if state is not None:
        set_rng_state(state["rng"], device)  # after caching: nothing random happens before the next epoch

    _train_epochs(run, training, loss_fn, reconstruct, start, log, on_epoch_end, progress=show)
    fitted = fit_error_metric(model, training, cfg, device)  # every rank: the statistics are summed over them
    if fitted is not None:
        run.info["error_metric"] = fitted
    del training  # frees the feature cache before calibration
    if not w.is_main:
        distributed.barrier()  # rank 0 calibrates, evaluates and writes; the others wait for its checkpoint
        return run.ckpt_path
    _calibrate_and_evaluate(run, data, val_samples, evaluate=evaluate, extra_info=extra_info)
    distributed.barrier()
    return run.ckpt_path


@dataclass
class _Run:
    """The parts of one run that its steps share, and its checkpoint (rank 0 writes it)."""

    cfg: TrainConfig
    ckpt_path: Path
    model: ADTR
    optim: Optimizer
    device: torch.device
    w: distributed.World
    info: dict[str, Any]
    data_order: dict[str, list[str]]
    tiling: Tiling | None = None

    def checkpoint(self, epoch: int, **extra: Any) -> None:
        if not self.w.is_main:
            return
        train_state = {
            "epoch": epoch,
            "optimizer": self.optim.opt.state_dict(),
            "scheduler": self.optim.sched.state_dict(),
            "scaler": self.optim.scaler.state_dict(),
            "rng": rng_state(self.device),
            "data_order": self.data_order,
        }
        save_checkpoint(
            self.ckpt_path, self.model, mode=self.cfg.mode, train_state=train_state, info=self.info, **extra
        )


def _start_model(
    model_cfg: ADTRConfig,
    cfg: TrainConfig,
    out_dir: Path,
    data_order: dict[str, list[str]],
    *,
    resume: bool,
    init_from: str | Path | None,
) -> tuple[ADTR, dict[str, Any] | None]:
    """The model to train and, on resume, the checkpoint's train_state (None for a new run)."""
    if resume:
        ckpt_path = out_dir / CHECKPOINT_NAME
        ckpt = read_checkpoint(ckpt_path)
        state = ckpt.get("train_state")
        if not state:
            raise UserError(f"{ckpt_path} has no training state to resume from; start a new run without --resume")
        if state["data_order"] != data_order:
            raise UserError(
                f"the training images differ from those of the run in {out_dir} (or --seed/--val-fraction changed); "
                "resume with the same data and options, or start a new run"
            )
        return model_from_checkpoint(ckpt), state
    out_dir.mkdir(parents=True, exist_ok=True)
    # Seed before building: the transformer's initial weights come from the torch RNG.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ADTR(model_cfg)
    if init_from is not None:
        model.load_state_dict(read_checkpoint(init_from)["state_dict"], strict=True)
    return model, None


def _optimizer(
    model: ADTR, cfg: TrainConfig, device: torch.device, state: dict[str, Any] | None, out_dir: Path
) -> tuple[Optimizer, int]:
    """AdamW with its lr drop and AMP scaler (restored from `state` on resume) and the epoch to start after."""
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
    return Optimizer(params, opt, sched, scaler, use_amp), start


def _train_epochs(
    run: _Run,
    training: TrainingSet,
    loss_fn: Any,
    reconstruct: Any,
    start: int,
    log: TrainLog | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    *,
    progress: bool,
) -> None:
    """Epochs start+1 .. cfg.epochs, each logged and checkpointed every cfg.checkpoint_every epochs and at the end."""
    from tqdm import tqdm

    cfg, model, w = run.cfg, run.model, run.w
    bar = tqdm(total=cfg.epochs, initial=start, desc="train", unit="epoch", disable=not progress)
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            record = run_epoch(
                epoch, model, training, run.optim, loss_fn, reconstruct, cfg, run.device, w, progress=progress
            )
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                run.checkpoint(epoch)
            if log is not None:
                log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(
            f"training interrupted; {run.ckpt_path} holds the last complete checkpoint, continue with --resume"
        ) from None
    bar.close()


def _defect_scores(runner: TorchRunner, samples: list[Sample], cfg: TrainConfig) -> np.ndarray | None:
    """Scores of synthetic defects drawn on the calibration images (for calibrate's margin), or None when it is off."""
    if cfg.threshold_margin <= 0:
        return None
    tiling, step = runner.tiling, max(1, cfg.eval_batch_size)
    images = synthetic_defects(
        [full_image(s) if tiling else load_sample(s, runner.input_size) for s in samples], cfg.seed
    )
    if tiling is not None:  # drawn on the whole images and scored as the runtime will: tiled and stitched
        return np.asarray([run_tiled(runner.run, image, tiling, step)[1] for image in images], dtype=np.float32)
    return np.concatenate([runner.run(np.stack(images[i : i + step]))[1] for i in range(0, len(images), step)])


def _calibrate_and_evaluate(
    run: _Run, data: AnomalyData, val_samples: list[Sample], *, evaluate: bool, extra_info: dict[str, Any] | None
) -> None:
    """Rank 0, after training: calibrate on the held-out good images, then evaluate on the test split when asked and
    there is one; each result is saved in the checkpoint (and metrics.json)."""
    cfg, out_dir = run.cfg, run.ckpt_path.parent
    # Calibration: raw scores and maps of held-out good images -> normalization statistics and a default threshold.
    runner = TorchRunner(run.model, run.device, tiling=run.tiling)  # tiled: whole images, tiled and stitched
    val = predict(runner, val_samples, batch_size=cfg.eval_batch_size, workers=cfg.workers, keep_maps=True)
    calibration = calibrate(
        val.scores, val.maps, defect_scores=_defect_scores(runner, val_samples, cfg), margin=cfg.threshold_margin
    )
    run.info["calibration_images"] = _write_calibration_images(val_samples, out_dir / "calibration_images")
    run.checkpoint(cfg.epochs, calibration=calibration)

    if evaluate and data.has_test:
        metrics, scores = evaluate_runner(
            runner, data, batch_size=cfg.eval_batch_size, workers=cfg.workers, progress=cfg.progress
        )
        metrics = {"model": str(run.ckpt_path.resolve()), "mode": cfg.mode, **(extra_info or {}), **metrics}
        write_results(metrics, data.test, scores, out_dir / METRICS_NAME)
        run.checkpoint(cfg.epochs, calibration=calibration, metrics=metrics)


def training_headroom(samples: Sequence[Sample], size: tuple[int, int] | None) -> dict:
    """How much brighter the light can get before the training images' brightest values clip (preprocess.headroom),
    over the good images at the model's input size, or at their own (`size` None: a tiled model sees its images' own
    pixels, whose small highlights a resize to the input size would average away): adtr-train warns when it is less
    than the drift goal's +15 %."""
    hist = np.zeros((3, 256), dtype=np.int64)
    for s in samples:
        image = load_sample(s, size) if size is not None or s.pixels is not None else read_image(s.path)
        hist += value_histogram(image)
    return headroom(hist)


def _highlights(cfg: TrainConfig, room: dict, model_cfg: ADTRConfig, tiling, dataset) -> float:
    """The highlight augmentation's strength: cfg.highlights when given; automatically augment.AUTO_HIGHLIGHTS for
    training images with less headroom than HEADROOM_WARN_GAIN under the input standardization (which undoes the gain,
    so only the clipping is learned), on whole images (not tiles, not ADTR+'s own dataset); else 0."""
    from adtr_deploy.train.augment import AUTO_HIGHLIGHTS

    if cfg.highlights is not None:
        return float(cfg.highlights)
    low = room["gain"] < HEADROOM_WARN_GAIN
    return AUTO_HIGHLIGHTS if low and model_cfg.input_norm == "image" and tiling is None and dataset is None else 0.0
