"""Tiling (adtr_deploy/tiling.py): the grid, stitching, the score from the stitched map, the --tile text, the spec."""

from __future__ import annotations

import numpy as np
import pytest

from adtr_deploy.spec import SPEC_VERSION, ModelSpec
from adtr_deploy.tiling import (
    Tiling,
    TilingError,
    check_requested,
    grid,
    parse_tile,
    pooled_max,
    positions,
    resolve,
    run_tiled,
    training_crops,
)


def constant_model(value: float, tile: int = 64):
    def run(batch: np.ndarray):
        assert batch.shape[1:] == (tile, tile, 3) and batch.dtype == np.uint8
        return np.full((len(batch), 1, tile, tile), value, np.float32), np.full(len(batch), value, np.float32)

    return run


@pytest.mark.parametrize("hw", [(300, 500), (64, 64), (40, 150), (1000, 77)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_constant_map_round_trips_exactly(hw, overlap):
    value = np.float32(0.3183099)  # not a round binary fraction
    tiling = Tiling(tile=(64, 64), overlap=overlap, score_pool=4)
    image = np.zeros((*hw, 3), np.uint8)
    amap, score = run_tiled(constant_model(float(value)), image, tiling, batch=5)
    assert amap.shape == hw and amap.dtype == np.float32
    assert np.array_equal(amap, np.full(hw, value, np.float32))
    assert score == float(value)


def test_grid_covers_the_image_with_the_overlap():
    for length in (64, 65, 100, 224, 1000, 1024):
        starts = positions(length, 64, 0.25)
        assert starts[0] == 0 and starts[-1] == max(0, length - 64)
        steps = np.diff(starts)
        assert (steps <= 48).all() and (steps > 0).all()  # neighbours share at least a quarter of a tile
    g = grid((1024, 2048), Tiling(tile=(224, 224), scale=0.5))
    assert g.scaled_hw == (512, 1024) and len(g) == len(g.ys) * len(g.xs) == 3 * 6


def defect_model(tile: int = 64):
    """A 'model' whose map is 1 where a pixel is bright (the defect) and 0 elsewhere, its score the map's max."""

    def run(batch: np.ndarray):
        maps = (batch.max(axis=3) > 200).astype(np.float32)[:, None]
        return maps, maps.reshape(len(batch), -1).max(axis=1)

    return run


def test_a_defect_at_a_tile_corner_is_found():
    tiling = Tiling(tile=(64, 64), overlap=0.25, score_pool=4)
    image = np.full((200, 300, 3), 40, np.uint8)
    g = grid(image.shape[:2], tiling)
    y, x = g.ys[1] + 62, g.xs[2] + 62  # the bottom-right corner of tile (1, 2), inside the overlap with its neighbours
    image[y : y + 4, x : x + 4] = 255
    amap, score = run_tiled(defect_model(), image, tiling, batch=4)
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    assert y <= peak[0] < y + 4 and x <= peak[1] < x + 4
    assert amap[y : y + 4, x : x + 4].min() > 0.99  # every covering tile sees it: the blend keeps it whole
    assert score == pytest.approx(1.0)  # the 4x4 pooled window lies on it
    clean, clean_score = run_tiled(defect_model(), np.full((200, 300, 3), 40, np.uint8), tiling, batch=4)
    assert clean.max() == 0 and clean_score == 0


def test_score_is_the_pooled_max_of_the_map():
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(0).random((97, 131)).astype(np.float32)
    for pool in (1, 4, 16):
        ref = torch.nn.functional.avg_pool2d(torch.from_numpy(m)[None, None], pool, stride=1).max().item()
        assert pooled_max(m, pool) == pytest.approx(ref, rel=1e-6)
    assert pooled_max(m[:3, :5], 16) == pytest.approx(float(m[:3, :5].mean()), rel=1e-6)


def brute_force_pooled_max(m: np.ndarray, n: int) -> float:
    """max over every n x n window lying inside the map of its plain numpy mean (float64)."""
    h, w = m.shape
    return max(
        float(m[i : i + n, j : j + n].astype(np.float64).mean()) for i in range(h - n + 1) for j in range(w - n + 1)
    )


@pytest.mark.parametrize("pool", [1, 2, 3, 8, 16])
def test_tiled_score_is_the_max_of_the_stitched_maps_pool_x_pool_means(pool):
    rng = np.random.default_rng(pool)

    def noisy_model(batch: np.ndarray):  # a map that depends on the pixels, so tiles disagree in their overlaps
        maps = batch.astype(np.float32).mean(axis=3)[:, None] / 255.0 + rng.random((len(batch), 1, 64, 64), np.float32)
        return maps, maps.reshape(len(batch), -1).max(axis=1)

    image = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    tiling = parse_tile(f"native,overlap=0.25,score_pool={pool}", (64, 64), 4)
    assert tiling.score_pool == pool
    amap, score = run_tiled(noisy_model, image, tiling, batch=3)
    assert score == pytest.approx(brute_force_pooled_max(amap, pool), rel=1e-6)
    assert pool > 1 or score == float(amap.max())  # a window of 1 is the pixel maximum


def test_scale_and_small_images():
    tiling = Tiling(tile=(64, 64), scale=0.5, score_pool=4)
    amap, _ = run_tiled(constant_model(0.25), np.zeros((400, 256, 3), np.uint8), tiling, batch=64)
    assert amap.shape == (200, 128)
    amap, _ = run_tiled(constant_model(0.25), np.zeros((30, 20, 3), np.uint8), Tiling(tile=(64, 64)), batch=1)
    assert amap.shape == (30, 20)  # padded to one tile by reflection, cropped back


def test_auto_scale_and_training_crops():
    auto = parse_tile("auto", (224, 224), 16)
    assert auto.scale is None
    assert resolve(auto, (1024, 1024)).scale == 1.0
    big = resolve(auto, (5472, 3648))  # 20 MP: at most AUTO_MAX_TILES tiles
    assert big.scale < 1 and len(grid((5472, 3648), big)) <= 64
    image = np.random.default_rng(1).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    tiling = Tiling(tile=(64, 64))
    crops = training_crops(image, tiling, np.random.default_rng(0))
    assert len(crops) == len(grid(image.shape[:2], tiling)) and np.array_equal(crops[0], image[:64, :64])
    rand = training_crops(image, Tiling(tile=(64, 64), crops="random"), np.random.default_rng(0))
    assert len(rand) == len(crops) and all(c.shape == (64, 64, 3) for c in rand)


def test_tile_text():
    assert parse_tile("off", (64, 64), 4) is None and parse_tile(None, (64, 64), 4) is None
    assert parse_tile("native", (64, 64), 4).scale == 1.0
    assert parse_tile("size=128", (64, 64), 4).scale == 0.5
    t = parse_tile("0.5,overlap=0.5,crops=random", (64, 64), 4)
    assert (t.scale, t.overlap, t.crops, t.score_pool) == (0.5, 0.5, "random", 4)  # the model's window by default
    assert parse_tile("native,score_pool=2", (64, 64), 4).score_pool == 2
    bad_texts = ("big", "1,overlap=0.9", "0,overlap=0.2", "1,crops=spiral", "1,colour=red", "1,score_pool=0")
    for bad in (*bad_texts, "1,score_pool=2.5"):
        with pytest.raises(TilingError, match="--tile") as info:
            parse_tile(bad, (64, 64), 4)
        assert "\n" not in str(info.value)


def test_requested_tiling_must_match_the_model():
    model = Tiling(tile=(64, 64), scale=1.0, score_pool=4)
    assert check_requested(model, None) is model
    assert check_requested(model, "native,crops=random") is model  # training crops do not matter at inference
    assert check_requested(None, None) is None and check_requested(None, "off") is None
    assert check_requested(model, "native,score_pool=4") is model
    cases = (("off", "trained on tiles"), ("0.5", "not 0.5"), ("native,overlap=0.5", "not native"))
    for requested, words in (*cases, ("native,score_pool=8", "score_pool=4, not native,overlap=0.25,score_pool=8")):
        with pytest.raises(TilingError, match=words):
            check_requested(model, requested)
    with pytest.raises(TilingError, match="whole images resized"):
        check_requested(None, "native")


def test_spec_carries_tiling_and_older_runtimes_refuse_it():
    tiling = Tiling(tile=(64, 64), score_pool=4)
    spec = ModelSpec(input_size=(64, 64), tiling=tiling.to_dict())
    data = spec.to_dict()
    assert data["spec_version"] == SPEC_VERSION == 2  # a version-1 runtime says "upgrade" instead of running untiled
    back = ModelSpec.from_json(spec.to_json())
    assert Tiling.from_dict(back.tiling) == tiling
    record = {k: v for k, v in tiling.to_dict().items() if k != "score_pool"}  # written before the window was a setting
    assert Tiling.from_dict(record).score_pool == 16  # as before the setting: the default window
    assert ModelSpec().to_dict()["spec_version"] == 1  # untiled specs stay readable by older runtimes
    with pytest.raises(TilingError, match="model.json"):
        Tiling.from_dict({**tiling.to_dict(), "overlap": 2}, "model.json")
