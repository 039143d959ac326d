"""A plain folder of good images (training only): for users who have no labelled test set."""

from __future__ import annotations

from pathlib import Path

from adtr_deploy.data.mvtec import Sample, image_files
from adtr_deploy.errors import UserError


def list_folder(root: str | Path) -> list[Sample]:
    """Every image file under `root` (sub-folders included, sorted), each a good sample."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give --data a folder of good images")
    samples = [Sample(p) for p in image_files(root, recursive=True)]
    if not samples:
        raise UserError(f"{root} holds no image files; put the good training images (PNG, JPEG, ...) there")
    return samples
