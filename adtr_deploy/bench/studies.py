"""What the accuracy and speed studies in benchmarks/ share: the reproduce line, the machine record, the result files,
and the training-free reference detectors their tables put beside the trained transformer.

The detectors score per-token distances on the model's own features (`ADTR.forward_features`) and turn them into a map
and an image score through the model's own `ADTR.map_and_score` (`score_tokens`), so a reference column and the
model's column differ only in the per-token distance. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adtr_deploy.fileio import atomic_write_text, write_json_atomic


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: `python benchmarks/<script> <its arguments>`."""
    return f"python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])


def machine(**extra: Any) -> dict:
    """The machine a study ran on, with the load at its end (these machines are shared: a figure needs its load)."""
    return {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0], "platform": platform.platform(), **extra}


def write_result(result: dict, out: str | Path, markdown: Callable[[dict], str]) -> dict:
    """OUT (strict JSON) and OUT with .md (the table), each written atomically; the table is printed too."""
    out = Path(out)
    write_json_atomic(result, out)
    table = markdown(result)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    return result


def pct(fraction: float | None) -> str:
    """A fraction as a table cell in percent with one decimal; "-" when there is none."""
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def score_tokens(model, err) -> tuple[Any, Any]:
    """(N, 1, h, w) per-token scores -> numpy map (N, H, W) and image scores (N,), exactly as the model scores its own
    error (`ADTR.map_and_score`: upsampling, optional blur, the pooled maximum)."""
    import torch

    with torch.no_grad():
        amap, score = model.map_and_score(err)
    return amap[:, 0].numpy(), score.numpy()


def nearest_training_distance(f_train, f_test):
    """(N, C, h, w) training and test features -> (M, 1, h, w): each test token's L2 distance to the nearest training
    token of any position (the PatchCore/SPADE idea; the best these features do without learning)."""
    import torch

    n, c, h, w = f_train.shape
    bank = f_train.permute(0, 2, 3, 1).reshape(-1, c)
    query = f_test.permute(0, 2, 3, 1).reshape(-1, c)
    return torch.cat([torch.cdist(q, bank).min(dim=1).values for q in query.split(1024)]).reshape(-1, 1, h, w)


def gaussian_distance(f_train, f_test, shrink: float = 0.001):
    """(N, C, h, w) training and test features -> (M, 1, h, w): each test token's Mahalanobis distance to one Gaussian
    of all training tokens (any position; PaDiM without positions), with the model's whitening and shrinkage
    (model/adtr.py `whitening`): the no-transformer reference of the Mahalanobis error."""
    import torch

    from adtr_deploy.model.adtr import whitening

    c = f_train.shape[1]
    x = f_train.permute(0, 2, 3, 1).reshape(-1, c).double()
    z = (f_test.permute(0, 2, 3, 1).double() - x.mean(dim=0)) @ whitening(torch.cov(x.T, correction=0), shrink)
    return torch.linalg.vector_norm(z, dim=-1).unsqueeze(1).float()


def standardize_by_ring(d, d_train, inner: int = 3):
    """(M, 1, h, w) token scores standardized by the mean and std of the training images' scores (N, 1, h, w) in the
    same ring (tokens at the same distance to the border, the interior as one: model/adtr.py `token_rings`). The
    model's border standardization up to one affine map of all tokens, so AUROCs are the same."""
    from adtr_deploy.model.adtr import token_rings

    ring = token_rings(tuple(d.shape[-2:]), inner)
    out = d.clone()
    for r in ring.unique():
        sel = ring == r
        ref = d_train[..., sel]
        out[..., sel] = (d[..., sel] - ref.mean()) / (ref.std() + 1e-6)
    return out
