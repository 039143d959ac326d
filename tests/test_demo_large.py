"""`adtr data demo --large`: large images with small defects and exact masks (issue 28)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("skimage")

from adtr_deploy.cli.data import command as data_command  # noqa: E402
from adtr_deploy.data.demo_large import DEFECTS, SIZES_NAME, make_large_sample, mask_size, size_band  # noqa: E402


def test_small_defects_with_exact_masks_and_their_sizes(tmp_path):
    for defect in DEFECTS:
        for i in range(4):
            image, mask = make_large_sample("brick", defect, i, size=512)
            assert image.shape == (512, 512, 3) and mask.shape == (512, 512)
            assert 3 <= mask_size(mask) <= 26  # a few pixels to about 24 px across
            again, _ = make_large_sample("brick", defect, i, size=512)
            assert np.array_equal(image, again)  # deterministic
    good, none = make_large_sample("brick", "good", 0, size=512)
    assert none is None and good.std() > 10  # a real photograph, not a flat fill
    assert [size_band(s) for s in (3, 7.9, 8, 16, 24)] == ["< 8 px", "< 8 px", "8-16 px", "> 16 px", "> 16 px"]

    out = tmp_path / "large"
    args = ["demo", "--large", "--out", str(out), "--image-size", "256", "--categories", "grass"]
    result = CliRunner().invoke(data_command, args)
    assert result.exit_code == 0, result.output
    sizes = json.loads((out / "grass" / SIZES_NAME).read_text())
    assert len(sizes) == 3 * 12 and len(list((out / "grass" / "train" / "good").glob("*.png"))) == 32
    for rel, size in list(sizes.items())[:6]:
        defect, name = rel.split("/")[1:]
        mask = cv2.imread(str(out / "grass" / "ground_truth" / defect / name.replace(".png", "_mask.png")), 0)
        assert mask_size(mask > 127) == size
