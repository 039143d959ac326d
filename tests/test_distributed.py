"""DDP training: 2 processes (torchrun, gloo on CPU) give the weights of a single process with the same global batch;
only rank 0 writes; a distributed run resumes; sharding helpers; the --nproc launcher command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.cli.train import command as train_command
from adtr_deploy.data.datasets import open_dataset
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.config import get_preset
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.distributed import World, local_batches, loss_weight, shard_indices
from adtr_deploy.train.trainer import train
from tests.train_data import make_mvtec

# Dropout off: with dropout each rank draws its own masks, so only dropout-free runs can be compared weight by weight.
TINY = get_preset("tiny", dropout=0.0)
# 21 good images -> 4 held out for calibration, 17 trained on: with the global batch 4 the last batch has 1 image, so
# rank 1 owns nothing of it and takes the zero-weight step.
CFG = TrainConfig(epochs=2, batch_size=4, progress=False)
# Gradients are averaged over ranks, so the updates equal the single-process ones up to the order of float additions.
TOLERANCE = 1e-5

WORKER = textwrap.dedent(
    """
    import sys
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.train import distributed
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.trainer import train

    data_root, out = sys.argv[1], sys.argv[2]
    w = distributed.setup("cpu")
    assert w.size == 2, w
    model_cfg, cfg = get_preset("tiny", dropout=0.0), TrainConfig(epochs=2, batch_size=4, progress=False)
    data = open_dataset(data_root, "tex")

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    train(model_cfg, cfg, data, out + "/plain")
    try:
        train(model_cfg, cfg, data, out + "/resumed", on_epoch_end=stop_after_first, evaluate=False)
    except KeyboardInterrupt:
        pass
    distributed.barrier()
    train(model_cfg, cfg, data, out + "/resumed", resume=True, evaluate=False)
    distributed.teardown()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run and 2-process runs (plain, and interrupted after epoch 1 then resumed) of the same job."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_mvtec(tmp / "data", "tex", n_train=21, n_good=3, n_masked=3, n_unmasked=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets for each rank (OMP_NUM_THREADS=1)
    try:
        single = train(TINY, CFG, open_dataset(root, "tex"), tmp / "single")
    finally:
        torch.set_num_threads(threads)
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker), str(root), str(tmp / "ddp")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return single, tmp / "ddp" / "plain", tmp / "ddp" / "resumed"


def weights(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("transformer.")}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    single, plain, _ = runs
    ref = weights(single)
    torch.manual_seed(0)  # the trainer seeds the same way before building: these are the initial weights
    init = {f"transformer.{k}": v for k, v in ADTR(TINY).transformer.state_dict().items()}
    assert max_abs_diff(init, ref) > 100 * TOLERANCE  # training moved the weights far more than the tolerance
    assert max_abs_diff(ref, weights(plain / "checkpoint.pt")) < TOLERANCE
    # The logged epoch losses are global (all-reduced) and equal too.
    log_1 = [json.loads(x) for x in (single.parent / "train_log.jsonl").read_text().splitlines()]
    log_2 = [json.loads(x) for x in (plain / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log_2] == [1, 2]  # one line per epoch: only rank 0 writes
    assert [x["loss"] for x in log_2] == pytest.approx([x["loss"] for x in log_1], rel=1e-5)


def test_rank_0_calibrates_and_evaluates_with_the_whole_run_recorded(runs):
    single, plain, _ = runs
    ckpt = torch.load(plain / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["info"]["world_size"] == 2 and ckpt["train_state"]["epoch"] == 2
    ref = torch.load(single, map_location="cpu", weights_only=True)
    assert ckpt["calibration"]["threshold"] == pytest.approx(ref["calibration"]["threshold"], rel=1e-4)
    # The Mahalanobis error's statistics are summed over both ranks' shards: the same as one process's.
    assert ckpt["info"]["error_metric"] == ref["info"]["error_metric"]
    mean_2, mean_1 = ckpt["state_dict"]["error_mean"], ref["state_dict"]["error_mean"]
    assert float((mean_2 - mean_1).abs().max()) < 1e-4 * max(1.0, float(mean_1.abs().max()))
    whiten_2, whiten_1 = ckpt["state_dict"]["error_whiten"], ref["state_dict"]["error_whiten"]
    assert float((whiten_2 - whiten_1).abs().max()) < 1e-3 * float(whiten_1.abs().max())
    metrics = json.loads((plain / "metrics.json").read_text())
    assert metrics["num_images"] == 6
    assert metrics["image_auroc"] == pytest.approx(ref["metrics"]["image_auroc"], abs=1e-6)


def test_an_interrupted_distributed_run_resumes_to_the_same_weights(runs):
    single, _, resumed = runs
    assert max_abs_diff(weights(single), weights(resumed / "checkpoint.pt")) < TOLERANCE
    assert [json.loads(x)["epoch"] for x in (resumed / "train_log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("n,world", [(17, 2), (16, 3), (5, 4)])
def test_shards_are_disjoint_and_every_global_batch_is_split_without_loss(n, world):
    ranks = [World(r, world) for r in range(world)]
    shards = [shard_indices(n, w) for w in ranks]
    assert sorted(i for s in shards for i in s) == list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    per_rank = [local_batches(order, 4, w) for w in ranks]
    assert len({len(p) for p in per_rank}) == 1  # every rank steps on every global batch
    for b, batch in enumerate(order.split(4)):
        parts = [p[b][0] for p in per_rank]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        assert all(set(part.tolist()) <= set(s) for part, s in zip(parts, shards))
        # The weighted rank losses average (DDP divides by the world size) to the global batch mean.
        assert sum(loss_weight(len(part), len(batch), w) for part, w in zip(parts, ranks)) / world == pytest.approx(1)


def test_nproc_launches_torchrun_with_the_same_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    args = ["--data", str(tmp_path), "--category", "tex", "--out", str(tmp_path / "o"), "--batch-size", "8"]
    result = CliRunner().invoke(train_command, [*args, "--nproc", "2", "--no-eval", "--quiet"])
    assert result.exit_code == 0, result.output
    (cmd,) = calls
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--master-addr") + 1] == "127.0.0.1"
    child = cmd[cmd.index("adtr_deploy.train") + 1 :]
    assert "--nproc" not in child and child[:8] == args
    assert "--no-eval" in child and "--quiet" in child


def test_nproc_and_devices_do_not_combine(tmp_path):
    args = ["--data", str(tmp_path), "--category", "a,b", "--out", str(tmp_path / "o"), "--nproc", "2"]
    result = CliRunner().invoke(train_command, [*args, "--devices", "cuda:0,cuda:1"])
    assert result.exit_code == 1 and "--nproc and --devices do not combine" in result.output
