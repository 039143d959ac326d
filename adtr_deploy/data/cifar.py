"""CIFAR-10 and CIFAR-100 from a local copy of the "python version" pickle batches, with the one-class protocol.

One class is normal: its training images are the training set; at test time its test images are good (label 0) and the
test images of every other class are anomalous (label 1). CIFAR-100 uses the 100 fine labels.

    CIFAR-10:  ROOT/{data_batch_1..5, test_batch, batches.meta}       (or ROOT/cifar-10-batches-py/...)
    CIFAR-100: ROOT/{train, test, meta}                                (or ROOT/cifar-100-python/...)

The batches are pickles; they are read with an unpickler that only admits the numpy array constructors they contain, so a
tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
SUBFOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

# The globals a numpy array pickle refers to (numpy 1.x and 2.x module names).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, object]:
    """One pickle batch -> dict with str keys (the originals were pickled by Python 2 with bytes keys)."""
    try:
        with open(path, "rb") as fh:
            raw = _ArrayUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise UserError(
            f"{path} is not a readable CIFAR pickle batch ({type(exc).__name__}: {exc}); "
            "use the 'python version' of CIFAR-10/100"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR batch (no dict inside); use the 'python version' of CIFAR-10/100")
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def cifar_kind(root: str | Path) -> tuple[str, Path] | None:
    """("cifar10" | "cifar100", folder with the batches) when `root` holds CIFAR batches, else None."""
    root = Path(root)
    for folder in (root, root / SUBFOLDERS["cifar10"], root / SUBFOLDERS["cifar100"]):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return "cifar10", folder
        if (folder / "train").is_file() and (folder / "test").is_file():
            return "cifar100", folder
    return None


@dataclass(frozen=True)
class CifarSplit:
    kind: str
    folder: Path
    classes: tuple[str, ...]
    normal: int  # index of the normal class

    @property
    def category(self) -> str:
        return self.classes[self.normal]


def _load(kind: str, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """-> images (N, 32, 32, 3) uint8 RGB, labels (N,), a record name per image."""
    if kind == "cifar10":
        files = CIFAR10_TRAIN if split == "train" else ("test_batch",)
        label_key = "labels"
    else:
        files = (split,)
        label_key = "fine_labels"
    images, labels, names = [], [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the CIFAR folder needs every batch file of the python version")
        batch = read_batch(path)
        data = np.asarray(batch.get("data"))
        if data.ndim != 2 or data.shape[1] != 3072 or label_key not in batch:
            raise UserError(f"{path} has no {label_key!r} or no (N, 3072) 'data'; use the 'python version' of CIFAR")
        # Rows are 1024 red, 1024 green, 1024 blue values of a 32x32 image.
        images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
        names += [folder / f"{name}[{i}]" for i in range(len(data))]
    return np.concatenate(images), np.concatenate(labels), names


def resolve_class(kind: str, folder: Path, category: str | int | None) -> CifarSplit:
    """Class name or index -> CifarSplit, with a sentence listing the classes when it is unknown."""
    if kind == "cifar10":
        meta = folder / "batches.meta"
        classes = tuple(_names(read_batch(meta)["label_names"])) if meta.is_file() else CIFAR10_CLASSES
    else:
        meta = folder / "meta"
        if meta.is_file():
            classes = tuple(_names(read_batch(meta)["fine_label_names"]))
        else:
            classes = tuple(str(i) for i in range(100))
    if category is None or str(category).strip() == "":
        raise UserError(
            f"CIFAR needs --category: the normal class, by name or index (e.g. {classes[0]} or 0); classes: "
            f"{', '.join(classes)}"
        )
    text = str(category).strip()
    if text.isdigit() and int(text) < len(classes):
        return CifarSplit(kind, folder, classes, int(text))
    if text in classes:
        return CifarSplit(kind, folder, classes, classes.index(text))
    raise UserError(f"{text!r} is not a {kind.upper()} class; give a name or index, one of: {', '.join(classes)}")


def list_cifar(split_info: CifarSplit, split: str) -> list[Sample]:
    """One-class samples: train = the normal class only; test = all test images, label 1 unless the normal class."""
    images, labels, names = _load(split_info.kind, split_info.folder, split)
    keep = labels == split_info.normal if split == "train" else np.ones(len(labels), dtype=bool)
    out = []
    for i in np.flatnonzero(keep):
        lab = int(labels[i])
        normal = lab == split_info.normal
        defect = "good" if normal else split_info.classes[lab]
        out.append(Sample(names[i], 0 if normal else 1, defect, None, images[i]))
    return out
