"""results.jsonl and its segments: the writer, a live run's rotation into closed segments, and --keep's pruning.

A live run may last months. Its records go to OUT/results.jsonl (ResultsLog: one whole record per `write` call, a
write the disk refuses cut back to the last whole record), which is closed into `results-<run>-<part>.jsonl` once it
and its overlays reach SEGMENT_BYTES or SEGMENT_SECONDS; its overlays live in `overlays/<run>-<part>/`, so the two go
together. `--keep 30d` / `--keep 5GB` (parsed by adtr_deploy.runtime.outdir.parse_keep, with the other checks, before
the model loads) remove the oldest closed segments with their overlays; the segment being written is never removed.
A live `--resume` first closes the earlier start's results.jsonl into a segment (close_current). The folder's layout
and its readers (segments, result_files, read_records): adtr_deploy.runtime.outdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from adtr_deploy.runtime import outdir
from adtr_deploy.runtime.outdir import FRAMES_DIR, NO_SPACE, OVERLAY_DIR, RESULTS_FILE, disk_full, write_image_atomic
from adtr_deploy.runtime.postprocess import Prediction, overlay

if TYPE_CHECKING:
    from adtr_deploy.runtime.pipeline import RunOptions

SEGMENT_BYTES = 64 << 20  # a live run closes its segment at this size (records and overlays) ...
SEGMENT_SECONDS = 24 * 3600  # ... or at this age, whichever comes first

# -- naming and closing segments ---------------------------------------------------------------------------------------


def _first_run_id(path: Path) -> str | None:
    with open(path, "rb") as fh:
        line = fh.readline()
    try:
        run = json.loads(line).get("run")
    except (json.JSONDecodeError, AttributeError):
        return None
    return run if isinstance(run, str) and re.fullmatch(r"[0-9TZ.]+", run) else None


def next_part(out_dir: Path, run_id: str) -> int:
    """1 + the highest part of a run's closed segments (retention may have removed the lower ones)."""
    parts = [p.stem.rsplit("-", 1)[-1] for p in out_dir.glob(f"results-{run_id}-*.jsonl")]
    return 1 + max((int(x) for x in parts if x.isdigit()), default=0)


def segment_path(out_dir: Path, tag: str) -> Path:
    """The closed segment of part `tag` (`<run>-<part>`, also the name of its overlays folder)."""
    return out_dir / f"results-{tag}.jsonl"


def _overlay_tag(path: Path) -> str | None:
    """The overlays folder a live results.jsonl's records use (its part), from the first records that have one."""
    with open(path, "rb") as fh:
        for _, line in zip(range(1000), fh):
            try:
                overlay = json.loads(line).get("overlay")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(overlay, str) and overlay.count("/") == 2:
                return overlay.split("/")[1]
    return None


def close_current(out_dir: Path) -> None:
    """Close an earlier start's results.jsonl into a segment named after the run that wrote it (live --resume)."""
    current = out_dir / RESULTS_FILE
    if not current.is_file():
        return
    if current.stat().st_size == 0:
        current.unlink()
        return
    run = _first_run_id(current) or datetime.fromtimestamp(current.stat().st_mtime, timezone.utc).strftime(
        "%Y%m%dT%H%M%S.000Z"
    )
    tag = _overlay_tag(current)
    if tag is None or not tag.startswith(run) or segment_path(out_dir, tag).exists():
        tag = f"{run}-{next_part(out_dir, run):04d}"
    os.replace(current, segment_path(out_dir, tag))


# -- retention (--keep) ------------------------------------------------------------------------------------------------


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def apply_retention(
    out_dir: Path, max_age_s: float | None, max_bytes: int | None, known_sizes: dict[str, int] | None = None
) -> list[str]:
    """Remove the oldest closed segments, each with its overlays folder, while one is older than `max_age_s` (by its
    last write) or the folder's results and overlays exceed `max_bytes`. The segment being written is never removed.
    `known_sizes` (segment name -> bytes with its overlays) saves walking a closed segment's overlays again: they no
    longer change, and a run keeps this dict between calls. Returns the names removed."""
    if max_age_s is None and max_bytes is None:
        return []
    closed = outdir.segments(out_dir)
    known_sizes = {} if known_sizes is None else known_sizes
    for gone in set(known_sizes) - {p.name for p in closed}:
        del known_sizes[gone]
    sizes = {}
    for p in closed:
        if p.name not in known_sizes:
            tag = p.stem[len("results-") :]
            known_sizes[p.name] = p.stat().st_size + sum(
                _tree_bytes(out_dir / d / tag) for d in (OVERLAY_DIR, FRAMES_DIR)
            )
        sizes[p] = known_sizes[p.name]
    total = sum(sizes.values())
    if max_bytes is not None:
        current = out_dir / RESULTS_FILE
        total += current.stat().st_size if current.is_file() else 0
        known = {p.stem[len("results-") :] for p in closed}
        for folder in (out_dir / OVERLAY_DIR, out_dir / FRAMES_DIR):  # the segment being written's, and a file run's
            if folder.is_dir():
                total += sum(_tree_bytes(q) for q in folder.iterdir() if q.name not in known)
    now, removed = time.time(), []
    for path in closed:
        too_old = max_age_s is not None and now - path.stat().st_mtime > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break
        for folder in (OVERLAY_DIR, FRAMES_DIR):  # its overlays and its kept frames go with it
            shutil.rmtree(out_dir / folder / path.stem[len("results-") :], ignore_errors=True)
        path.unlink(missing_ok=True)
        total -= sizes[path]
        known_sizes.pop(path.name, None)
        removed.append(path.name)
    return removed


