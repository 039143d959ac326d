"""Data loaders: MVTec-AD layout (with and without masks), CIFAR-10/100 one-class from pickle batches, plain folders."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from adtr_deploy.data.cifar import read_batch
from adtr_deploy.data.datasets import ImageDataset, collate, image_loader, load_sample, open_dataset
from adtr_deploy.data.folder import list_folder
from adtr_deploy.data.mvtec import list_mvtec, mvtec_categories
from adtr_deploy.preprocess import ImageDecodeError, load_image, load_mask, prepare
from tests.train_data import make_cifar10, make_cifar100, make_folder, make_mvtec


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("mvtec"), "tex", n_train=8, n_good=3, n_masked=2, n_unmasked=2)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    return root, make_cifar10(root)


def test_mvtec_lists_train_test_defects_and_masks(mvtec_root):
    train = list_mvtec(mvtec_root, "tex", "train")
    test = list_mvtec(mvtec_root, "tex", "test")
    assert len(train) == 8 and all(s.label == 0 and s.mask is None for s in train)
    assert [s.path.name for s in train] == sorted(s.path.name for s in train)
    by_defect = {d: [s for s in test if s.defect == d] for d in ("good", "patch", "nomask")}
    assert [len(v) for v in by_defect.values()] == [3, 2, 2]
    assert all(s.label == 0 for s in by_defect["good"])
    assert all(s.label == 1 and s.mask.name == f"{s.path.stem}_mask.png" for s in by_defect["patch"])
    # A defect folder without ground truth is allowed: its images count for image metrics only.
    assert all(s.label == 1 and s.mask is None and not s.has_pixel_truth for s in by_defect["nomask"])
    assert mvtec_categories(mvtec_root) == ["tex"]


def test_open_dataset_finds_mvtec_by_root_or_by_category_folder(mvtec_root):
    a = open_dataset(mvtec_root, "tex")
    b = open_dataset(mvtec_root / "tex")  # the category folder itself
    assert a.kind == b.kind == "mvtec" and a.category == b.category == "tex"
    assert a.train == b.train and a.test == b.test and a.has_test and a.has_masks
    assert a.info() == {"kind": "mvtec", "root": str(mvtec_root.resolve()), "category": "tex"}


def test_mvtec_errors_name_the_categories(mvtec_root):
    with pytest.raises(FileNotFoundError, match="categories found there: tex"):
        open_dataset(mvtec_root, "bottle")
    with pytest.raises(ValueError, match=r"choose a category with --category \(tex\)"):
        open_dataset(mvtec_root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(mvtec_root / "nowhere", "tex")


def test_samples_load_through_the_shared_preprocessing(mvtec_root):
    data = open_dataset(mvtec_root, "tex")
    ds = ImageDataset(data.test, (48, 48), masks=True)
    patch = next(i for i, s in enumerate(data.test) if s.defect == "patch")
    item = ds[patch]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (48, 48, 3)
    assert np.array_equal(item["image"].numpy(), load_image(data.test[patch].path, (48, 48)))
    mask = item["mask"].numpy()[0]
    assert np.array_equal(mask, load_mask(data.test[patch].mask, (48, 48))) and 0 < mask.mean() < 0.5
    batch = next(iter(image_loader(data.test, (48, 48), batch_size=4, masks=True)))
    assert batch["image"].shape == (4, 48, 48, 3) and batch["mask"].shape == (4, 1, 48, 48)
    assert batch["label"].tolist() == [s.label for s in data.test[:4]]


def test_a_corrupt_image_is_reported_by_name(tmp_path):
    root = make_mvtec(tmp_path, "tex", n_train=5, n_good=1, n_masked=1, n_unmasked=0)
    bad = root / "tex" / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = open_dataset(root, "tex")
    loader = image_loader(data.train, (32, 32), batch_size=8)
    with pytest.raises(ImageDecodeError, match=f"{bad} is not a readable image"):
        next(iter(loader))
    with pytest.raises(ImageDecodeError, match="002.png"):
        collate([ImageDataset(data.train, (32, 32))[2]])


def test_cifar10_one_class_protocol(cifar10):
    root, written = cifar10
    data = open_dataset(root, "cat")  # the root above cifar-10-batches-py works too
    assert data.kind == "cifar10" and data.category == "cat"
    # Train: class 3 only, from all five batches, in RGB order exactly as written.
    assert len(data.train) == 5 * 2 and all(s.label == 0 and s.defect == "good" for s in data.train)
    images, labels = written["data_batch_1"]
    first = images[np.flatnonzero(labels == 3)[0]]
    assert np.array_equal(data.train[0].pixels, first)
    assert np.array_equal(load_sample(data.train[0], (64, 64)), prepare(first, (64, 64)))
    # Test: every test image; the normal class is good, the nine others anomalous, named by their class.
    test_labels = written["test_batch"][1]
    assert len(data.test) == len(test_labels)
    assert [s.label for s in data.test] == [int(c != 3) for c in test_labels]
    assert {s.defect for s in data.test if s.label} == {
        "airplane",
        "automobile",
        "bird",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    }
    assert not data.has_masks
    # The class may be given by index; unknown names list the classes.
    assert open_dataset(root / "cifar-10-batches-py", "3").train == data.train
    with pytest.raises(ValueError, match="airplane, automobile"):
        open_dataset(root, "zebra")
    with pytest.raises(ValueError, match="CIFAR needs --category"):
        open_dataset(root)


def test_cifar100_uses_fine_labels(tmp_path):
    written = make_cifar100(tmp_path)
    data = open_dataset(tmp_path, "class42")
    assert data.kind == "cifar100" and data.category == "class42"
    assert len(data.train) == 1 and np.array_equal(data.train[0].pixels, written["train"][0][42])
    assert sum(1 - s.label for s in data.test) == 1 and len(data.test) == 100
    assert open_dataset(tmp_path, 42).train == data.train


def test_cifar_pickles_cannot_run_code(tmp_path, cifar10):
    root, _ = cifar10
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="not a readable CIFAR pickle batch"):
        read_batch(path)
    assert not marker.exists()


def test_plain_folder_is_training_data_only(tmp_path):
    root = make_folder(tmp_path / "good", n=7)
    samples = list_folder(root)
    assert len(samples) == 7 and all(s.path.suffix == ".png" for s in samples)  # notes.txt ignored, sub/ included
    assert any(s.path.parent.name == "sub" for s in samples)
    data = open_dataset(root)
    assert data.kind == "folder" and data.category is None and not data.has_test and len(data.train) == 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        open_dataset(tmp_path / "empty")
