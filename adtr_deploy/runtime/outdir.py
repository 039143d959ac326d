"""The run's output folder: never destroy earlier results, resume a file run where it stopped, write files whole.

A second run into a folder that holds results refuses unless told `--overwrite` (start over) or `--resume` (append,
skipping the inputs already recorded). Overlays are written to a temporary file and renamed into place, so a run cut
short never leaves half a JPEG.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_bytes

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
OVERLAY_DIR = "overlays"
OUTPUTS = (RESULTS_FILE, SUMMARY_FILE, OVERLAY_DIR)


def check_out_dir(out_dir: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an --out that is a file, or that holds an earlier run's results unless --overwrite or --resume says what
    to do with them."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder; give a folder for the results")
    earlier = [name for name in OUTPUTS if (out_dir / name).exists()]
    if earlier and not (overwrite or resume):
        raise UserError(
            f"--out {out_dir} already holds the results of an earlier run ({', '.join(earlier)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another folder"
        )


def recorded_sources(results: Path) -> set[str]:
    """The inputs an earlier run recorded (its records' "source"), for --resume. A torn last line (the run was killed
    mid-write) is cut off first so appended records start on a line of their own; it is the only thing removed."""
    if not results.is_file():
        return set()
    data = results.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(results, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("source"), str):
            done.add(record["source"])
    return done


def count_records(results: Path, start: int) -> dict:
    """Counts of the complete records written from byte offset `start` on: the summary's truth after an abrupt stop."""
    counts = {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}
    with open(results, "rb") as fh:
        fh.seek(start)
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            counts["images"] += 1
            if record.get("status") == "ok":
                counts["ok"] += 1
                counts["anomalies"] += int(bool(record.get("is_anomaly")))
            else:
                counts["errors"] += 1
    return counts


def write_image_atomic(path: Path, image_bgr: np.ndarray) -> None:
    """JPEG/PNG by suffix, encoded in memory and renamed into place: a reader never sees half a picture."""
    ok, buf = cv2.imencode(path.suffix, image_bgr)
    if not ok:
        raise UserError(f"OpenCV cannot encode {path}; use a .jpg or .png name")
    atomic_write_bytes(path, buf.tobytes())
