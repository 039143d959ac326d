"""A versioned model folder: MODELS/<name>/<version>/model.onnx + model.json, the layout Triton uses.

`adtr promote` publishes into it; `adtr-run --model MODELS/<name>` runs its active version and, while it runs, takes the
newer versions that appear (runtime/rollout.py). Rules, kept here and nowhere else:

- A version is a folder named by a positive whole number (1, 2, ...) holding an exported model (model.onnx,
  model.engine, ...) and its model.json, plus promotion.json (what the gate measured, who promoted it, when).
- A version folder holding REVOKED (JSON: who, when, why) is withdrawn: a rollback revokes the version it leaves, so a
  restarted service does not take it up again. `restore` removes the mark.
- The active version is the highest version that is not revoked.
- Publishing copies into a hidden temporary folder in MODELS/<name> and renames it to the next number (one past the
  highest ever used, revoked ones included), so a watcher never sees half a version and numbers are never reused.
  Writers hold MODELS/<name>/.lock (flock) while they choose the number.

Torch-free (the runtime side).
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import dumps_strict, write_json_atomic

REVOKED = "REVOKED"
PROMOTION = "promotion.json"
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
_MODEL_SUFFIXES = (".onnx", ".engine", ".plan", ".torchscript", ".pt2", ".xml")


def _has_model(folder: Path) -> bool:
    return any(p.suffix.lower() in _MODEL_SUFFIXES and p.is_file() for p in folder.iterdir())


def is_model_repo(path: str | Path) -> bool:
    """Whether `path` is a versioned model folder: a folder with no model file of its own and at least one numbered
    version folder (an empty one just made by `adtr promote --to` counts once it has a version)."""
    path = Path(path)
    if not path.is_dir() or _has_model(path):
        return False
    return any(p.is_dir() and _VERSION.match(p.name) for p in path.iterdir())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ModelRepo:
    """One model's versions under `path` (MODELS/<name>)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file; give the versioned model folder (MODELS/<name>)")
        if self.path.is_dir() and _has_model(self.path):
            raise UserError(
                f"{self.path} holds a model file itself; a versioned model folder holds numbered version folders "
                "(MODELS/<name>/1/model.onnx); give another folder to `adtr promote --to`"
            )

    @property
    def name(self) -> str:
        return self.path.name

    def versions(self) -> list[int]:
        """Every version folder's number, ascending (revoked ones included)."""
        if not self.path.is_dir():
            return []
        return sorted(int(p.name) for p in self.path.iterdir() if p.is_dir() and _VERSION.match(p.name))

    def folder(self, version: int) -> Path:
        return self.path / str(int(version))

    def revoked(self, version: int) -> dict | None:
        """The REVOKED mark of a version (who, when, why), or None."""
        mark = self.folder(version) / REVOKED
        if not mark.is_file():
            return None
        import json

        try:
            data = json.loads(mark.read_text())
        except (OSError, ValueError):
            data = None
        return data if isinstance(data, dict) else {"why": "revoked (mark unreadable)"}

    def live_versions(self) -> list[int]:
        """Versions that are not revoked and hold a model, ascending."""
        return [v for v in self.versions() if self.revoked(v) is None and _has_model(self.folder(v))]

    def active(self) -> int | None:
        """The highest version neither revoked nor empty, or None."""
        live = self.live_versions()
        return live[-1] if live else None

    def require_active(self) -> int:
        version = self.active()
        if version is None:
            raise UserError(
                f"{self.path} has no version to run (none, or all revoked); publish one with `adtr promote` or "
                f"restore one with `adtr promote --restore N --to {self.path}`"
            )
        return version

    def model_path(self, version: int) -> Path:
        """The model file of a version (through the backends' own resolver: model.onnx, model.engine, ...)."""
        from adtr_deploy.runtime.backends import model_file

        return model_file(self.folder(version))

    def promotion(self, version: int) -> dict | None:
        import json

        path = self.folder(version) / PROMOTION
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @contextmanager
    def locked(self):
        """MODELS/<name>/.lock held (flock) for the block: one writer chooses a version number at a time."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            yield
        finally:
            os.close(fd)

    def publish(self, files: list[Path], promotion: dict) -> int:
        """Copy `files` (the model file, model.json and the files they need) into the next version, with
        promotion.json; returns the new version's number. The version appears whole (a rename) or not at all."""
        with self.locked():
            version = max(self.versions(), default=0) + 1
            tmp = self.path / f".incoming-{version}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                for src in files:
                    shutil.copy2(src, tmp / Path(src).name)
                write_json_atomic({**promotion, "version": version}, tmp / PROMOTION)
                for p in tmp.iterdir():  # the data reaches the disk before the rename makes it visible
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
                os.replace(tmp, self.folder(version))
                _fsync_dir(self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return version

    def revoke(self, version: int, by: str, why: str) -> dict:
        """Mark a version withdrawn (a rollback); the mark survives restarts."""
        if version not in self.versions():
            raise UserError(f"{self.path} has no version {version}; versions: {self.versions() or 'none'}")
        mark = {"version": int(version), "by": by, "time": now_iso(), "why": why}
        with self.locked():
            (self.folder(version) / REVOKED).write_text(dumps_strict(mark) + "\n")
        return mark

    def restore(self, version: int) -> None:
        """Take a revoked version back (it becomes active again if it is the highest)."""
        if version not in self.versions():
            raise UserError(f"{self.path} has no version {version}; versions: {self.versions() or 'none'}")
        with self.locked():
            (self.folder(version) / REVOKED).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not POSIX
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
