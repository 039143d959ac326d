"""Which configuration a training run uses: a new run (a preset), a fine-tuning run (--init-from: the model of an
earlier checkpoint) or a resumed one (--resume: the run's own stored options, ADTR+ anomaly sources included), and the
ADTR+ training set it trains on.

Plain functions the CLI calls once it has parsed its options; mistakes a user can make raise UserError.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adtr_deploy.data.datasets import AnomalyData
from adtr_deploy.errors import UserError
from adtr_deploy.model.checkpoint import read_checkpoint
from adtr_deploy.model.config import ADTRConfig, get_preset
from adtr_deploy.tiling import Tiling, check_requested, parse_tile
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.trainer import CHECKPOINT_NAME, split_validation

PLUS_ONLY = ("synthetic", "anomalies", "external", "alpha", "topk")  # options that only ADTR+ uses
NEW_MODEL_ONLY = ("input_size", "stages")  # options that shape a new model (a checkpoint's model is fixed)


@dataclass(frozen=True)
class PlusSources:
    """ADTR+ anomaly sources as options: synthetic is the --synthetic text (None: the default), anomalies a folder,
    external a --external spec."""

    synthetic: str | None = None
    anomalies: str | None = None
    external: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """What a run trains: how (train), which model (model), on which category, from which ADTR+ sources, and the
    checkpoint it started from (init_from, absolute; on resume the stored one, recorded again, not loaded again)."""

    train: TrainConfig
    model: ADTRConfig
    category: str | None
    plus: PlusSources
    init_from: str | None = None


def check_options(mode: str, given: Collection[str], *, resume: bool, init_from: str | None) -> None:
    """Refuse options that would be silently ignored; `given` names the options (parameter names) on the command line."""
    if mode != "adtr+":
        used = [k for k in PLUS_ONLY if k in given]
        if used:
            raise UserError(f"--{used[0]} only applies to ADTR+; add --mode adtr+")
    model_opts = [k for k in NEW_MODEL_ONLY if k in given]
    if model_opts and (resume or init_from is not None):
        raise UserError(
            f"--{model_opts[0].replace('_', '-')} shapes a new model; with --resume or --init-from the checkpoint's "
            "model is used, so drop it"
        )


def new_run(
    out_dir: Path,
    cfg: TrainConfig,
    category: str | None,
    *,
    overwrite: bool = False,
    init_from: str | None = None,
    preset: str = "lite0",
    weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    stages: tuple[int, ...] | None = None,
    error_metric: str | None = None,
    plus: PlusSources = PlusSources(),
) -> RunPlan:
    """A new run in `out_dir` (refused over an existing run unless `overwrite`): the model of `init_from` (a checkpoint
    or run folder) when given, else the preset shaped by weights/input_size/stages/error_metric."""
    if (out_dir / CHECKPOINT_NAME).exists() and not overwrite:
        raise UserError(
            f"{out_dir} already holds a run; continue it with --resume, or start over with --overwrite or another --out"
        )
    if init_from is not None:
        init_path = Path(init_from)
        init_from = str((init_path / CHECKPOINT_NAME if init_path.is_dir() else init_path).resolve())
        model_cfg = ADTRConfig.from_dict(read_checkpoint(init_from)["config"])
    else:
        model_cfg = get_preset(preset, weights=weights, input_size=input_size, stages=stages, error_metric=error_metric)
    return RunPlan(cfg, model_cfg, category, plus, init_from)


def resumed_run(out_dir: Path, changes: dict[str, Any], category: str | None) -> RunPlan:
    """The interrupted run in `out_dir` with its stored options, model, category and ADTR+ sources; `changes` are the
    TrainConfig fields given again (they take effect, e.g. more --epochs) plus the runtime ones (device, workers)."""
    ckpt = read_checkpoint(out_dir / CHECKPOINT_NAME)
    info = ckpt.get("info", {})
    cfg = TrainConfig.from_dict(info.get("train", {})).replace(**changes)
    stored_plus = info.get("adtr_plus") or {}  # rebuild the same anomaly sources
    plus = PlusSources(
        synthetic=",".join(stored_plus.get("synthetic", [])) or "none",
        anomalies=stored_plus.get("anomalies"),
        external=stored_plus.get("external"),
    )
    if category is None:
        category = info.get("data", {}).get("category")
    return RunPlan(cfg, ADTRConfig.from_dict(ckpt["config"]), category, plus, stored_plus.get("init_from"))


def tiling_for(text: str | None, plan: RunPlan, out_dir: Path, *, resume: bool) -> Tiling | None:
    """adtr-train --tile -> the run's Tiling (None: whole images). A resumed run keeps the tiling it started with
    (resolved, in the checkpoint's info); a different --tile is refused."""
    if resume:
        stored = (read_checkpoint(out_dir / CHECKPOINT_NAME).get("info") or {}).get("tiling")
        model = None if stored is None else Tiling.from_dict(stored, str(out_dir / CHECKPOINT_NAME))
        return check_requested(model, text, f"the run in {out_dir}") if text is not None else model
    return parse_tile(text, plan.model.input_size, plan.model.score_pool)


@dataclass(frozen=True)
class PlusTraining:
    """The ADTR+ training set of a run and the record of its sources (stored in the checkpoint and metrics.json)."""

    dataset: Any  # data.plus_dataset.PlusDataset
    record: dict[str, Any]
    good_images: int

    def train_kwargs(self) -> dict[str, Any]:
        """The arguments of trainer.train that make it train on this set."""
        return {"train_dataset": self.dataset, "extra_info": {"adtr_plus": self.record}}


def plus_training(
    data: AnomalyData, plan: RunPlan, *, extra_good: Sequence[Any] = (), extra_sources: Sequence[Any] = ()
) -> PlusTraining:
    """The ADTR+ training set of `plan` on `data`: its good training images (the trainer's own split, so the
    calibration images stay unseen, then `extra_good`, as trainer.train's extra_good orders them) and the anomalies of
    plan.plus and `extra_sources` (adtr-train --feedback: the review's trained goods and confirmed defects)."""
    from adtr_deploy.data.plus_dataset import build_plus_dataset, parse_synthetic

    cfg = plan.train
    train_idx, _ = split_validation(data.train, cfg)
    normals = [data.train[i] for i in train_idx] + list(extra_good)
    synthetic = None if plan.plus.synthetic is None else parse_synthetic(plan.plus.synthetic)
    dataset, record = build_plus_dataset(
        data,
        normals,
        plan.model.input_size,
        synthetic=synthetic,
        anomalies=plan.plus.anomalies,
        external=plan.plus.external,
        extra_sources=extra_sources,
        seed=cfg.seed,
    )
    record |= {"alpha": cfg.alpha, "k": cfg.topk, "init_from": plan.init_from}
    return PlusTraining(dataset, record, len(normals))
