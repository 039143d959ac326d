"""Resuming a training run honestly: options given with --resume take effect, and a crash's torn log line is skipped.

Kept apart from the trainer so the resume rules read in one place.
"""

from __future__ import annotations

import collections
import json
from typing import Any


def apply_schedule(opt: Any, sched: Any, cfg: Any, epoch: int) -> None:
    """On resume, the learning rate and its drop come from `cfg`, not the checkpoint: `--resume --lr/--epochs` take
    effect (the log records what is applied; Adam's moments are kept). Unchanged options restore exactly what was
    saved: MultiStepLR's lr after `epoch` steps is lr * lr_drop ** (number of milestones <= epoch)."""
    sched.milestones = collections.Counter([cfg.drop_epoch])
    sched.gamma = cfg.lr_drop
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    lr = cfg.lr * cfg.lr_drop ** int(epoch >= cfg.drop_epoch)
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = lr
    sched._last_lr = [lr for _ in opt.param_groups]


def epoch_of(line: str) -> int | None:
    """The epoch of one train_log.jsonl line, or None for a line that is not a whole JSON record (torn by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(record.get("epoch", 0)) if isinstance(record, dict) else None
