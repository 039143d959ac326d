"""Small file helpers shared by every part of the package (torch-free): content hashes and atomic writes.

An atomic write goes to a hidden temporary file beside the target, then `os.replace` renames it over the target, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one. (Checkpoints use the same scheme with an
fsync: `adtr_deploy.model.checkpoint.atomic_torch_save`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(obj: Any, path: str | Path, *, sort_keys: bool = False) -> Path:
    """`obj` as indented JSON (values JSON cannot hold, such as paths, as their str) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
