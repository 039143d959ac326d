"""Small file helpers shared by every part of the package (torch-free): content hashes and atomic writes.

An atomic write goes to a hidden temporary file beside the target, then `os.replace` renames it over the target, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one. `atomic_write(path, writer)` is the one
implementation; the bytes/text/JSON/copy helpers and the checkpoint writer (`model.checkpoint.atomic_torch_save`,
with fsync) are written on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, writer: Callable[[IO], Any], *, text: bool = False, fsync: bool = False) -> Path:
    """Call `writer(file)` on a temporary file beside `path`, then rename it over `path` (parent folders created).

    `text`: the file is opened in text mode (UTF-8, no newline translation, as the csv module wants), else binary.
    `fsync`: flush the data to disk before the rename (for files worth hours of work, such as checkpoints). On any
    error, Ctrl-C included, the temporary file is removed and `path` is left as it was. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") if text else open(tmp, "wb") as fh:
            writer(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders created); returns the path."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, infinity) replaced by None: what strict JSON readers (jq, a browser, an
    MES) accept, where Python's default would write the non-standard `NaN` and `Infinity`."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN or Infinity (they become null), for every JSON file and message we produce.
    The common case (nothing non-finite) encodes directly; only a value JSON refuses costs the walk that nulls it, so
    per-frame callers (results records, sink messages, the live page's JSON) pay nothing for the guarantee."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:  # NaN or infinity somewhere (a model's output, a video's timestamp): null, strict JSON still
        return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json_atomic(obj: Any, path: str | Path, *, sort_keys: bool = False) -> Path:
    """`obj` as indented strict JSON (NaN and infinity as null; values JSON cannot hold, such as paths, as their str)
    written atomically."""
    return atomic_write_text(path, dumps_strict(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of `src` to `dst` atomically (a reader of `dst` never sees half a copy); returns `dst`."""
    with open(src, "rb") as fh:
        return atomic_write(dst, lambda out: shutil.copyfileobj(fh, out, 1 << 20))
