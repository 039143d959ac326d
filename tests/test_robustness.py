"""Robustness to illumination and colour drift (issue 31): per-image input standardization in the graph, the photometric
shifts, the validation split carved from the training images, and the drift benchmark's scoring on real ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from adtr_deploy.data.datasets import open_dataset
from adtr_deploy.data.mvtec import list_mvtec
from adtr_deploy.data.shifts import GOAL_SHIFTS, SHIFTS, apply_shift, brightness, channel_gains, stain
from adtr_deploy.data.validation import SOURCES, write_validation_split
from adtr_deploy.errors import UserError
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.checkpoint import load_checkpoint, model_from_checkpoint
from adtr_deploy.model.config import ADTRConfig, get_preset
from adtr_deploy.preprocess import load_image, read_image
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.trainer import train
from tests.conftest import texture_images
from tests.train_data import make_mvtec

TINY = get_preset("tiny")
ROBUST = TINY.replace(input_norm="image")


def fast(**kw) -> TrainConfig:
    return TrainConfig(progress=False, batch_size=4, **kw)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("mvtec"), "tex", n_train=20, n_good=4, n_masked=4, n_unmasked=3)


@pytest.fixture(scope="module")
def runs(mvtec_root, tmp_path_factory):
    """The tiny preset trained on the same images with and without input standardization: {name: (model, ckpt path)}."""
    data = open_dataset(mvtec_root, "tex")
    out = {}
    for name, cfg in (("plain", TINY), ("robust", ROBUST)):
        torch.manual_seed(0)
        path = train(cfg, fast(epochs=2), data, tmp_path_factory.mktemp(name) / "tex", evaluate=False)
        out[name] = (load_checkpoint(path)[0], path)
    return out


def _good_images(root: Path) -> np.ndarray:
    return np.stack([load_image(s.path, (64, 64)) for s in list_mvtec(root, "tex", "test") if s.label == 0])


def _scores(model: ADTR, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        amap, score = model(torch.from_numpy(np.ascontiguousarray(images)))
    return amap.numpy()[:, 0], score.numpy()


def test_training_fits_the_input_reference_to_the_training_images(runs, mvtec_root):
    model, _ = runs["robust"]
    images = np.stack([load_image(s.path, (64, 64)) for s in list_mvtec(mvtec_root, "tex", "train")]).astype(float)
    per_image_mean = images.mean(axis=(1, 2))  # (N, 3)
    ref = model.input_ref_mean.numpy()
    # fitted on the training part (the calibration hold-out aside): close to the mean over all training images, and
    # not the ImageNet values the buffers start from
    assert np.abs(ref - per_image_mean.mean(axis=0)).max() < 0.2 * per_image_mean.std(axis=0).max() + 2
    assert np.abs(ref - np.array(model.cfg.mean) * 255).max() > 5
    assert (model.input_ref_std.numpy() > 1).all()
    assert runs["plain"][0].input_ref_mean is None


@pytest.mark.parametrize("shift", ["bright+15", "bright-15", "cast-issue", "white-balance", "contrast-15"])
def test_a_global_shift_leaves_scores_of_the_standardized_model_within_a_bound(runs, mvtec_root, shift):
    """The bound: a tenth of the spread of good images' scores. The same shift moves the unstandardized model's scores
    by more than that bound, so the bound separates the two."""
    good = _good_images(mvtec_root)
    moved = {}
    for name, (model, _) in runs.items():
        _, before = _scores(model, good)
        _, after = _scores(model, apply_shift(shift, good))
        spread = float(np.ptp(before)) + 1e-6
        moved[name] = float(np.abs(after - before).max()) / spread
    assert moved["robust"] < 0.1, moved
    if shift.startswith("bright") or shift == "cast-issue":
        assert moved["plain"] > 0.1, moved


def test_a_local_stain_still_raises_its_part_of_the_map_and_the_score(runs, mvtec_root):
    model, _ = runs["robust"]
    good = _good_images(mvtec_root)
    stained, masks = zip(*(stain(im, (40, 24), 7, (150, 90, 40), alpha=0.8) for im in good))
    stained, mask = np.stack(stained), masks[0]
    map0, s0 = _scores(model, good)
    map1, s1 = _scores(model, stained)
    rise_in = (map1 - map0)[:, mask].mean(axis=1)
    rise_out = np.abs(map1 - map0)[:, ~mask].mean(axis=1)
    assert (rise_in > 3 * rise_out).all(), (rise_in, rise_out)
    assert (s1 > s0).all()
    # and by more than a global brightness change of 15 % moves it
    _, s_bright = _scores(model, brightness(good, 1.15))
    assert (s1 - s0).min() > np.abs(s_bright - s0).max()


def test_standardization_undoes_gains_and_offsets_exactly_before_clipping():
    torch.manual_seed(0)
    model = ADTR(ROBUST).eval()
    x = torch.from_numpy(texture_images(2, 64, seed=3)).float().permute(0, 3, 1, 2) * 0.8 + 10  # no clipping here
    shifted = x * torch.tensor([0.9, 1.0, 1.1]).view(1, 3, 1, 1) + torch.tensor([5.0, -3.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(model.standardize_input(x), model.standardize_input(shifted), atol=1e-3)


def test_the_input_standardization_round_trips_through_onnx(runs, tmp_path):
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.runtime.backends import open_model

    model, ckpt = runs["robust"]
    result = export_checkpoint(ckpt, "onnx", tmp_path / "onnx")
    spec = json.loads(result.spec_path.read_text())
    assert "input_norm" in json.dumps(spec) and '"image"' in json.dumps(spec)  # model.json records the setting
    images = texture_images(4, 64, seed=7)
    with open_model(result.path) as backend:
        for shift in ("none", "bright+15", "bright-20", "cast-issue", "defocus-1.2"):
            x = apply_shift(shift, images)
            maps, scores = backend.run(x)
            ref_maps, ref_scores = _scores(model, x)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(maps[:, 0], ref_maps, rtol=1e-3, atol=1e-3)


def test_checkpoints_without_the_setting_load_unstandardized(runs):
    _, ckpt = runs["plain"]
    raw = torch.load(ckpt, weights_only=True)
    raw["config"].pop("input_norm", None)  # written before the setting existed
    model = model_from_checkpoint(raw)
    assert model.cfg.input_norm == "none" and model.input_ref_mean is None


def test_a_bad_input_norm_is_one_sentence():
    with pytest.raises(UserError, match="input_norm 'global' is not 'none' or 'image'"):
        ADTRConfig(input_norm="global")


def test_the_default_and_robust_presets_standardize_their_input():
    assert get_preset("lite0-robust") == get_preset("lite0")
    for name in ("lite0", "lite0-small", "accurate", "lite1", "lite2"):
        assert get_preset(name).input_norm == "image", name
    assert get_preset("lite0-plain").replace(input_norm="image") == get_preset("lite0")
    assert get_preset("lite0-classic").input_norm == "none"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def test_the_validation_split_is_carved_from_training_images_and_never_touches_the_test_split(mvtec_root, tmp_path):
    out = write_validation_split(mvtec_root, "tex", tmp_path / "val", hold_out=5, seed=1)
    train_names = {p.name for p in (mvtec_root / "tex" / "train" / "good").iterdir()}
    kept = {p.name for p in (out / "train" / "good").iterdir()}
    held = {p.name for p in (out / "test" / "good").iterdir()}
    assert len(held) == 5 and len(kept) == 15 and not kept & held and kept | held == train_names
    for kind in SOURCES:  # one synthetic defect of each kind per held-out image, with a non-empty mask
        assert {p.name for p in (out / "test" / kind).iterdir()} == held
        assert len(list((out / "ground_truth" / kind).iterdir())) == 5
    test_digests = set(_digests(mvtec_root / "tex" / "test").values())
    assert not test_digests & set(_digests(out).values())
    # The split does not depend on the test split at all: without it, the same files come out.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mvtec_root / "tex" / "train", copy / "tex" / "train")
    again = write_validation_split(copy, "tex", tmp_path / "val2", hold_out=5, seed=1)
    assert _digests(again) == _digests(out)
    # and a model trained there reads its held-out images as a test split with synthetic defects
    data = open_dataset(tmp_path / "val", "tex")
    assert {s.defect for s in data.test} == {"good", *SOURCES} and len(data.train) == 15


def test_holding_out_too_many_images_is_one_sentence(mvtec_root, tmp_path):
    with pytest.raises(UserError, match="cannot hold out 20 of 20 training images"):
        write_validation_split(mvtec_root, "tex", tmp_path / "v", hold_out=20)


def test_every_shift_keeps_uint8_shape_and_changes_the_image():
    images = texture_images(3, 64, seed=2)
    for name in SHIFTS:
        out = apply_shift(name, images)
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert (name == "none") == np.array_equal(out, images), name
    assert set(GOAL_SHIFTS) <= set(SHIFTS)
    np.testing.assert_array_equal(channel_gains(images, (1.0, 1.0, 1.0)), images)
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift("sepia", images)


def test_the_drift_benchmark_scores_shifts_through_the_runtime(runs, mvtec_root, tmp_path):
    """benchmarks/drift.py on a tiny run: every row is a real ONNX Runtime measurement at the calibrated threshold."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import drift

    _, ckpt = runs["robust"]
    run_root = ckpt.parent.parent
    result = drift.main(
        [
            "--run", f"robust={run_root}", "--categories", "tex", "--data", str(mvtec_root),
            "--splits", "test", "--shifts", "bright+15,cast-issue", "--scores", "raw,relative",
            "--out", str(tmp_path / "drift.json"),
        ]
    )  # fmt: skip
    rows = result["rows"]
    assert [r["shift"] for r in rows if r["score"] == "raw"] == ["none", "bright+15", "cast-issue"]
    for r in rows:
        assert 0 <= r["false_alarms"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["image_auroc"] <= 1
    json.loads((tmp_path / "drift.json").read_text())
    assert "bright" in (tmp_path / "drift.md").read_text()


def test_the_drift_benchmark_recalibrates_on_a_lines_confirmed_good_parts(runs, mvtec_root, tmp_path):
    """--line: the line's good parts (other crops, not the evaluated split) give the threshold `adtr recalibrate` would
    write, and every shift is scored at it; a line holding a defective part is refused, as the runtime refuses it."""
    import sys

    from adtr_deploy.calibration import calibrate
    from adtr_deploy.runtime.inferencer import Inferencer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import drift

    _, ckpt = runs["robust"]
    line = make_mvtec(tmp_path / "line", "tex", n_train=1, n_good=24, n_masked=1, n_unmasked=1, seed=1)

    def bench(line_root: Path, out: str) -> list[dict]:
        return drift.main(
            [
                "--run", f"robust={ckpt.parent.parent}", "--categories", "tex", "--data", str(mvtec_root),
                "--splits", "test", "--shifts", "bright+15", "--scores", "raw,recalibrated",
                "--line", str(line_root), "--out", str(tmp_path / out),
            ]
        )["rows"]  # fmt: skip

    rows = bench(line, "d.json")
    goods = [read_image(p) for p in sorted((line / "tex" / "test" / "good").glob("*.png"))]
    with Inferencer(ckpt.parent / "export_onnx" / "model.onnx") as inf:
        preds = inf.predict_batch(goods)
        margin = inf.spec.calibration.margin
    expected = calibrate(np.array([p.score for p in preds]), keep_margin=margin).threshold
    recal = [r for r in rows if r["score"] == "recalibrated"]
    assert [r["shift"] for r in recal] == ["none", "bright+15"]
    assert all(r["threshold"] == pytest.approx(expected, rel=1e-6) for r in recal)
    info = recal[0]["line"]
    assert (
        info["frames"] == 24 and info["drift_state"] in ("ok", "drift") and info["threshold"] == recal[0]["threshold"]
    )
    assert "recalibrated threshold" in (tmp_path / "d.md").read_text()

    # a defective part among the line's "good" ones: refused (the runtime's rule), so no recalibrated rows
    bad = tmp_path / "bad_line" / "tex" / "test" / "good"
    bad.mkdir(parents=True)
    for p in (line / "tex" / "test" / "good").glob("*.png"):
        (bad / p.name).write_bytes(p.read_bytes())
    with Inferencer(ckpt.parent / "export_onnx" / "model.onnx") as inf:
        worst = max((mvtec_root / "tex" / "test").glob("[!g]*/*.png"), key=lambda p: inf.predict(read_image(p)).score)
    (bad / "zzz.png").write_bytes(worst.read_bytes())
    rows = bench(tmp_path / "bad_line", "bad.json")
    assert not [r for r in rows if r["score"] == "recalibrated"]
    assert "look like flagged parts" in next(r["line"]["refused"] for r in rows if "line" in r)


def test_photometric_augmentation_changes_each_image_per_epoch_reproducibly_and_trains(mvtec_root, tmp_path):
    from adtr_deploy.train.augment import PhotometricImages

    data = open_dataset(mvtec_root, "tex")
    ds = PhotometricImages(list(data.train[:3]), (64, 64), 0.2, seed=0)
    ds.set_epoch(0)
    a = ds[0]["image"].numpy()
    ds.set_epoch(1)
    b = ds[0]["image"].numpy()
    ds.set_epoch(0)
    assert not np.array_equal(a, b) and np.array_equal(a, ds[0]["image"].numpy())
    assert abs(float(a.mean()) - float(load_image(data.train[0].path, (64, 64)).mean())) < 0.35 * 255
    path = train(TINY, fast(epochs=1, photometric=0.2), data, tmp_path / "aug", evaluate=False)
    model, ckpt = load_checkpoint(path)
    assert ckpt["info"]["train"]["photometric"] == 0.2
    assert not torch.equal(model.error_whiten, torch.eye(model.channels))  # fitted (on shifted good images)


def test_noise_augmentation_adds_seeded_sensor_noise_alone_or_with_the_light_change(mvtec_root, tmp_path):
    from adtr_deploy.train.augment import PhotometricImages

    data = open_dataset(mvtec_root, "tex")
    clean = load_image(data.train[0].path, (64, 64)).astype(np.float32)
    ds = PhotometricImages(list(data.train[:3]), (64, 64), 0.0, seed=0, noise=6.0)  # noise alone: no light change
    ds.set_epoch(0)
    a = ds[0]["image"].numpy().astype(np.float32)
    residual = a - clean
    assert 0.0 < residual.std() <= 6.5 and abs(residual.mean()) < 1.0  # zero-mean noise of at most std 6
    assert np.array_equal(a, ds[0]["image"].numpy())  # the same (seed, epoch, image): the same noise
    ds.set_epoch(1)
    assert not np.array_equal(a, ds[0]["image"].numpy())
    assert np.array_equal(PhotometricImages(list(data.train[:1]), (64, 64), 0.0)[0]["image"].numpy(), clean)
    path = train(TINY, fast(epochs=1, noise=6.0), data, tmp_path / "noise", evaluate=False)
    assert load_checkpoint(path)[1]["info"]["train"]["noise"] == 6.0


# -- the calibrated threshold's margin toward synthetic defects (calibration.DEFECT_MARGIN) -----------------------------
def test_the_threshold_is_lifted_a_share_of_the_way_to_the_synthetic_defects_and_never_lowered():
    from adtr_deploy.calibration import DEFECT_QUANTILE, calibrate

    good = np.array([10.0, 11.0, 12.0, 11.5, 10.5, 11.2])
    plain = calibrate(good, margin=0.0)
    assert plain.margin == 0.0 and plain.threshold == pytest.approx(
        max(good.mean() + 3 * good.std(), good.max() * 1.0001)
    )
    defects = np.linspace(20.0, 40.0, 30)
    lifted = calibrate(good, defect_scores=defects, margin=0.25)
    gap = np.quantile(defects, DEFECT_QUANTILE) - plain.threshold
    assert lifted.margin == pytest.approx(0.25 * gap) and lifted.threshold == pytest.approx(
        plain.threshold + 0.25 * gap
    )
    assert "synthetic defects" in lifted.method
    # defects that score like the good images (a texture where the synthesizer's defects are faint): no lift, never lower
    faint = calibrate(good, defect_scores=good - 1.0, margin=0.25)
    assert faint.threshold == pytest.approx(plain.threshold) and faint.margin == 0.0
    # a recalibration from good frames alone keeps the previous absolute margin above its new good rule
    again = calibrate(good + 5.0, keep_margin=lifted.margin)
    assert again.threshold == pytest.approx(plain.threshold + 5.0 + lifted.margin)
    with pytest.raises(UserError, match="margin"):
        calibrate(good, defect_scores=defects, margin=1.5)


def test_synthetic_defects_are_seeded_one_per_kind_and_change_the_image(mvtec_root):
    from adtr_deploy.data.validation import SOURCES, synthetic_defects

    images = [read_image(p) for p in sorted((Path(mvtec_root) / "tex" / "train" / "good").glob("*.png"))[:2]]
    one, two = synthetic_defects(images, seed=3), synthetic_defects(images, seed=3)
    assert len(one) == len(images) * len(SOURCES)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert all(d.shape == images[i // len(SOURCES)].shape for i, d in enumerate(one))
    assert all(not np.array_equal(d, images[i // len(SOURCES)]) for i, d in enumerate(one))


def test_a_model_json_from_before_the_margin_loads_with_margin_zero():
    from adtr_deploy.spec import ModelSpec

    data = ModelSpec().to_dict()
    del data["calibration"]["margin"]  # as every model.json exported before the margin existed
    spec = ModelSpec.from_json(json.dumps(data))
    assert spec.calibration.margin == 0.0 and spec.threshold == ModelSpec().threshold


def test_headroom_reads_the_brightest_values_and_warns_only_without_room():
    from adtr_deploy.preprocess import headroom, headroom_warning, value_histogram

    images = texture_images(6, 64, seed=3)
    hist = sum(value_histogram(im) for im in images)
    assert hist.shape == (3, 256) and hist.sum() == images.size
    dark = headroom(sum(value_histogram(brightness(im, 0.5)) for im in images))
    assert dark["gain"] >= 255 / 128 - 1e-3 and headroom_warning(dark) is None  # half the light: room to double it
    pale = np.full((32, 32, 3), 120, np.uint8)
    pale[:4, :, 2] = 241  # the blue highlights of a pale texture: 12.5 % of the blue values
    room = headroom(value_histogram(pale))
    assert room["values"] == [120, 120, 241] and room["channel"] == "blue" and room["gain"] == round(255 / 241, 4)
    warning = headroom_warning(room)
    assert "241" in warning and "blue" in warning and "6 % brighter" in warning
    pale[:1, :, 0] = 255  # already clipped in the training images
    clipped = headroom(value_histogram(pale))
    assert clipped["gain"] == 1.0 and "already clipped" in headroom_warning(clipped)


def test_highlight_augmentation_only_brightens_and_clips_like_a_brighter_light():
    from adtr_deploy.train.augment import highlights

    image = texture_images(1, 64, seed=5)[0]
    rng = np.random.default_rng(0)
    out = [highlights(image, rng, 0.25) for _ in range(8)]
    gains = [o.astype(float).mean() / image.astype(float).mean() for o in out]
    assert all(0.99 <= g <= 1.26 for g in gains) and max(gains) > 1.05
    assert all((o >= image).all() for o in out)  # never darker anywhere
    bright = highlights(np.full((4, 4, 3), 240, np.uint8), np.random.default_rng(1), 0.25)
    assert bright.max() <= 255 and bright.min() >= 240
    # a run stored before the automatic lever resumes without it; a new run's stored config keeps "automatic"
    old = TrainConfig().to_dict()
    del old["highlights"]
    assert TrainConfig.from_dict(old).highlights == 0.0
    assert TrainConfig.from_dict(TrainConfig().to_dict()).highlights is None


def test_pale_training_images_turn_the_highlight_augmentation_on_and_say_so(mvtec_root, tmp_path, capsys):
    """Training images with less than 15 % of headroom below 255 (a pale texture a brighter light clips) train with
    clipped highlights under the input standardization, automatically; adtr-train warns; 0 turns it off; a model
    without the standardization and images with headroom are left as they were; model.json records the headroom."""
    from adtr_deploy.export import export_checkpoint

    pale = tmp_path / "pale"
    for s in list_mvtec(mvtec_root, "tex", "train") + list_mvtec(mvtec_root, "tex", "test"):
        dst = pale / Path(s.path).relative_to(mvtec_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img = brightness(read_image(s.path), 1.9)  # brick, lit until its highlights clip
        cv2.imwrite(str(dst), img[..., ::-1])
    shutil.copytree(mvtec_root / "tex" / "ground_truth", pale / "tex" / "ground_truth")
    data = open_dataset(pale, "tex")
    path = train(ROBUST, fast(epochs=1), data, tmp_path / "auto", evaluate=False)
    info = load_checkpoint(path)[1]["info"]
    assert info["headroom"]["gain"] < 1.15 and info["headroom"]["highlights"] == 0.25
    err = capsys.readouterr().err
    assert "warning:" in err and "trains with clipped highlights" in err
    off = train(ROBUST, fast(epochs=1, highlights=0.0), data, tmp_path / "off", evaluate=False)
    assert load_checkpoint(off)[1]["info"]["headroom"]["highlights"] == 0.0
    assert "warning:" in capsys.readouterr().err  # still told about the headroom
    plain = train(TINY, fast(epochs=1), data, tmp_path / "plain", evaluate=False)
    assert load_checkpoint(plain)[1]["info"]["headroom"]["highlights"] == 0.0  # no standardization: not automatic
    err = capsys.readouterr().err
    assert "warning:" in err and "trains with clipped highlights" not in err
    normal = train(ROBUST, fast(epochs=1), open_dataset(mvtec_root, "tex"), tmp_path / "normal", evaluate=False)
    room = load_checkpoint(normal)[1]["info"]["headroom"]
    assert room["gain"] >= 1.15 and room["highlights"] == 0.0
    assert "warning:" not in capsys.readouterr().err
    spec = json.loads(export_checkpoint(path, "onnx", tmp_path / "onnx").spec_path.read_text())
    assert spec["extra"]["headroom"]["highlights"] == 0.25


def test_the_peer_drift_benchmark_puts_a_nearest_neighbour_detector_beside_the_model(runs, mvtec_root, tmp_path):
    """benchmarks/drift_peer.py on a tiny run: the PatchCore-style peer is thresholded by the same rule on the same
    calibration images; the model's own rows equal its checkpoint's scores; without the input standardization the
    peer's good scores follow a brighter light, with it they stay."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import drift_peer

    model, ckpt = runs["robust"]
    result = drift_peer.main(
        [
            "--runs", str(ckpt.parent.parent), "--data", str(mvtec_root), "--categories", "tex",
            "--shifts", "none,bright+15,bright-20", "--out", str(tmp_path / "peer.json"),
        ]
    )  # fmt: skip
    rows = {(r["setting"], r["shift"]): r for r in result["rows"]}
    assert {d for d, _ in rows} == {"adtr", "patchcore", "patchcore+norm"} and len(result["summary"]) == 3
    for r in rows.values():
        assert 0 <= r["false_alarms"] <= 1 and 0 <= r["recall"] <= 1 and np.isfinite(r["threshold"])
        assert r["train_images"] + r["calibration_images"] == 20
    good = _good_images(mvtec_root)
    assert np.isclose(rows["adtr", "none"]["good_score_median"], np.median(_scores(model, good)[1]), rtol=1e-4)

    def moved(d):
        return abs(rows[d, "bright-20"]["good_score_median"] - rows[d, "none"]["good_score_median"])

    assert moved("patchcore") > 3 * moved("patchcore+norm")
    assert "patchcore+norm" in (tmp_path / "peer.md").read_text()


def test_a_tiled_models_headroom_reads_the_images_own_pixels(tmp_path):
    """Small specular highlights that a resize to the input size averages away are read at the image's own size when
    the model is tiled (training_headroom with size None)."""
    from adtr_deploy.data.mvtec import Sample
    from adtr_deploy.train.trainer import training_headroom

    image = np.full((512, 512, 3), 110, np.uint8)
    image[::16, ::16] = 250  # one bright pixel in 256: single-pixel glints
    path = tmp_path / "glints.png"
    cv2.imwrite(str(path), image)
    resized = training_headroom([Sample(path)], (64, 64))
    native = training_headroom([Sample(path)], None)
    assert resized["gain"] > 1.15 and native["values"] == [250, 250, 250] and native["gain"] < 1.15
