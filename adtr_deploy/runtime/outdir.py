"""The run's output folder: one writer at a time, never destroy earlier results, continue after any stop, stay bounded.

Layout of OUT:

    results.jsonl                 the records being written now (file runs: the whole run, as always)
    results-<run>-<part>.jsonl    closed segments of a live run, oldest first by name (run id = UTC start time)
    summary.json                  the latest start's summary; `"running": true` while that start runs (a checkpoint)
    runs.jsonl                    one summary per start, oldest first: the history of every start into this folder
    overlays/                     file runs: overlays/<name>.jpg; live runs: overlays/<run>-<part>/frame_N.jpg
    frames/                       --keep-frames: flagged parts' originals (.png) and overlays (.jpg), grouped as overlays
    .adtr-run.lock                held (fcntl.flock) by the run writing here; the kernel releases it when that dies

Every record carries `run` (the id of the start that wrote it) and `model_sha256`, so records of different starts
never mix, even within one file. A second run into a folder that holds results refuses unless told `--overwrite`
(start over: everything above is removed) or `--resume` (continue: a file run skips the inputs already recorded; a
live run closes the earlier results.jsonl into a segment and starts a new one). A start that was killed (kill -9, a
crash, power loss) left `"running": true` in summary.json: the next start recounts its records from the files and
adds that recount to runs.jsonl, so every start has its summary. Records are written with one `write` call each, and
a write that fails (disk full) is cut back to the last whole record; overlays and summaries are written to a
temporary file and renamed into place, so a run cut short never leaves half a JPEG or half a summary.

This module holds the layout, the lock, the checks, the readers and the summaries; writing results.jsonl, closing it
into segments and --keep's pruning are in adtr_deploy.runtime.segments.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_bytes, write_json_atomic

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
RUNS_FILE = "runs.jsonl"
OVERLAY_DIR = "overlays"
FRAMES_DIR = "frames"  # --keep-frames: originals of flagged parts, for review (same grouping as overlays)
LOCK_FILE = ".adtr-run.lock"
SEGMENT_GLOB = "results-*.jsonl"
OUTPUTS = (RESULTS_FILE, SUMMARY_FILE, RUNS_FILE, OVERLAY_DIR)
KEEP_RUNS = 10_000  # runs.jsonl keeps the summaries of this many latest starts
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError):
    """The disk (or a quota or file-size limit) refused a write; what was written before is whole and kept."""


def disk_full(exc: OSError, path: Path) -> DiskFullError:
    return DiskFullError(
        f"the disk holding {path} is full ({exc.strerror or exc}); every record written before is complete and kept; "
        "free some space, or pass --keep SIZE so old segments and overlays are removed, then start again"
    )


def new_run_id() -> str:
    """The id of one start: its UTC time to the millisecond, e.g. 20261203T051500.123Z (sorts in time order)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z"


# -- one writer per folder -----------------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # resolved OUT -> [fd, users in this process, created the folder]


def lock_out_dir(out_dir: Path) -> None:
    """Take OUT's lock (created with the folder if needed) or refuse with a sentence naming the process holding it.

    fcntl.flock: the kernel releases it when the holder dies (crash, kill -9, power loss), so it is never stuck.
    Taken again in the same process it is counted, not re-locked (the CLI takes it before the model loads, the
    pipeline again for its run). Where fcntl does not exist (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    key = os.path.realpath(out_dir)
    if key in _held:
        _held[key][1] += 1
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; give a folder for the results")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise UserError(
                f"--out {out_dir} is in use by another adtr-run (pid {holder}); stop that run first or choose "
                "another folder"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, created]


def unlock_out_dir(out_dir: Path) -> None:
    """Release one use of the lock; the last one closes it. A folder this process created and left empty (the
    source failed to open) is removed again, so a refused start leaves nothing behind."""
    key = os.path.realpath(out_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd, _, created = entry
    if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
        (out_dir / LOCK_FILE).unlink()
        os.close(fd)
        try:
            out_dir.rmdir()
        except OSError:
            pass
        return
    os.close(fd)


# -- what the folder holds ---------------------------------------------------------------------------------------------


def segments(out_dir: Path) -> list[Path]:
    """Closed segments, oldest first."""
    return sorted(out_dir.glob(SEGMENT_GLOB))


def result_files(out_dir: Path) -> list[Path]:
    """Every file of records in OUT, oldest first: the closed segments, then results.jsonl. Readers use this."""
    current = out_dir / RESULTS_FILE
    return segments(out_dir) + ([current] if current.is_file() else [])


def camera_folders(out_dir: Path) -> list[Path]:
    """A multi-camera run's OUT (it holds cameras.json, adtr_deploy.runtime.line): each camera's folder, by name,
    removed cameras' included; [] for a single-camera folder."""
    if not (out_dir / "cameras.json").is_file():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and result_files(p))


