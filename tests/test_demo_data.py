"""The built-in demo data set: layout, determinism, exact masks, train/test separation, atomic writes, `adtr data`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.data import command as data_command
from adtr_deploy.data import demo, demo_synth
from adtr_deploy.data.mvtec import list_mvtec

SMALL = {"num_train": 3, "num_test_good": 2, "num_per_defect": 2}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def brick_root(tmp_path_factory) -> Path:
    """The default brick category, written once through the CLI."""
    root = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(data_command, ["demo", "--out", str(root), "--categories", "brick"])
    assert result.exit_code == 0, result.output
    assert "test/scratch" in result.output and "masks 10/10" in result.output
    return root


def test_default_category_has_the_mvtec_layout_and_sizes(brick_root):
    cat = brick_root / "brick"
    assert len(list((cat / "train/good").glob("*.png"))) == demo.NUM_TRAIN
    assert len(list((cat / "test/good").glob("*.png"))) == demo.NUM_TEST_GOOD
    assert not (cat / "ground_truth/good").exists()
    for defect in demo_synth.DEFECT_TYPES:
        images = sorted((cat / "test" / defect).glob("*.png"))
        assert len(images) == demo.NUM_PER_DEFECT
        for img_path in images[:3]:
            img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
            mask = cv2.imread(str(cat / "ground_truth" / defect / f"{img_path.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8  # colour PNG, like MVTec-AD textures
            assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}


def test_demo_data_reads_through_the_mvtec_loader(brick_root):
    test = list_mvtec(brick_root, "brick", "test")
    assert len(test) == demo.NUM_TEST_GOOD + len(demo_synth.DEFECT_TYPES) * demo.NUM_PER_DEFECT
    anomalous = [s for s in test if s.label == 1]
    assert {s.defect for s in anomalous} == set(demo_synth.DEFECT_TYPES)
    assert all(s.mask is not None and s.mask.name == f"{s.path.stem}_mask.png" for s in anomalous)
    assert len(list_mvtec(brick_root, "brick", "train")) == demo.NUM_TRAIN


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(brick_root, tmp_path):
    again = demo.write_demo_dataset(tmp_path / "again", ("brick",), seed=0)
    assert _hashes(again / "brick") == _hashes(brick_root / "brick")
    other = demo.write_demo_dataset(tmp_path / "other", ("brick",), seed=1, **SMALL)
    first = _hashes(again / "brick")
    assert _hashes(other / "brick")["train/good/000.png"] != first["train/good/000.png"]


def test_masks_mark_exactly_the_changed_pixels():
    for category in demo_synth.DEMO_CATEGORIES:
        for defect in demo_synth.DEFECT_TYPES:
            for index in range(3):
                image, clean, mask = demo_synth.make_sample(category, defect, index, image_size=128)
                change = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)
                assert change[~mask].max() < demo_synth.MASK_MIN_CHANGE  # nothing visibly changed outside the mask
                assert 0.0005 < mask.mean() < 0.2, (category, defect, index)
                assert change[mask].mean() > 8, (category, defect, index)  # the defect is visible, not a no-op
        good, clean, mask = demo_synth.make_sample(category, "good", 0, image_size=128)
        assert mask is None and np.array_equal(good, clean) and good.std() > 5


def test_train_and_test_images_come_from_disjoint_columns_of_the_photo(monkeypatch):
    # A fake photo whose train columns are black and test columns white: every train image must be the category's
    # darkest colour, every test image its lightest, whatever the crop position, flip, rotation or jitter.
    photo = np.zeros((demo_synth.SOURCE_SIZE, demo_synth.SOURCE_SIZE), dtype=np.uint8)
    photo[:, demo_synth.TRAIN_COLUMNS :] = 255
    monkeypatch.setattr(demo_synth, "source_photo", lambda name: photo)
    for index in range(20):
        train = demo_synth.make_sample("grass", "train", index, image_size=64)[0]
        test = demo_synth.make_sample("grass", "good", index, image_size=64)[0]
        assert (train == demo_synth.PALETTES["grass"][0]).all()  # black * jitter = black: exactly the darkest colour
        assert len(np.unique(test.reshape(-1, 3), axis=0)) == 1  # uniform: no pixel from a train column
        assert (test[0, 0] > demo_synth.PALETTES["grass"][1]).all()  # and light (white * jitter of at most 6%)


def test_interrupted_write_leaves_no_category_that_looks_complete(tmp_path, monkeypatch):
    calls = []
    real_write = demo._write_png

    def failing_write(path, img):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        real_write(path, img)

    monkeypatch.setattr(demo, "_write_png", failing_write)
    with pytest.raises(OSError):
        demo.write_demo_dataset(tmp_path, ("gravel",), **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither gravel/ nor a temporary folder is left
    monkeypatch.setattr(demo, "_write_png", real_write)
    demo.write_demo_dataset(tmp_path, ("gravel",), **SMALL)
    assert json.loads((tmp_path / "gravel" / demo.MARKER_NAME).read_text())["counts"]["train"] == 3


def test_rewrites_only_what_is_missing_or_different_and_never_foreign_folders(tmp_path):
    root = demo.write_demo_dataset(tmp_path, ("brick",), **SMALL)
    marker = root / "brick" / demo.MARKER_NAME
    stamp = marker.stat().st_mtime_ns
    demo.write_demo_dataset(tmp_path, ("brick",), **SMALL)
    assert marker.stat().st_mtime_ns == stamp  # complete and identical: kept
    (root / "brick/ground_truth/hole/000_mask.png").unlink()
    demo.write_demo_dataset(tmp_path, ("brick",), **SMALL)
    assert (root / "brick/ground_truth/hole/000_mask.png").is_file()  # a file went missing: rewritten
    demo.write_demo_dataset(tmp_path, ("brick",), image_size=64, **SMALL)
    assert cv2.imread(str(root / "brick/train/good/000.png")).shape == (64, 64, 3)  # other settings: replaced
    (tmp_path / "grass").mkdir()
    (tmp_path / "grass" / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a demo data set folder"):
        demo.write_demo_dataset(tmp_path, ("grass",), **SMALL)
    assert (tmp_path / "grass" / "mine.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="choose from brick, grass, gravel"):
        demo.write_demo_dataset(tmp_path, ("wood",))


def test_info_reports_counts_and_missing_masks(brick_root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(data_command, ["info", str(brick_root)])
    assert result.exit_code == 0, result.output
    assert result.output.count("   masks 10/10\n") == len(demo_synth.DEFECT_TYPES)
    assert "1 category: 80 train, 60 test images" in result.output
    root = demo.write_demo_dataset(tmp_path, ("grass",), **SMALL)
    (root / "grass/ground_truth/stain/001_mask.png").unlink()
    result = runner.invoke(data_command, ["info", str(root / "grass")])
    assert "masks 1/2 (1 missing" in result.output
    result = runner.invoke(data_command, ["info", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "is not a folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(data_command, ["info", str(root), "--category", "wood"])
    assert result.exit_code != 0 and "categories there: grass" in result.output


def test_preview_and_cli_module_stay_light(tmp_path):
    path = demo.write_preview(tmp_path / "preview.png", ("gravel",), tile=64)
    grid = cv2.imread(str(path))
    assert grid.shape[1] == 9 * 64 + 8 * 3  # good + (defect, mask) x 4, with gaps
    code = "import sys, adtr_deploy.cli.data; assert 'torch' not in sys.modules and 'skimage' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
