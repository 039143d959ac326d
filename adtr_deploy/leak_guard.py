"""The test-split leak guard: images a model learns from (ADTR+ anomalies) or is calibrated on (INT8) must not come
from the test split it is evaluated on, or the measured accuracy is optimistic. Torch-free (paths, sizes and sha256
only): data (ADTR+ anomaly sources) and export (INT8 calibration images) both use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.preprocess import is_image_file


def mvtec_test_split(root: str | Path, category: str) -> list[Path]:
    """The folders of an MVTec-layout category that evaluation reads: ROOT/<category>/test and .../ground_truth."""
    base = Path(root) / category
    return [base / "test", base / "ground_truth"]


def _expand(paths: str | Path | Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """-> (resolved folders, resolved files); folders are expanded into their files recursively."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    folders, files = [], []
    for p in items:
        r = Path(p).resolve()
        if r.is_dir():
            folders.append(r)
            files.extend(q.resolve() for q in r.rglob("*") if q.is_file())
        else:
            files.append(r)
    return folders, files


def check_no_test_leak(
    anomaly_paths: str | Path | Iterable[str | Path], test_root_or_paths: str | Path | Iterable[str | Path]
) -> None:
    """Raise ValueError if any anomaly file is part of the evaluated test split.

    A file leaks when its real path (symlinks resolved) lies inside a test folder or equals a test file, or when it is
    an image whose bytes equal a test file's (a copy; sha256, only hashed for files of equal size). Re-encoded or resized
    copies are not caught: keep anomaly folders apart from the test data. Masks are checked by path only (blank masks of
    different images can be byte-identical).
    """
    test_folders, test_files = _expand(test_root_or_paths)
    test_set = set(test_files)
    by_size: dict[int, list[Path]] = {}
    for t in test_files:
        if t.is_file():
            by_size.setdefault(t.stat().st_size, []).append(t)
    hashes: dict[Path, str] = {}
    _, anomaly_files = _expand(anomaly_paths)
    for a in anomaly_files:
        reason = None
        inside = next((f for f in test_folders if a == f or f in a.parents), None)
        if inside is not None:
            reason = f"lies inside the evaluated test split {inside}"
        elif a in test_set:
            reason = f"is a file of the evaluated test split ({a})"
        elif is_image_file(a) and a.is_file() and not a.stem.endswith("_mask"):
            same_size = by_size.get(a.stat().st_size, [])
            digest = sha256_file(a) if same_size else ""
            for t in same_size:
                if t not in hashes:
                    hashes[t] = sha256_file(t)
                if hashes[t] == digest:
                    reason = f"is a byte-identical copy of the test file {t}"
                    break
        if reason:
            raise UserError(
                f"anomaly file {a} {reason}; training on test anomalies inflates the results, so take anomalies from "
                "a folder outside the test split"
            )