def read_records(out_dir: Path) -> Iterator[dict]:
    """Every whole record in OUT, oldest first (a torn last line left by kill -9 is skipped). A multi-camera OUT:
    every camera's records, camera by camera (each record names its `camera`), each camera's oldest first."""
    for folder in camera_folders(out_dir):
        yield from read_records(folder)
    for path in result_files(out_dir):
        yield from file_records(path)


def file_records(path: Path, needle: bytes = b""):
    """The whole JSON-object records of one JSON-lines file (a partial last line, from a crash mid-write, and lines
    that are not JSON objects are skipped); with `needle`, only lines holding those bytes are parsed (cheap on large
    segments)."""
    with open(path, "rb") as fh:
        for line in fh:
            if needle not in line or not line.endswith(b"\n"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def earlier_outputs(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    found = [name for name in OUTPUTS if (out_dir / name).exists()]
    return found + ([SEGMENT_GLOB] if segments(out_dir) else [])


def check_out_dir(out_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an --out that is a file, or that holds an earlier run's results unless --overwrite or --resume says what
    to do with them."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; give a folder for the results")
    earlier = earlier_outputs(out_dir)
    if earlier and not (overwrite or resume):
        raise UserError(
            f"--out {out_dir} already holds the results of an earlier run ({', '.join(earlier)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another folder"
        )


def check_out_outside_source(out_dir: Path, source_root: Path | None) -> None:
    """A folder source must not contain --out: the run would score its own overlays on the next start."""
    if source_root is None:
        return
    out, root = Path(os.path.realpath(out_dir)), Path(os.path.realpath(source_root))
    if out == root or root in out.parents:
        raise UserError(
            f"--out {out_dir} is inside the source folder {source_root}: the next run would read its own results "
            "and overlays as inputs; choose an --out outside the source folder"
        )


def clear_outputs(out_dir: Path) -> None:
    """--overwrite: remove the replaced run's results, summaries, history and overlays (only our own names)."""
    for path in result_files(out_dir) + [out_dir / SUMMARY_FILE, out_dir / RUNS_FILE]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / OVERLAY_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / FRAMES_DIR, ignore_errors=True)


def repair_torn_line(results: Path) -> None:
    """Cut off a torn last line (the run was killed mid-write) so appended records start on a line of their own; it is
    the only thing removed."""
    if not results.is_file():
        return
    with open(results, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if not size:
            return
        back = min(size, 1 << 16)
        while True:
            fh.seek(size - back)
            tail = fh.read(back)
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            if cut >= 0 or back == size:
                fh.truncate(size - back + cut + 1)
                return
            back = min(size, back * 4)


def recorded_sources(out_dir: Path) -> set[str]:
    """The inputs earlier starts recorded (their records' "source"), for --resume of a file run."""
    return {r["source"] for r in read_records(out_dir) if isinstance(r.get("source"), str)}


def recount(out_dir: Path, run_id: str) -> dict:
    """Counts of the whole records a start wrote, read from the files: a killed start's summary. Reads bytes, not JSON
    (a string value cannot hold an unescaped quote, so the markers below only match our own keys), so it is fast."""
    counts = {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}
    mark = b'"run": "' + run_id.encode() + b'"'
    files = [p for p in segments(out_dir) if run_id in p.name] + [out_dir / RESULTS_FILE]
    for path in files:
        if not path.is_file():
            continue
        with open(path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n") or mark not in line:
                    continue
                counts["images"] += 1
                if b'"status": "ok"' in line:
                    counts["ok"] += 1
                    counts["anomalies"] += b'"is_anomaly": true' in line
                else:
                    counts["errors"] += 1
    return counts


def read_summary(out_dir: Path) -> dict | None:
    try:
        data = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_run_in_history(out_dir: Path) -> str | None:
    path = out_dir / RUNS_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - (1 << 16)))
        lines = fh.read().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line).get("run")
        except (json.JSONDecodeError, AttributeError):
            continue
    return None


