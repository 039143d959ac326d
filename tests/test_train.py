"""Training: checkpoint format, calibration on held-out images, logs, resume equality, the feature cache, errors, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.cli.train import command as train_command
from adtr_deploy.data.datasets import load_sample, open_dataset
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.checkpoint import load_checkpoint, model_from_checkpoint
from adtr_deploy.model.config import get_preset
from adtr_deploy.preprocess import ImageDecodeError
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.losses import LOSSES, get_loss
from adtr_deploy.train.trainer import split_validation, train
from tests.train_data import make_cifar10, make_folder, make_mvtec

TINY = get_preset("tiny")


def fast(**kw) -> TrainConfig:
    return TrainConfig(progress=False, batch_size=4, **kw)


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = make_mvtec(tmp_path_factory.mktemp("mvtec"), "tex", n_train=20, n_good=4, n_masked=4, n_unmasked=3)
    return open_dataset(root, "tex")


@pytest.fixture(scope="module")
def run(mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(TINY, fast(epochs=3), mvtec, out), out


def test_checkpoint_is_plain_data_with_calibration_and_run_info(run, mvtec):
    path, out = run
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    assert ckpt["mode"] == "adtr" and ckpt["train_state"]["epoch"] == 3
    info = ckpt["info"]
    assert info["data"] == {"kind": "mvtec", "root": str(mvtec.root.resolve()), "category": "tex"}
    assert TrainConfig.from_dict(info["train"]) == fast(epochs=3)
    # Calibration comes from the held-out good images (10% of 20, at least 4), which are never trained on.
    cal = ckpt["calibration"]
    val = info["calibration_images"]
    assert len(val) == cal["num_images"] == 4
    assert all(p.startswith("/") and p.endswith(".png") for p in val)
    trained = ckpt["train_state"]["data_order"]["train"]
    assert len(trained) == 16 and not set(val) & set(trained)
    assert cal["threshold"] > cal["score_mean"] > 0 and cal["map_threshold"] > cal["map_mean"] > 0
    # The threshold sits at the good rule plus the margin toward synthetic defects drawn on those images (never below).
    good_rule = max(cal["score_mean"] + 3 * cal["score_std"], cal["score_max"] * 1.0001)
    assert cal["margin"] >= 0 and cal["threshold"] == pytest.approx(good_rule + cal["margin"])
    assert "synthetic defects" in cal["method"]
    model, _ = load_checkpoint(path)
    assert torch.equal(
        model.state_dict()["transformer.query_embed.weight"], ckpt["state_dict"]["transformer.query_embed.weight"]
    )


def test_training_fits_the_mahalanobis_error_to_the_training_residuals(run, mvtec):
    path, _ = run
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = load_checkpoint(path)
    assert model.cfg.error_metric == "mahalanobis"
    trained = ckpt["train_state"]["data_order"]["train"]
    h, w = model.cfg.grid
    fitted = ckpt["info"]["error_metric"]
    assert {k: fitted[k] for k in ("error_metric", "tokens", "shrink", "border_rings")} == {
        "error_metric": "mahalanobis",
        "tokens": len(trained) * h * w,
        "shrink": 0.001,
        "border_rings": model.cfg.border_rings,
    }
    # the border standardization was fitted too: the 4x4 grid's outer ring is mapped onto its 2x2 interior
    assert len(fitted["ring_mean"]) == 2 and not torch.all(model.error_gain == 1)
    # Recompute the residuals of the training images by hand: the fitted mean is theirs, and the whitened residuals
    # have (about) zero mean and a covariance no larger than the identity (the shrinkage only lowers it).
    images = torch.from_numpy(
        np.stack([load_sample(s, model.cfg.input_size) for s in mvtec.train if str(s.path) in trained])
    )
    with torch.no_grad():
        f = model.forward_features(images)
        r = (f - model.reconstruct(f)).permute(0, 2, 3, 1).reshape(-1, model.channels).double()
    torch.testing.assert_close(model.error_mean.double(), r.mean(dim=0), atol=1e-4, rtol=1e-3)
    z = (r - model.error_mean.double()) @ model.error_whiten.double()
    evals = torch.linalg.eigvalsh(torch.cov(z.T, correction=0))
    assert float(z.mean(dim=0).abs().max()) < 1e-3
    assert float(evals.max()) < 1.0001 and float(evals.mean()) > 0.3  # whitened, not collapsed
    assert not torch.allclose(model.error_whiten, torch.eye(model.channels))


def test_train_log_has_one_line_per_epoch_and_the_lr_drops_late(run):
    _, out = run
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert set(lines[0]) == {"epoch", "loss", "lr", "seconds", "images_per_s"}
    # 3 epochs: the drop (x0.1) happens after round(0.8 * 3) = 2 epochs.
    assert [x["lr"] for x in lines] == pytest.approx([1e-4, 1e-4, 1e-5])
    assert all(x["loss"] > 0 and x["images_per_s"] > 0 for x in lines)


def test_training_writes_metrics_when_there_is_a_test_split(run):
    path, out = run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold_on_test", "num_images"):
        assert key in metrics
    assert metrics["num_images"] == 11 and 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    assert torch.load(path, weights_only=True)["metrics"] == metrics
    assert (out / "metrics_scores.csv").read_text().count("\n") == 12


def test_resume_after_interrupt_equals_an_uninterrupted_run(mvtec, tmp_path):
    cfg = fast(epochs=4)
    straight = train(TINY, cfg, mvtec, tmp_path / "a", evaluate=False)

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train(TINY, cfg, mvtec, tmp_path / "b", evaluate=False, on_epoch_end=interrupt)
    # Ctrl-C leaves the last complete checkpoint: epoch 2, readable, resumable.
    half = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert half["train_state"]["epoch"] == 2 and half["calibration"] is None
    resumed = train(TINY, cfg, mvtec, tmp_path / "b", evaluate=False, resume=True)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-6, rtol=0)
    assert b["calibration"] == pytest.approx(a["calibration"])
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2, 3, 4]
    assert [x["loss"] for x in log] == pytest.approx([x["loss"] for x in ref], abs=1e-6)
    # Resuming needs the same images.
    other = open_dataset(make_folder(tmp_path / "other", n=20))
    with pytest.raises(ValueError, match="training images differ"):
        train(TINY, cfg, other, tmp_path / "b", resume=True)


def test_cached_features_train_exactly_like_recomputed_ones(mvtec, tmp_path):
    a = train(TINY, fast(epochs=2), mvtec, tmp_path / "cache", evaluate=False)
    b = train(TINY, fast(epochs=2, cache_features=False), mvtec, tmp_path / "nocache", evaluate=False)
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    for key in sa:
        # The error whitening is (cov + shrink)^(-1/2) of the final residuals: it magnifies their 1e-6 differences
        # by up to 1/sqrt(shrink), so it is compared relative to its own scale.
        tol = 1e-3 * float(sa[key].abs().max()) if key == "error_whiten" else 1e-5
        torch.testing.assert_close(sb[key], sa[key], atol=tol, rtol=1e-5)
    # ... and training did move the weights away from the seeded initialisation.
    torch.manual_seed(0)
    init = ADTR(TINY).state_dict()
    changed = [k for k in init if k.startswith("transformer.") and not torch.allclose(init[k], sa[k], atol=1e-6)]
    assert len(changed) > 10


def test_validation_split_is_seeded_disjoint_and_at_least_four(mvtec):
    tr, val = split_validation(mvtec.train, fast())
    assert len(val) == 4 and len(tr) == 16 and not set(tr) & set(val)
    assert split_validation(mvtec.train, fast()) == (tr, val)
    assert split_validation(mvtec.train, fast(seed=1))[1] != val
    assert len(split_validation(mvtec.train, fast(val_fraction=0.5))[1]) == 10
    with pytest.raises(ValueError, match="at least 5 are needed"):
        split_validation(mvtec.train[:4], fast())


def test_loss_is_chosen_by_mode():
    feats, rec = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    assert get_loss("adtr") is LOSSES["adtr"]
    assert get_loss("adtr")(feats, rec, {}).item() == pytest.approx(((feats - rec) ** 2).mean().item())
    with pytest.raises(ValueError, match="choose one of: adtr"):
        get_loss("nope")


def test_a_corrupt_training_image_fails_with_its_name(tmp_path):
    root = make_mvtec(tmp_path, "tex", n_train=8, n_good=1, n_masked=1, n_unmasked=0)
    bad = root / "tex" / "train" / "good" / "003.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="003.png is not a readable image"):
        train(TINY, fast(epochs=1, val_fraction=0.5), open_dataset(root, "tex"), tmp_path / "run")
    result = CliRunner().invoke(
        train_command,
        [
            "--data",
            str(root),
            "--category",
            "tex",
            "--out",
            str(tmp_path / "cli"),
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code != 0
    assert f"Error: {bad} is not a readable image" in result.output and "Traceback" not in result.output


def test_cli_trains_a_plain_folder_without_metrics(tmp_path):
    folder = make_folder(tmp_path / "good", n=10)
    out = tmp_path / "run"
    args = ["--data", str(folder), "--out", str(out), "--preset", "tiny", "--epochs", "2", "--quiet"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint.pt").is_file() and not (out / "metrics.json").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["info"]["data"]["kind"] == "folder" and ckpt["metrics"] is None and ckpt["calibration"]["num_images"] == 4
    )
    # The run folder is not silently overwritten; --resume of a finished run recalibrates and keeps the weights.
    again = CliRunner().invoke(train_command, args)
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = CliRunner().invoke(train_command, [*args[:4], "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    after = torch.load(out / "checkpoint.pt", weights_only=True)
    assert after["info"]["train"]["epochs"] == 2 and after["info"]["train"]["batch_size"] == 4
    assert all(torch.equal(after["state_dict"][k], v) for k, v in ckpt["state_dict"].items())


def test_cli_augmentation_options_reach_the_training_and_are_bounded(tmp_path):
    """--augment-light / --augment-noise / --augment-highlights (issue 31's levers b, e, g) train with the photometric
    dataset and are recorded; values out of range get click's one sentence."""
    folder = make_folder(tmp_path / "good", n=8)
    out = tmp_path / "run"
    base = ["--data", str(folder), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--quiet"]
    result = CliRunner().invoke(
        train_command, [*base, "--augment-light", "0.2", "--augment-noise", "4", "--augment-highlights", "0.1"]
    )
    assert result.exit_code == 0, result.output
    info = torch.load(out / "checkpoint.pt", weights_only=True)["info"]
    train_cfg = info["train"]
    assert train_cfg["photometric"] == 0.2 and train_cfg["noise"] == 4.0 and train_cfg["highlights"] == 0.1
    assert info["headroom"]["highlights"] == 0.1  # given: used whatever the headroom
    for opt, bad in (("--augment-light", "0.9"), ("--augment-noise", "-1"), ("--augment-highlights", "0.8")):
        res = CliRunner().invoke(train_command, [*base, "--overwrite", opt, bad])
        assert res.exit_code == 2 and bad in res.output and "Traceback" not in res.output


def test_cli_input_size_and_stages_shape_the_model_and_bad_values_get_one_sentence(tmp_path):
    folder = make_folder(tmp_path / "good", n=8)
    out = tmp_path / "run"
    base = ["--data", str(folder), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--quiet"]
    result = CliRunner().invoke(train_command, [*base, "--input-size", "96x64", "--stages", "2,3"])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert tuple(ckpt["config"]["input_size"]) == (96, 64) and tuple(ckpt["config"]["stages"]) == (2, 3)
    model, _ = load_checkpoint(out / "checkpoint.pt")
    with torch.no_grad():
        amap, score = model(torch.zeros(1, 96, 64, 3, dtype=torch.uint8))
    assert amap.shape == (1, 1, 96, 64) and model.cfg.grid == (6, 4)
    assert model.cfg.error_metric == "mahalanobis"  # the tiny preset's, like the lite presets'
    paper_error = CliRunner().invoke(train_command, [*base, "--overwrite", "--error-metric", "l2"])
    assert paper_error.exit_code == 0, paper_error.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["error_metric"] == "l2" and "error_whiten" not in ckpt["state_dict"]
    fitted = ckpt["info"]["error_metric"]  # no whitening statistics; the border standardization stays (its own field)
    assert fitted["error_metric"] == "l2" and "tokens" not in fitted and fitted["border_rings"] == 3
    bad_values = (("--input-size", "big"), ("--input-size", "16"), ("--stages", "0,6"), ("--stages", "a"))
    for opt, bad in (*bad_values, ("--error-metric", "cosine")):
        res = CliRunner().invoke(train_command, [*base, "--overwrite", opt, bad])
        assert res.exit_code == 2 and bad in res.output and "Traceback" not in res.output
    resumed = CliRunner().invoke(train_command, [*base[:4], "--resume", "--input-size", "128"])
    assert resumed.exit_code != 0 and "drop it" in resumed.output


def test_cli_trains_cifar_one_class_and_stores_its_calibration_images(tmp_path):
    make_cifar10(tmp_path / "cifar", per_class_train=2, per_class_test=1)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        train_command,
        ["--data", str(tmp_path / "cifar"), "--category", "airplane", "--out", str(out), "--preset", "tiny"]
        + ["--epochs", "1", "--val-fraction", "0.4", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["info"]["data"]["kind"] == "cifar10" and ckpt["info"]["data"]["category"] == "airplane"
    # CIFAR images are not files: the calibration images are written as lossless PNGs for export verification.
    paths = ckpt["info"]["calibration_images"]
    assert len(paths) == 4 and all((out / "calibration_images").samefile(os.path.dirname(p)) for p in paths)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 10 and metrics["pixel_auroc"] is None and metrics["pro"] is None


def test_the_transformer_works_on_features_standardized_by_training_statistics(mvtec, tmp_path):
    # lr 0: the weights stay at their initialisation, so the checkpoint shows it.
    ckpt = torch.load(train(TINY, fast(epochs=1, lr=0.0), mvtec, tmp_path / "r", evaluate=False), weights_only=True)
    model, _ = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    trained = [s for s in mvtec.train if str(s.path) in set(ckpt["train_state"]["data_order"]["train"])]
    images = torch.from_numpy(np.stack([load_sample(s, (64, 64)) for s in trained]))
    with torch.no_grad():
        feats = model.forward_features(images)  # (N, C, h, w)
        mean, std = feats.mean(dim=(0, 2, 3)), feats.std(dim=(0, 2, 3), correction=0)
        sd = ckpt["state_dict"]
        torch.testing.assert_close(sd["transformer.feature_mean"], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            sd["transformer.feature_std"], std.clamp_min(std.mean() * 1e-3), atol=1e-4, rtol=1e-4
        )
        assert sd["transformer.output_proj.bias"].abs().max() == 0
        # Standardized on the way in, scaled back on the way out: the reconstruction lives in raw feature units.
        rec = model.reconstruct(feats)
        assert abs(float(rec.mean()) - float(feats.mean())) < 0.5 * float(feats.std())
    # Without it, the buffers stay the identity and the bias keeps PyTorch's small random initialisation.
    plain = torch.load(
        train(TINY, fast(epochs=1, lr=0.0, standardize_features=False), mvtec, tmp_path / "p", evaluate=False),
        weights_only=True,
    )["state_dict"]
    assert plain["transformer.feature_mean"].abs().max() == 0 and (plain["transformer.feature_std"] == 1).all()
    assert plain["transformer.output_proj.bias"].abs().max() > 0


def test_checkpoints_from_before_standardization_load_as_identity(mvtec, tmp_path):
    path = train(TINY, fast(epochs=1), mvtec, tmp_path / "r", evaluate=False)
    ckpt = torch.load(path, weights_only=True)
    model, _ = load_checkpoint(path)
    old = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("transformer.feature_")}
    # An old checkpoint's function: the same weights without standardization.
    legacy = model_from_checkpoint({**ckpt, "state_dict": old})
    assert legacy.transformer.feature_mean.abs().max() == 0 and (legacy.transformer.feature_std == 1).all()
    x = torch.randn(2, model.channels, *model.cfg.grid)
    t = model.transformer
    with torch.no_grad():
        expected = legacy.reconstruct((x - t.feature_mean[:, None, None]) / t.feature_std[:, None, None])
        expected = expected * t.feature_std[:, None, None] + t.feature_mean[:, None, None]
        torch.testing.assert_close(model.reconstruct(x), expected, atol=1e-4, rtol=1e-4)