# -- writing -------------------------------------------------------------------------------------------------------------


class ResultsLog:
    """OUT/results.jsonl, appended one whole record per `write` call (the same as a flush after each line).

    A write the disk refuses (full, quota, file-size limit) is cut back to the last whole record and raises
    DiskFullError. With `rotate`, the file is closed into `results-<run>-<part>.jsonl` once it and its overlays reach
    SEGMENT_BYTES (or the --keep size / 8) or SEGMENT_SECONDS; `tag` names the current part (its overlays folder)."""

    def __init__(
        self,
        out_dir: Path,
        run_id: str,
        *,
        append: bool,
        rotate: bool,
        max_bytes: int | None = None,
        keep_frames: str = "none",
        review_sample: float = 0.0,
    ):
        self.out_dir, self.run_id, self.rotate = out_dir, run_id, rotate
        self.keep_frames, self.review_sample = keep_frames, review_sample
        self.path = out_dir / RESULTS_FILE
        self.limit = min(SEGMENT_BYTES, max_bytes // 8) if max_bytes else SEGMENT_BYTES
        self._fd = -1
        self._open(append)

    def _open(self, append: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o644)
        self.size = os.fstat(self._fd).st_size
        self.segment_bytes = 0
        self.opened = time.monotonic()
        self.tag = f"{self.run_id}-{next_part(self.out_dir, self.run_id):04d}"

    def write(self, line: bytes) -> None:
        start = self.size
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            if exc.errno in NO_SPACE:
                raise disk_full(exc, self.path) from None
            raise
        self.size += len(line)
        self.segment_bytes += len(line)

    def save_overlay(self, key: str, picture: np.ndarray) -> str:
        """OUT/overlays/<key>.jpg for files (the names a full run gives); live runs group them by segment, so
        retention removes a segment's overlays with it and a restart never overwrites an earlier start's. Returns the
        path relative to OUT (the record's `overlay`)."""
        return self._save(OVERLAY_DIR, f"{key}.jpg", picture)

    def _save(self, kind: str, name: str, picture: np.ndarray) -> str:
        folder = self.out_dir / kind
        if self.rotate:
            folder = folder / self.tag
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.segment_bytes += write_image_atomic(target, picture)
        return target.relative_to(self.out_dir).as_posix()

    def keep_frame(self, key: str, record: dict, original, drawn, pred: Prediction | None, heat) -> None:
        """--keep-frames flagged: a flagged part's original frame (RGB `original`) as lossless PNG in OUT/frames/, with
        its overlay beside it (.jpg: `drawn`, or drawn here), for review (adtr_deploy.runtime.review); passed parts too
        for the --review-sample share. Live runs group them by segment, as overlays, so --keep removes them with it.
        The record names the PNG (`original`, relative to OUT)."""
        if original is None or pred is None or not keeps(record, self.keep_frames, self.review_sample):
            return
        record["original"] = self._save(FRAMES_DIR, f"{key}.png", cv2.cvtColor(original, cv2.COLOR_RGB2BGR))
        self._save(
            FRAMES_DIR, f"{key}.jpg", drawn if drawn is not None else overlay(original, pred, heat(pred.anomaly_map))
        )

    def due(self) -> bool:
        """Time to close the segment (checked between batches)."""
        return self.rotate and (self.segment_bytes >= self.limit or time.monotonic() - self.opened >= SEGMENT_SECONDS)

    def next_segment(self) -> str:
        """Close results.jsonl into its segment and start a new one; returns the closed segment's name."""
        os.close(self._fd)
        self._fd = -1
        target = segment_path(self.out_dir, self.tag)
        os.replace(self.path, target)
        self._open(append=False)
        return target.name

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_results(out_dir: Path, run_id: str, options: RunOptions, *, live: bool, max_bytes: int | None) -> ResultsLog:
    """A new start's results.jsonl, once its source has opened: --overwrite removes the earlier results first, a live
    --resume closes the earlier start's records into a segment, a file --resume appends after a torn line is cut."""
    resume = options.resume
    if options.overwrite:
        outdir.clear_outputs(out_dir)
    if resume and live:
        close_current(out_dir)  # the earlier start's records become a closed segment
    outdir.repair_torn_line(out_dir / RESULTS_FILE)
    frames = {"keep_frames": options.keep_frames, "review_sample": options.review_sample}
    return ResultsLog(out_dir, run_id, append=resume, rotate=live, max_bytes=max_bytes, **frames)


def keeps(record: dict, mode: str, sample: float) -> bool:
    """Whether --keep-frames keeps this record's frame: every flagged part, and a seeded share `sample` of the passed
    ones (to catch misses), drawn from a hash of the record's run, source and frame: the same records whatever the
    timing, reproducible, and no state to keep."""
    if mode == "none" or record.get("status") != "ok":
        return False
    if record.get("is_anomaly"):
        return True
    if sample <= 0:
        return False
    digest = hashlib.sha256(f"{record.get('run')}|{record.get('source')}|{record.get('frame')}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < sample * 2.0**64