def append_history(out_dir: Path, summary: dict) -> None:
    """Add one start's summary to runs.jsonl (one write; the newest KEEP_RUNS are kept)."""
    path = out_dir / RUNS_FILE
    line = (json.dumps(summary, allow_nan=False, separators=(",", ":")) + "\n").encode()
    repair_torn_line(path)
    with open(path, "ab") as fh:
        fh.write(line)
    if path.stat().st_size > KEEP_RUNS * 4096:  # cheap test first; trimming rewrites the file atomically
        lines = path.read_bytes().splitlines(keepends=True)
        if len(lines) > KEEP_RUNS:
            atomic_write_bytes(path, b"".join(lines[-KEEP_RUNS:]))


def finish_previous(out_dir: Path, log=None) -> dict | None:
    """Before a new start: make sure the previous start's summary is in runs.jsonl. One that was killed (its summary.json
    still says running) is recounted from its records. Returns the previous start's summary (None: there is none)."""
    previous = read_summary(out_dir)
    if previous is None:
        return None
    run = previous.get("run")
    if previous.get("running") and isinstance(run, str):
        counts = recount(out_dir, run)
        previous = {**previous, **counts, "running": False, "recounted": True, "stopped": "killed"}
        if log is not None:
            log(
                f"the start {run} in {out_dir} was killed before it could write its summary; recounted from its "
                f"records: {counts['images']} images"
            )
        write_json_atomic(previous, out_dir / SUMMARY_FILE)
    if run is None or _last_run_in_history(out_dir) != run:
        append_history(out_dir, previous)
    return previous


# -- --keep, checked with the rest before the model loads (the pruning itself: adtr_deploy.runtime.segments) ----------

_UNITS = {
    "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400,
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
    "tib": 1 << 40,
}  # fmt: skip


def parse_keep(values) -> tuple[float | None, int | None]:
    """`--keep 30d`, `--keep 5GB` (both may be given): (max age in seconds, max bytes). Units: s m h d w; B KB MB GB TB
    (powers of 1000) and KiB MiB GiB TiB."""
    age = size = None
    for text in values or ():
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS or float(m.group(1)) <= 0:
            raise UserError(
                f"--keep {text!r} is not an age or a size; write e.g. --keep 30d (s, m, h, d, w) or --keep 5GB "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value = float(m.group(1)) * _UNITS[unit]
        if unit in ("s", "m", "h", "d", "w"):
            age = value
        else:
            size = int(value)
    return age, size


# -- writing (results.jsonl itself: adtr_deploy.runtime.segments.ResultsLog) --------------------------------------------


def write_image_atomic(path: Path, image_bgr: np.ndarray) -> int:
    """JPEG/PNG by suffix, encoded in memory and renamed into place: a reader never sees half a picture. Returns the
    bytes written."""
    ok, buf = cv2.imencode(path.suffix, image_bgr)
    if not ok:
        raise UserError(f"OpenCV cannot encode {path}; use a .jpg or .png name")
    try:
        atomic_write_bytes(path, buf.tobytes())
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise disk_full(exc, path) from None
        raise
    return int(buf.size)
