"""A model trained on tiles, exported and run: the runtime tiles as model.json says, agrees with the checkpoint, and
refuses to run otherwise in one sentence (issue 28)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.runtime import Inferencer
from adtr_deploy.runtime.base import BackendError
from adtr_deploy.spec import ModelSpec
from adtr_deploy.tiling import Tiling, TilingError, run_tiled
from tests import runtime_fixtures as rf
from tests.conftest import texture_images

TILING = Tiling(tile=(rf.INPUT_SIZE, rf.INPUT_SIZE), scale=1.0, overlap=0.25, score_pool=4)


@functools.cache
def tiled_export() -> Path:
    """The runtime tests' tiny reference model, checkpointed as if trained on tiles and exported to ONNX."""
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model.checkpoint import save_checkpoint

    work = rf._workdir() / "tiled"
    ckpt = save_checkpoint(
        work / "checkpoint.pt", rf.reference_model(), calibration=rf.calibration(), info={"tiling": TILING.to_dict()}
    )
    return Path(export_checkpoint(ckpt, "onnx", work / "export", verify=False, dynamo=False).path)


def large_image(h: int = 150, w: int = 220, seed: int = 7) -> np.ndarray:
    """A real photograph larger than the model's input (uint8 RGB)."""
    tile = texture_images(1, 256, seed)[0]
    return np.ascontiguousarray(cv2.resize(tile, (w, h), interpolation=cv2.INTER_AREA))


def torch_tiled(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The same image tiled through the PyTorch checkpoint (the reference)."""
    return run_tiled(rf.reference_outputs, image, TILING, batch=3)


def test_export_carries_the_tiling_and_the_run_matches_the_checkpoint():
    model = tiled_export()
    spec = ModelSpec.load(model.with_name("model.json"))
    assert Tiling.from_dict(spec.tiling) == TILING and spec.to_dict()["spec_version"] == 2
    image = large_image()
    with Inferencer(model) as inf:
        assert inf.tiling == TILING
        pred = inf.predict(image)
    ref_map, ref_score = torch_tiled(image)
    assert pred.anomaly_map.shape == image.shape[:2] == ref_map.shape
    np.testing.assert_allclose(pred.anomaly_map, ref_map, atol=2e-4, rtol=2e-4)
    assert pred.score == pytest.approx(ref_score, rel=2e-4, abs=2e-4)
    assert pred.is_anomaly == (ref_score > rf.calibration().threshold)


def test_one_tile_image_scores_as_the_untiled_model():
    """An image exactly one tile large: the stitched map is the model's map and the score its score."""
    image = texture_images(1, rf.INPUT_SIZE, seed=11)[0]
    with Inferencer(tiled_export()) as inf:
        pred = inf.predict(image)
    ref_map, ref_score = rf.reference_outputs(image[None])
    np.testing.assert_allclose(pred.anomaly_map, ref_map[0, 0], atol=2e-4, rtol=2e-4)
    assert pred.score == pytest.approx(float(ref_score[0]), rel=2e-4, abs=2e-4)


def test_mismatched_tiling_is_refused_in_one_sentence(tmp_path):
    model = tiled_export()
    for requested, words in (("off", "trained on tiles"), ("0.5", "not 0.5")):
        with pytest.raises(TilingError, match=words) as info:
            Inferencer(model, tile=requested)
        assert "\n" not in str(info.value)
    with pytest.raises(TilingError, match="whole images resized"):
        Inferencer(rf.onnx_model(), tile="native")
    # A model.json whose tiling was removed (or changed) by hand: the model would run untiled by accident.
    spec = ModelSpec.load(model.with_name("model.json"))
    for tiling in (None, {**TILING.to_dict(), "overlap": 0.5}):
        dest = tmp_path / f"copy-{tiling is None}"
        dest.mkdir()
        (dest / model.name).write_bytes(model.read_bytes())
        spec.replace(tiling=tiling).save(dest / "model.json")
        with pytest.raises(BackendError, match="scores only the way it was trained"):
            Inferencer(dest / model.name)


def test_adtr_run_tiles_each_frame_and_draws_at_the_source_size(tmp_path):
    from adtr_deploy.cli.run import command

    folder = tmp_path / "large"
    folder.mkdir()
    images = [large_image(150, 220, seed=3), large_image(100, 300, seed=4), large_image(40, 50, seed=5)]
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i}.png"), img[..., ::-1])
    out = tmp_path / "out"
    args = ["--model", tiled_export(), "--source", folder, "--out", out, "--batch-size", "2", "--save-overlays"]
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["source"]).name for r in records] == ["0.png", "1.png", "2.png"]
    for r, img in zip(records, images, strict=True):
        _, ref_score = torch_tiled(img)  # frames of one batch never share tiles: each scores as on its own
        assert r["status"] == "ok" and r["score"] == pytest.approx(ref_score, rel=2e-4, abs=2e-4)
        assert cv2.imread(str(out / r["overlay"])).shape[:2] == img.shape[:2]
    # --max-pixels still refuses an image from its header, before decoding
    result = CliRunner().invoke(command, [*[str(a) for a in args[:-1]], "--overwrite", "--max-pixels", "20000"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["error", "error", "ok"]
    assert "max-pixels" in records[0]["error"]


def test_recalibration_scores_good_frames_tiled(tmp_path):
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.recalibrate import score_folder

    images = [large_image(150, 220, seed=20 + i) for i in range(3)]
    for i, img in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), img[..., ::-1])
    with open_model(tiled_export()) as engine:
        names, scores, maps = score_folder(engine, tmp_path, batch_size=2)
    assert names == ["0.png", "1.png", "2.png"] and maps.size == 3 * 150 * 220  # stitched maps of each image's size
    np.testing.assert_allclose(scores, [torch_tiled(img)[1] for img in images], rtol=2e-4, atol=2e-4)
