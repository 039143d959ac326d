"""Evaluation of a checkpoint and of an exported model (through the runtime) on a test split; adtr-eval."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.cli.evaluate import command as eval_command
from adtr_deploy.data.datasets import load_sample, open_dataset
from adtr_deploy.metrics import evaluate
from adtr_deploy.model.checkpoint import load_checkpoint
from adtr_deploy.model.config import get_preset
from adtr_deploy.preprocess import load_mask
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.evaluate import evaluate_model, is_checkpoint
from adtr_deploy.train.trainer import train
from tests.train_data import make_folder, make_mvtec

KEYS = ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold_on_test", "num_images")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_mvtec(tmp_path_factory.mktemp("data"), "tex", n_train=12, n_good=4, n_masked=4, n_unmasked=3)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False)
    ckpt = train(get_preset("tiny"), cfg, open_dataset(root, "tex"), out, evaluate=False)
    return root, ckpt


@pytest.fixture(scope="module")
def onnx_model(setup, tmp_path_factory):
    """The checkpoint exported to ONNX by the project's exporter (verified against the checkpoint on its calibration
    images)."""
    from adtr_deploy.export import export_checkpoint

    _, ckpt = setup
    result = export_checkpoint(ckpt, "onnx", tmp_path_factory.mktemp("export"), dynamo=False)
    return result.path


def test_checkpoint_metrics_match_a_direct_computation(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "metrics.json"
    metrics = evaluate_model(ckpt, root, "tex", out=out)
    assert json.loads(out.read_text()) == metrics
    assert all(k in metrics for k in KEYS) and metrics["backend"] == "pytorch" and metrics["num_images"] == 11
    # Recompute by hand: every test image through the module, maps against masks at the model input size (64).
    data = open_dataset(root, "tex")
    model, _ = load_checkpoint(ckpt)
    images = torch.from_numpy(np.stack([load_sample(s, (64, 64)) for s in data.test]))
    with torch.no_grad():
        maps, scores = model(images)
    labels = np.array([s.label for s in data.test])
    known = [i for i, s in enumerate(data.test) if s.has_pixel_truth]  # the no-mask defect folder is image-only
    masks = np.stack([load_mask(data.test[i].mask, (64, 64))[None] for i in known])
    ref = evaluate(scores.numpy(), labels)
    ref_px = evaluate(scores.numpy()[known], labels[known], maps.numpy()[known], masks)
    ref["pixel_auroc"], ref["pro"] = ref_px["pixel_auroc"], ref_px["pro"]
    for key in KEYS:
        assert metrics[key] == pytest.approx(ref[key], rel=1e-6), key
    assert metrics["pixel_images"] == 8 and metrics["num_anomalous"] == 7
    assert set(metrics["per_defect"]) == {"patch", "nomask"}
    rows = list(csv.DictReader((tmp_path / "metrics_scores.csv").open()))
    assert [r["path"] for r in rows] == [str(s.path) for s in data.test]
    assert np.allclose([float(r["score"]) for r in rows], scores.numpy(), rtol=1e-5)


def test_exported_onnx_model_evaluates_like_its_checkpoint(setup, onnx_model, tmp_path):
    root, ckpt = setup
    assert not is_checkpoint(onnx_model) and is_checkpoint(ckpt) and is_checkpoint(ckpt.parent)
    ref = evaluate_model(ckpt, root, "tex", out=tmp_path / "ref.json")
    got = evaluate_model(onnx_model, root, "tex", out=tmp_path / "onnx.json")
    assert got["backend"] == "onnxruntime"
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=2e-3), key
    s_ref = [float(r["score"]) for r in csv.DictReader((tmp_path / "ref_scores.csv").open())]
    s_got = [float(r["score"]) for r in csv.DictReader((tmp_path / "onnx_scores.csv").open())]
    assert np.allclose(s_got, s_ref, rtol=1e-4, atol=1e-5)


def test_torchscript_files_are_told_apart_from_checkpoints(setup, tmp_path):
    _, ckpt = setup
    model, _ = load_checkpoint(ckpt)
    scripted = torch.jit.trace(model, torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    scripted.save(str(tmp_path / "model.pt"))
    assert not is_checkpoint(tmp_path / "model.pt")


def test_adtr_eval_cli_writes_the_contract_keys(setup, onnx_model, tmp_path):
    root, _ = setup
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        eval_command,
        ["--model", str(onnx_model), "--data", str(root), "--category", "tex", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert all(k in metrics for k in KEYS) and 0 <= metrics["pixel_auroc"] <= 1 and metrics["num_images"] == 11
    assert "image_auroc" in result.output


def test_masks_missing_everywhere_give_null_pixel_metrics(setup, tmp_path):
    _, ckpt = setup
    root = make_mvtec(tmp_path, "nomasks", n_train=5, n_good=3, n_masked=0, n_unmasked=3)
    metrics = evaluate_model(ckpt, root, "nomasks")
    assert metrics["pixel_auroc"] is None and metrics["pro"] is None and 0 <= metrics["image_auroc"] <= 1


def test_eval_errors_are_one_sentence(setup, tmp_path):
    root, ckpt = setup
    folder = make_folder(tmp_path / "good", n=5)
    runner = CliRunner()
    result = runner.invoke(eval_command, ["--model", str(ckpt), "--data", str(folder), "--quiet"])
    assert result.exit_code != 0 and "has no test split" in result.output and "Traceback" not in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = runner.invoke(eval_command, ["--model", str(junk), "--data", str(root), "--category", "tex"])
    assert result.exit_code != 0 and "is not a readable checkpoint" in result.output
    result = runner.invoke(
        eval_command, ["--model", str(ckpt), "--data", str(root), "--category", "tex", "--device", "tpu"]
    )
    assert result.exit_code != 0 and "use cpu or cuda" in result.output
