"""adtr-train --tile: training on crops at native resolution, calibration and evaluation tiled and stitched against
full-resolution masks, and train, export and run agreeing on the tile settings (issue 28)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from adtr_deploy.cli.evaluate import command as eval_command  # noqa: E402
from adtr_deploy.cli.export import command as export_command  # noqa: E402
from adtr_deploy.cli.train import command as train_command  # noqa: E402
from adtr_deploy.data.mvtec import Sample  # noqa: E402
from adtr_deploy.data.tiles import tile_samples  # noqa: E402
from adtr_deploy.model.checkpoint import read_checkpoint  # noqa: E402
from adtr_deploy.runtime import Inferencer  # noqa: E402
from adtr_deploy.spec import ModelSpec  # noqa: E402
from adtr_deploy.tiling import Tiling, grid  # noqa: E402
from adtr_deploy.train.evaluate import open_runner, predict  # noqa: E402
from tests.train_data import make_mvtec  # noqa: E402


def test_tile_samples_cut_every_training_image_into_its_grid():
    rng = np.random.default_rng(0)
    samples = [Sample(path=f"img{i}.png", pixels=rng.integers(0, 255, (150, 100, 3), dtype=np.uint8)) for i in range(3)]
    tiles, tiling = tile_samples(samples, Tiling(tile=(64, 64), scale=None, score_pool=4), seed=0)
    assert tiling.scale == 1.0  # auto at this size: native
    per_image = len(grid((150, 100), tiling))
    assert len(tiles) == 3 * per_image and all(t.pixels.shape == (64, 64, 3) for t in tiles)
    assert np.array_equal(tiles[per_image].pixels, samples[1].pixels[:64, :64]) and "img1.png[tile 0]" in str(
        tiles[per_image].path
    )


def test_train_export_and_run_agree_on_the_tiling(tmp_path):
    root = make_mvtec(tmp_path / "data", "tex", n_train=8, n_good=2, n_masked=2, n_unmasked=0, size=160)
    out = tmp_path / "run"
    base = ["--data", str(root), "--category", "tex", "--out", str(out), "--preset", "tiny", "--epochs", "1"]
    # score_pool=3: not the tiny preset's own window (4), so a side that ignored the setting would score otherwise
    result = CliRunner().invoke(train_command, [*base, "--quiet", "--tile", "native,overlap=0.5,score_pool=3"])
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(out / "checkpoint.pt")
    tiling = Tiling.from_dict(ckpt["info"]["tiling"])
    assert (tiling.tile, tiling.scale, tiling.overlap, tiling.score_pool) == ((64, 64), 1.0, 0.5, 3)
    assert ckpt["info"]["split"]["train_images"] == 4 * len(grid((160, 160), tiling))  # 4 images kept, 4 calibrate
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tiling"] == tiling.to_dict() and metrics["pixel_auroc"] is not None

    # evaluation of the checkpoint: whole images, stitched maps at the masks' full resolution
    runner = open_runner(out / "checkpoint.pt")
    assert runner.tiling == tiling
    from adtr_deploy.data.layout import open_dataset

    preds = predict(runner, open_dataset(root, "tex").test, keep_maps=True)
    assert preds.maps.shape[-2:] == preds.masks.shape[-2:] == (160, 160)
    k = 3  # each score is the stitched map's largest 3 x 3 mean
    for amap, score in zip(preds.maps[:, 0], preds.scores[preds.pixel_index], strict=True):
        means = [
            amap[i : i + k, j : j + k].mean(dtype=np.float64) for i in range(160 - k + 1) for j in range(160 - k + 1)
        ]
        assert score == pytest.approx(max(means), rel=1e-5)

    # export: model.json carries the same tiling; the runtime tiles with it and scores as the checkpoint
    exp = tmp_path / "export"
    result = CliRunner().invoke(
        export_command,
        ["--model", str(out), "--format", "onnx", "--out", str(exp), "--exporter", "torchscript"],
    )
    assert result.exit_code == 0, result.output
    model = next(exp.glob("*.onnx"))
    verification = json.loads((exp / "verification.json").read_text())  # verified on what the graph will see: tiles
    assert (
        verification["passed"]
        and verification["image_source"] == "16 tiles of 4 of the checkpoint's calibration images"
    )
    assert ModelSpec.load(exp / "model.json").tiling == tiling.to_dict()
    test_paths = [s.path for s in open_dataset(root, "tex").test]
    with Inferencer(model) as inf:
        scores = [inf.predict(p).score for p in test_paths]
    np.testing.assert_allclose(scores, preds.scores, rtol=1e-3, atol=1e-4)
    result = CliRunner().invoke(
        eval_command, ["--model", str(model), "--data", str(root), "--category", "tex", "--quiet"]
    )
    assert result.exit_code == 0, result.output

    # a mismatch is refused in one sentence: resuming with other tiles, running with other tiles
    resumed = CliRunner().invoke(train_command, [*base[:6], "--resume", "--quiet", "--tile", "0.5"])
    last = resumed.output.splitlines()[-1]
    assert resumed.exit_code != 0 and last.startswith("Error: the run in") and "was trained on tiles" in last
    with pytest.raises(Exception, match="trained on tiles native,overlap=0.5, not native,overlap=0.25"):
        Inferencer(model, tile="native")
    with pytest.raises(Exception, match="score_pool=3, not native,overlap=0.5,score_pool=4"):
        Inferencer(model, tile="native,overlap=0.5,score_pool=4")
    with Inferencer(model, tile="native,overlap=0.5,score_pool=3") as inf:  # the model's own settings, spelt out
        assert inf.tiling == tiling
