"""ADTR+ through adtr-train: fine-tuning an ADTR checkpoint with synthetic anomalies, training from scratch with real
anomalies set apart on the train side, the test-leak guard, and the CIFAR-10 protocol with CIFAR-100 as external data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.cli.train import command as train_command
from adtr_deploy.model.checkpoint import load_checkpoint
from tests.train_data import make_cifar10, make_cifar100, make_mvtec

FAST = ["--preset", "tiny", "--batch-size", "8", "--quiet"]


def invoke(*args: str):
    return CliRunner().invoke(train_command, [str(a) for a in args] + FAST)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("mvtec"), "tex", n_train=12, n_good=3, n_masked=3, n_unmasked=2)


@pytest.fixture(scope="module")
def adtr_run(mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("adtr")
    result = invoke("--data", mvtec, "--category", "tex", "--out", out, "--epochs", 1, "--lr", 1e-3, "--no-eval")
    assert result.exit_code == 0, result.output
    return out


def test_fine_tunes_an_adtr_checkpoint_into_adtr_plus_with_synthetic_anomalies(mvtec, adtr_run, tmp_path):
    # lr 0: the fine-tuned transformer must equal the ADTR checkpoint's, which proves --init-from loaded it.
    out = tmp_path / "plus"
    result = invoke(
        "--data", mvtec, "--category", "tex", "--out", out, "--mode", "adtr+", "--init-from", adtr_run,
        "--epochs", 1, "--lr", 0,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["mode"] == "adtr+"
    plus = ckpt["info"]["adtr_plus"]
    assert plus["sources"] == ["confetti", "cutpaste"] and plus["alpha"] == 0.003 and plus["k"] == 20
    assert plus["init_from"] == str((adtr_run / "checkpoint.pt").resolve())
    assert plus["anomalies_per_epoch"] == ckpt["info"]["split"]["train_images"]
    assert all(math.isfinite(v) and v > 0 for v in losses(out))
    init = torch.load(adtr_run / "checkpoint.pt", weights_only=True)["state_dict"]
    fresh = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    tf = [k for k in init if k.startswith("transformer.")]
    assert tf and all(torch.equal(init[k], fresh[k]) for k in tf)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "adtr+" and metrics["adtr_plus"]["sources"] == ["confetti", "cutpaste"]
    maps, scores = model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8) + 128)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


def test_trains_adtr_plus_from_scratch_with_anomalies_set_apart_on_the_train_side(mvtec, tmp_path):
    # Real anomalies in the MVTec ground-truth layout, from another set of images, kept beside train/ (not in test/).
    other = make_mvtec(tmp_path / "other", "tex", n_train=1, n_good=0, n_masked=4, n_unmasked=0, seed=3)
    apart = tmp_path / "set_apart"
    shutil.copytree(other / "tex" / "test", apart)
    shutil.copytree(other / "tex" / "ground_truth", apart / "ground_truth")
    out = tmp_path / "scratch"
    result = invoke(
        "--data", mvtec, "--category", "tex", "--out", out, "--mode", "adtr+", "--anomalies", apart, "--epochs", 1,
        "--alpha", 0.01, "--topk", 4,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    plus = ckpt["info"]["adtr_plus"]
    assert ckpt["mode"] == "adtr+" and ckpt["info"]["train"]["mode"] == "adtr+"
    assert plus["sources"] == ["anomalies"] and plus["synthetic"] == [] and plus["init_from"] is None
    assert plus["anomalies"] == str(apart.resolve()) and plus["alpha"] == 0.01 and plus["k"] == 4
    assert len(losses(out)) == 1 and all(math.isfinite(v) for v in losses(out))
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["image_auroc"] <= 1.0


def test_cli_refuses_anomalies_from_the_evaluated_test_split(mvtec, tmp_path):
    out = tmp_path / "leak"
    result = invoke(
        "--data", mvtec, "--category", "tex", "--out", out, "--mode", "adtr+", "--anomalies", mvtec / "tex" / "test",
        "--epochs", 1,
    )  # fmt: skip
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "lies inside the evaluated test split" in lines[0], result.output
    assert "Traceback" not in result.output and not (out / "checkpoint.pt").exists()
    # ADTR+ options without --mode adtr+ are a mistake, not silently ignored.
    result = invoke("--data", mvtec, "--category", "tex", "--out", out, "--synthetic", "confetti")
    assert result.exit_code != 0 and "add --mode adtr+" in result.output


def test_cifar10_protocol_with_cifar100_as_external_anomalies_end_to_end(tmp_path):
    make_cifar10(tmp_path / "c10", per_class_train=2, per_class_test=1)
    make_cifar100(tmp_path / "c100", per_class_train=1, per_class_test=1)
    out = tmp_path / "run"
    result = invoke(
        "--data", tmp_path / "c10", "--category", "airplane", "--out", out, "--mode", "adtr+",
        "--external", f"cifar100:{tmp_path / 'c100'}", "--epochs", 1, "--val-fraction", "0.4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    plus = ckpt["info"]["adtr_plus"]
    # Image-level anomalies only: no synthetic default, the loss is L_img alone.
    assert plus["sources"] == ["external-cifar100"] and plus["synthetic"] == []
    assert plus["external"] == f"cifar100:{tmp_path / 'c100'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "adtr+" and metrics["num_images"] == 10 and 0.0 <= metrics["image_auroc"] <= 1.0
    # The evaluated data set itself cannot be the external anomaly set.
    result = invoke(
        "--data", tmp_path / "c10", "--category", "airplane", "--out", tmp_path / "x", "--mode", "adtr+",
        "--external", f"cifar10:{tmp_path / 'c10'}", "--epochs", 1, "--val-fraction", "0.4",
    )  # fmt: skip
    assert result.exit_code != 0 and "is the data set being trained and evaluated" in result.output
