"""The one resize rule of adtr_deploy.preprocess: area averaging when an image shrinks, bilinear when it grows."""

from __future__ import annotations

import cv2
import numpy as np

from adtr_deploy.preprocess import interpolation_for, load_image, prepare
from tests.conftest import texture_images


def _flat_run_share(img: np.ndarray) -> float:
    """Share of horizontally neighbouring pixel pairs that are identical (1.0 for pure blocks)."""
    return float((np.diff(img.astype(np.int16), axis=1) == 0).all(axis=2).mean())


def test_a_32_pixel_image_enlarged_to_224_is_smooth_not_blocky():
    small = cv2.resize(texture_images(1, 128, seed=5)[0], (32, 32), interpolation=cv2.INTER_AREA)  # CIFAR-sized
    big = prepare(small, (224, 224))
    assert big.shape == (224, 224, 3)
    # nearest-neighbour-like enlarging repeats each pixel 7 times: 6 of 7 neighbour pairs are equal (share ~0.86)
    blocky = cv2.resize(small, (224, 224), interpolation=cv2.INTER_NEAREST)
    assert _flat_run_share(blocky) > 0.8
    assert _flat_run_share(big) < 0.5  # 0.37 on this texture: equal neighbours only where uint8 rounds a slope away
    # every 7x7 block of the output holds many values, not one copied pixel
    distinct = [len(np.unique(big[i : i + 7, j : j + 7, 1])) for i in range(0, 224, 7) for j in range(0, 224, 7)]
    assert np.median(distinct) > 5
    np.testing.assert_array_equal(big, cv2.resize(small, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_shrinking_averages_the_pixels_under_each_output_pixel():
    # a 2x2 checkerboard of 0 and 200: halving it must give the average, 100, everywhere (linear would sample 0 or 200)
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 200).astype(np.uint8)
    small = prepare(np.repeat(board[..., None], 3, axis=2), (32, 32))
    assert (small == 100).all()
    photo = texture_images(1, 160, seed=2)[0]
    np.testing.assert_array_equal(prepare(photo, (80, 96)), cv2.resize(photo, (96, 80), interpolation=cv2.INTER_AREA))


def test_an_image_that_grows_on_either_side_is_resized_bilinearly():
    assert interpolation_for((100, 100), (50, 50)) == cv2.INTER_AREA
    assert interpolation_for((100, 100), (100, 60)) == cv2.INTER_AREA
    assert interpolation_for((100, 100), (224, 224)) == cv2.INTER_LINEAR
    assert interpolation_for((100, 300), (224, 224)) == cv2.INTER_LINEAR  # taller: area would copy rows


def test_files_follow_the_same_rule_as_arrays(tmp_path):
    small = cv2.resize(texture_images(1, 96, seed=7)[0], (40, 30), interpolation=cv2.INTER_AREA)
    path = tmp_path / "small.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(load_image(path, (64, 64)), prepare(small, (64, 64)))
