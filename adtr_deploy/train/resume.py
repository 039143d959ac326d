"""Resuming a training run honestly: options given with --resume take effect, every RNG continues where it stopped, and
a crash's torn log line is skipped.

Kept apart from the trainer so the resume rules read in one place.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adtr_deploy.fileio import atomic_write_text, dumps_strict


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


def rng_state(device: torch.device) -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainLog:
    """train_log.jsonl: on resume, lines after the checkpoint's epoch are dropped (those epochs run again), and so is a
    torn last line left by a crash mid-write."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() and keep_until > 0 else []
        kept = [ln for ln in lines if epoch_of(ln) is not None and epoch_of(ln) <= keep_until]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(dumps_strict(record) + "\n")  # a NaN loss is null
