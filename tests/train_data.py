"""Small data sets in the real layouts (MVTec-AD folders, CIFAR pickle batches, plain folders), written with OpenCV/pickle
from real photographs (tests.conftest.texture_images), for the data, training and evaluation tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np

from tests.conftest import texture_images


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def _defect(good: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a square of another photograph into a good image -> (image, mask uint8 0/255)."""
    s = good.shape[0]
    side = s // 3
    y, x = (int(v) for v in rng.integers(0, s - side, size=2))
    img = good.copy()
    img[y : y + side, x : x + side] = other[y : y + side, x : x + side]
    mask = np.zeros(good.shape[:2], np.uint8)
    mask[y : y + side, x : x + side] = 255
    return img, mask


def make_mvtec(
    root: Path,
    category: str = "tex",
    *,
    n_train: int = 20,
    n_good: int = 4,
    n_masked: int = 4,
    n_unmasked: int = 3,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """ROOT/category in the MVTec-AD layout: train/good from one photograph (brick); test/good likewise; test/patch with
    masks; test/nomask (another defect folder) without masks. Defects paste a patch of the other photographs."""
    rng = np.random.default_rng(seed)
    pool = texture_images(5 * (n_train + n_good + n_masked + n_unmasked), size, seed)
    bricks, others = pool[0::5], np.concatenate([pool[1::5], pool[2::5]])
    base = root / category
    k = 0
    for i in range(n_train):
        write_png(base / "train" / "good" / f"{i:03d}.png", bricks[k])
        k += 1
    for i in range(n_good):
        write_png(base / "test" / "good" / f"{i:03d}.png", bricks[k])
        k += 1
    for i in range(n_masked):
        img, mask = _defect(bricks[k], others[i], rng)
        k += 1
        write_png(base / "test" / "patch" / f"{i:03d}.png", img)
        mask_path = base / "ground_truth" / "patch" / f"{i:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(mask_path), mask)
    for i in range(n_unmasked):
        img, _ = _defect(bricks[k], others[-1 - i], rng)
        k += 1
        write_png(base / "test" / "nomask" / f"{i:03d}.png", img)
    return root


def cifar_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """32x32 RGB images whose content depends on the class: class c is cut from photograph c % 5."""
    pool = texture_images(5 * len(labels), 32, seed)  # photograph i % 5 at index i
    return np.stack([pool[5 * j + int(c) % 5] for j, c in enumerate(labels)])


def _rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) RGB -> (N, 3072) rows of 1024 red, 1024 green, 1024 blue values, as in the CIFAR batches."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _dump(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def make_cifar10(root: Path, *, per_class_train: int = 2, per_class_test: int = 2, seed: int = 0) -> dict:
    """CIFAR-10 python-version batches (bytes keys, like the originals) in ROOT/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    written = {}
    for b in range(1, 6):
        labels = np.repeat(np.arange(10), per_class_train)
        images = cifar_images(labels, seed + b)
        _dump(
            {b"batch_label": b"training batch", b"labels": labels.tolist(), b"data": _rows(images)},
            folder / f"data_batch_{b}",
        )
        written[f"data_batch_{b}"] = (images, labels)
    labels = np.tile(np.arange(10), per_class_test)
    images = cifar_images(labels, seed + 9)
    _dump({b"batch_label": b"testing batch", b"labels": labels.tolist(), b"data": _rows(images)}, folder / "test_batch")
    written["test_batch"] = (images, labels)
    _dump({b"label_names": names, b"num_cases_per_batch": 10 * per_class_train}, folder / "batches.meta")
    return written


def make_cifar100(root: Path, *, per_class_train: int = 1, per_class_test: int = 1, seed: int = 0) -> dict:
    """CIFAR-100 python-version files train/test/meta with fine and coarse labels in ROOT/cifar-100-python."""
    folder = root / "cifar-100-python"
    written = {}
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        fine = np.repeat(np.arange(100), per)
        images = cifar_images(fine, seed + len(split))
        _dump(
            {b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": _rows(images)},
            folder / split,
        )
        written[split] = (images, fine)
    _dump(
        {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20},
        folder / "meta",
    )
    return written


def make_folder(root: Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """A plain folder of good images, some in a sub-folder, plus a non-image file that must be ignored."""
    imgs = texture_images(n, size, seed)
    for i, img in enumerate(imgs):
        write_png(root / ("sub" if i % 3 == 0 else "") / f"img_{i:02d}.png", img)
    (root / "notes.txt").write_text("not an image")
    return root
