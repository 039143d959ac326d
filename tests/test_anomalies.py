"""Anomaly sources for ADTR+: exact masks, determinism, real/external folders, the mixed sampler and the test-leak guard."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import pytest

from adtr_deploy.data.anomalies import (
    AnomalySource,
    ArrayImages,
    Compose,
    ConfettiNoise,
    CutPaste,
    ImageFolder,
    MaskedAnomalyFolder,
    MixedAnomalySampler,
    load_normal,
)
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.leak_guard import check_no_test_leak, mvtec_test_split
from tests.conftest import texture_images

SIZE = (64, 64)


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    return texture_images(6, size=64, seed=5)


def _write(path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1] if rgb.ndim == 3 else rgb)


@pytest.mark.parametrize("source", [ConfettiNoise(), CutPaste(), CutPaste.scar()], ids=lambda s: s.name)
def test_synthetic_anomaly_changes_only_pixels_inside_its_exact_mask(source, normals):
    assert isinstance(source, AnomalySource)
    changed_fraction = []
    for seed in range(12):
        base = normals[seed % len(normals)]
        img, mask = source.draw(np.random.default_rng(seed), SIZE, base)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert mask.any() and not mask.all()
        np.testing.assert_array_equal(img[~mask], base[~mask])  # nothing outside the mask moved
        changed_fraction.append(np.any(img != base, axis=2)[mask].mean())
    # The mask is not a loose box: most labelled pixels really differ (real textures make exact repeats rare).
    assert np.mean(changed_fraction) > 0.9


def test_synthetic_anomalies_are_deterministic_given_the_seed(normals):
    for source in (ConfettiNoise(), CutPaste()):
        a = source.draw(np.random.default_rng(7), SIZE, normals[0])
        b = source.draw(np.random.default_rng(7), SIZE, normals[0])
        c = source.draw(np.random.default_rng(8), SIZE, normals[0])
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[1], c[1])


def test_cutpaste_pastes_pixels_of_the_same_image_and_scar_is_thin(normals):
    base = normals[1]
    plain = CutPaste(scale=(1.0, 1.0), max_rotation=0.0, jitter=0.0, hue=0.0)
    img, mask = plain.draw(np.random.default_rng(3), SIZE, base)
    ys, xs = np.nonzero(mask)
    patch = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()  # axis-aligned, unscaled: a full rectangle
    hit = cv2.matchTemplate(base, patch, cv2.TM_SQDIFF)
    assert hit.min() == 0  # the pasted rectangle exists verbatim elsewhere in the original image
    areas = [CutPaste.scar().draw(np.random.default_rng(s), SIZE, base)[1].mean() for s in range(8)]
    assert max(areas) < 0.03


def test_compose_mask_is_the_union_and_synthetic_sources_require_a_normal_image(normals):
    combo = Compose((ConfettiNoise(count=(2, 2)), CutPaste()))
    img, mask = combo.draw(np.random.default_rng(0), SIZE, normals[2])
    np.testing.assert_array_equal(img[~mask], normals[2][~mask])
    with pytest.raises(ValueError, match="normal"):
        ConfettiNoise().draw(np.random.default_rng(0), SIZE, None)
    with pytest.raises(ValueError, match="synthetic"):
        Compose((ArrayImages(normals),))


def test_masked_anomaly_folder_reads_the_mvtec_ground_truth_layout(tmp_path, normals):
    root = tmp_path / "anomalies"
    masks = {}
    for i, defect in enumerate(("scratch", "stain")):
        m = np.zeros((128, 128), dtype=np.uint8)
        m[10 + 20 * i : 60, 30:90] = 255
        _write(root / defect / "000.png", cv2.resize(normals[i], (128, 128)))
        _write(root / "ground_truth" / defect / "000_mask.png", m)
        masks[defect] = cv2.resize(m, SIZE, interpolation=cv2.INTER_NEAREST) > 127
    _write(root / "nomask" / "001.png", normals[3])  # an anomaly without a mask: image-level
    _write(root / "good" / "000.png", normals[4])  # never an anomaly
    src = MaskedAnomalyFolder(root)
    assert len(src.items) == 3
    assert len(src.files()) == 5  # 3 images + 2 masks, for the leak guard
    seen = {}
    for seed in range(30):
        img, mask = src.draw(np.random.default_rng(seed), SIZE)
        assert img.shape == (64, 64, 3)
        seen[None if mask is None else int(mask.sum())] = mask
    assert None in seen
    assert {int(m.sum()) for m in masks.values()} <= set(seen)


def test_empty_or_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        MaskedAnomalyFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no anomalous images"):
        MaskedAnomalyFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_external_images_are_image_level_anomalies_at_input_size(tmp_path, normals):
    _write(tmp_path / "ext" / "a" / "x.jpg", normals[0])
    _write(tmp_path / "ext" / "y.png", cv2.resize(normals[1], (100, 80)))
    folder = ImageFolder(tmp_path / "ext")
    small = ArrayImages(np.stack([cv2.resize(n, (32, 32)) for n in normals]))  # CIFAR-sized
    for src in (folder, small):
        img, mask = src.draw(np.random.default_rng(0), SIZE)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and mask is None
        assert img.std() > 5  # real pixels


def test_mixed_sampler_is_deterministic_mixes_by_weight_and_reshuffles_per_epoch(tmp_path, normals):
    _write(tmp_path / "ext" / "y.png", normals[5])
    sources = [(ConfettiNoise(), 2.0), (CutPaste(), 1.0), (ImageFolder(tmp_path / "ext"), 1.0), (CutPaste.scar(), 0.0)]
    a = MixedAnomalySampler(sources, SIZE, normals=list(normals), length=40, seed=3)
    b = MixedAnomalySampler(sources, SIZE, normals=list(normals), length=40, seed=3)
    items = [a[i] for i in range(len(a))]
    for i in (0, 17, 39):
        x, y = items[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["source"] == y["source"] and x["label"] == 1
    names = [it["source"] for it in items]
    assert "cutpaste-scar" not in names
    assert names.count("confetti") > names.count("cutpaste") > 0 and "image-folder" in names
    assert all((it["mask"] is None) == (it["source"] == "image-folder") for it in items)
    a.set_epoch(1)
    assert not all(np.array_equal(a[i]["image"], items[i]["image"]) for i in range(5))
    with pytest.raises(IndexError):
        a[40]
    with pytest.raises(ValueError, match="normal training images"):
        MixedAnomalySampler([ConfettiNoise()], SIZE)


def test_mixed_sampler_loads_normal_images_from_paths(tmp_path, normals):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"good_{i}.png")
        _write(paths[-1], cv2.resize(normals[i], (96, 96)))
    s = MixedAnomalySampler([CutPaste()], SIZE, normals=paths, length=3, seed=0)
    item = s[0]
    assert item["image"].shape == (64, 64, 3) and item["mask"].any()
    # The training code's Sample records work too: a file, or decoded pixels (CIFAR).
    samples = [Sample(path=paths[0]), Sample(path=tmp_path / "cifar[3]", pixels=normals[1])]
    assert load_normal(samples[0], SIZE).shape == (64, 64, 3)
    np.testing.assert_array_equal(load_normal(samples[1], SIZE), normals[1])
    s = MixedAnomalySampler([CutPaste()], SIZE, normals=samples, length=3, seed=0)
    assert s[1]["mask"].any()


@pytest.fixture
def mvtec(tmp_path, normals):
    root = tmp_path / "mvtec"
    _write(root / "brick" / "train" / "good" / "000.png", normals[0])
    _write(root / "brick" / "test" / "good" / "000.png", normals[1])
    _write(root / "brick" / "test" / "crack" / "000.png", normals[2])
    _write(root / "brick" / "ground_truth" / "crack" / "000_mask.png", np.full((64, 64), 255, np.uint8))
    return root


def test_leak_guard_accepts_anomalies_outside_the_test_split(tmp_path, mvtec, normals):
    own = tmp_path / "own" / "crack" / "000.png"
    _write(own, normals[3])
    check_no_test_leak([own], mvtec_test_split(mvtec, "brick"))
    check_no_test_leak(mvtec / "brick" / "train", mvtec_test_split(mvtec, "brick"))  # train side is allowed


def test_leak_guard_refuses_files_inside_the_test_split(mvtec):
    test = mvtec_test_split(mvtec, "brick")
    with pytest.raises(ValueError, match="lies inside the evaluated test split"):
        check_no_test_leak(mvtec / "brick" / "test" / "crack", test)
    with pytest.raises(ValueError, match="lies inside"):  # a path that only resolves into the test split
        check_no_test_leak([mvtec / "brick" / "train" / ".." / "test" / "crack" / "000.png"], test)
    with pytest.raises(ValueError, match="is a file of the evaluated test split"):  # test given as a list of files
        check_no_test_leak(
            [mvtec / "brick" / "test" / "crack" / "000.png"], [mvtec / "brick" / "test" / "crack" / "000.png"]
        )


def test_leak_guard_catches_symlinks_and_byte_copies(tmp_path, mvtec):
    test = mvtec_test_split(mvtec, "brick")
    outside = tmp_path / "anomalies" / "crack"
    outside.mkdir(parents=True)
    os.symlink(mvtec / "brick" / "test" / "crack" / "000.png", outside / "link.png")
    with pytest.raises(ValueError, match="inside"):
        check_no_test_leak([outside / "link.png"], test)
    (outside / "link.png").unlink()
    shutil.copy(mvtec / "brick" / "test" / "good" / "000.png", outside / "copy.png")
    with pytest.raises(ValueError, match="byte-identical copy"):
        check_no_test_leak(outside.parent, test)
    # And the sampler refuses to be built on it.
    with pytest.raises(ValueError, match="anomaly file"):
        MixedAnomalySampler([MaskedAnomalyFolder(outside.parent)], SIZE, length=2, exclude=test)


def test_plus_dataset_batches_good_images_and_anomalies_for_the_loss(tmp_path, normals):
    torch = pytest.importorskip("torch")
    from adtr_deploy.data.plus_dataset import PlusDataset

    _write(tmp_path / "ext" / "y.png", normals[5])
    mixed = MixedAnomalySampler([ConfettiNoise(), ImageFolder(tmp_path / "ext")], SIZE, normals=list(normals), length=6)
    ds = PlusDataset(list(normals[:2]), mixed)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 64, 64, 3)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (8, 64, 64)
    assert batch["label"].tolist()[:2] == [0, 0] and batch["label"][2:].eq(1).all()
    assert batch["has_mask"][:2].all()  # good images are pixel-labelled (all normal) when masks are in use
    assert not batch["mask"][:2].any()
    for i in range(2, 8):  # anomalies: a mask exactly when they have one
        assert bool(batch["has_mask"][i]) == bool(batch["mask"][i].any())
    # Image-level anomalies only (CIFAR protocol): nothing is pixel-labelled, so the loss is L_img alone.
    ext_only = PlusDataset(list(normals[:2]), MixedAnomalySampler([ImageFolder(tmp_path / "ext")], SIZE, length=2))
    assert not any(bool(ext_only[i]["has_mask"]) for i in range(len(ext_only)))
