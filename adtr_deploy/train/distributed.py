"""Data-parallel training with PyTorch DistributedDataParallel, launched by `torchrun` (NCCL on GPUs, gloo on CPU).

We build no distribution of our own: torchrun starts the processes and sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; this
module joins its process group, shards the data and wraps the transformer (the only trained part) in DDP.

Sharding keeps the single-process optimization. Every rank owns a fixed, strided shard of the training images
(`shard_indices`: i % world == rank) and caches only their features. Each epoch the GLOBAL order is the same shuffled
permutation a single process uses; it is cut into global batches of --batch-size, and each rank takes the items of the
batch it owns (`local_batches`). A rank's loss is weighted by local/global batch size x world, so DDP's gradient average
equals the gradient of the global batch mean: the same command gives the same updates at any world size, up to the
order of float additions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adtr_deploy.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank 0 of 1 when not distributed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or torch.distributed.run) for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current world: from the initialized process group, else single-process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def is_main() -> bool:
    return world().is_main


def setup(device: str) -> World:
    """Join torchrun's process group when launched by it (NCCL for CUDA, gloo for CPU); a no-op otherwise."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun / --nproc")
    cuda = str(device).startswith("cuda")
    if cuda:
        # One GPU per process: the process's LOCAL_RANK picks it (set before NCCL touches a device).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return world()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if world().distributed:
        dist.barrier()


def rank_device(device: str, w: World) -> torch.device:
    """The device of this rank: plain 'cuda' becomes cuda:LOCAL_RANK in a distributed run."""
    dev = torch.device(device)
    if dev.type == "cuda" and w.distributed and dev.index is None:
        return torch.device("cuda", w.local_rank)
    return dev


def shard_indices(n: int, w: World) -> list[int]:
    """The items rank `w.rank` owns: a fixed strided shard (i % size == rank), disjoint and covering 0..n-1."""
    return list(range(w.rank, n, w.size))


def local_batches(order: torch.Tensor, batch_size: int, w: World) -> list[tuple[torch.Tensor, int]]:
    """Cut the global epoch `order` into global batches; for each, (the items this rank owns, the global batch size).

    Every rank gets the same number of entries (DDP needs every rank in every step); an entry may be empty.
    """
    return [(idx[idx % w.size == w.rank], len(idx)) for idx in order.split(batch_size)]


def loss_weight(n_local: int, n_global: int, w: World) -> float:
    """Weight of a rank's batch-mean loss so that DDP's average of gradients is the gradient of the global mean."""
    return n_local * w.size / n_global


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum plain numbers over ranks (float64, so epoch losses add exactly enough); identity when not distributed."""
    if not world().distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def ddp_reconstruct(model: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.reconstruct` with its transformer wrapped in DDP (the backbone is frozen and stays outside).

    The model keeps its own transformer (checkpoints keep their keys); the DDP wrapper shares its parameters and
    averages their gradients during backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model.transformer, device_ids=ids)  # the transformer has no buffers
    grid = model.cfg.grid

    def reconstruct(features: torch.Tensor) -> torch.Tensor:
        # Same reshapes as ADTR.reconstruct, with the transformer call going through DDP.
        tokens = features.flatten(2).transpose(1, 2)  # (N, hw, C)
        rec = ddp(tokens)  # (N, hw, C)
        return rec.transpose(1, 2).unflatten(2, grid)  # (N, C, h, w)

    return reconstruct


def rank_seed(seed: int, epoch: int, w: World) -> int:
    """Torch seed of a rank's epoch in a distributed run: ranks draw different dropout masks, and a resumed run the
    same ones as an uninterrupted run (a function of seed, epoch and rank only)."""
    return (seed * 1_000_003 + epoch) * 4096 + w.rank + 1
