"""Review of flagged parts: an operator's labels on the frames a run kept (--keep-frames), gathered into a dataset.

A run with `--keep-frames flagged` keeps the original frame of every flagged part (and a seeded `--review-sample` of
passed ones) as OUT/frames/...png, its overlay beside it as .jpg, and the record names the PNG (`original`). Each such
record has a review id: that path under frames/ without the suffix (`20261203T051500.123Z-0001/frame_000042`), prefixed
by `CAMERA:` in a multi-camera folder. Labelling (POST /api/review, `adtr review`) copies the original into the review
folder (default OUT/review/) in the MVTec layout, `defect/` for confirmed defects and `good/` for false alarms and
confirmed-good samples, and appends one JSON line per label to review.jsonl: the record's camera, frame, source, run,
timestamp, model sha256 and score, the label, who gave it and when. The last line of an id is its label.

Refused with one sentence, changing nothing: an unknown id, a label other than defect / false_alarm / good, a second
label for the same record (unless relabel), and a record of another model than the one the review folder holds.
A record of a versioned model folder's version N (`model_version`, adtr_deploy.runtime.rollout) is labelled into
the review folder's subfolder vN (OUT/review/v2/) when the folder is the default one: after a rollout the labels of
each version stay apart, and each vN is the review of one model, as `adtr-train --feedback` and `adtr promote --review`
take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_bytes, dumps_strict
from adtr_deploy.runtime.outdir import FRAMES_DIR, camera_folders, file_records, result_files

REVIEW_DIR = "review"
REVIEW_FILE = "review.jsonl"
LABELS = {"defect": "defect", "false_alarm": "good", "good": "good"}  # label -> MVTec folder
_MARK = b'"original": '


def review_id(record: dict) -> str | None:
    """The review id of a record whose frame was kept, else None."""
    original = record.get("original")
    prefix = FRAMES_DIR + "/"
    if not isinstance(original, str) or not original.startswith(prefix) or not original.endswith(".png"):
        return None
    rel = original[len(prefix) : -len(".png")]
    return f"{record['camera']}:{rel}" if record.get("camera") else rel


def _records(path: Path, needle: bytes = _MARK):
    """The whole records of one results file whose line holds `needle`."""
    return file_records(path, needle)


class Review:
    """The kept frames of one results folder (`out`, a single camera's or a line's) and the labels in `review_dir`."""

    def __init__(self, out: str | Path, review_dir: str | Path | None = None):
        self.out = Path(out)
        self.dir = Path(review_dir) if review_dir is not None else self.out / REVIEW_DIR
        self.file = self.dir / REVIEW_FILE
        self._per_version = review_dir is None  # records of a versioned model folder: REVIEW_DIR/v<N> (see above)
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------------------
    def _folder(self, camera: str | None) -> Path:
        return self.out / camera if camera else self.out

    def kept(self, limit: int | None = None) -> list[dict]:
        """Records whose frame was kept, newest first (each camera's newest files first; at most `limit`)."""
        found: list[dict] = []
        for folder in camera_folders(self.out) or [self.out]:
            mine: list[dict] = []
            for path in reversed(result_files(folder)):
                mine.extend(reversed([r for r in _records(path) if review_id(r)]))
                if limit is not None and len(mine) >= limit:
                    break
            found.extend(mine)
        found.sort(key=lambda r: r.get("timestamp") or 0, reverse=True)
        return found[:limit] if limit is not None else found

    def find(self, rid: str) -> dict:
        """The record of review id `rid`, or a UserError sentence."""
        if not isinstance(rid, str) or not rid:
            raise UserError("give the record's review id (`adtr review OUT` or GET /api/review lists them)")
        cameras = {p.name for p in camera_folders(self.out)}
        camera, sep, rel = rid.partition(":")
        if not (sep and camera in cameras):
            camera, rel = None, rid
        folder = self._folder(camera)
        needle = _MARK + json.dumps(f"{FRAMES_DIR}/{rel}.png").encode()
        for path in reversed(result_files(folder)) if folder.is_dir() else []:
            for record in _records(path, needle):
                if review_id(record) == rid:
                    return record
        raise UserError(
            f"no kept frame {rid!r} in {self.out} (unknown, or removed by --keep); `adtr review {self.out}` or "
            "GET /api/review lists the frames that can be labelled"
        )

    def image(self, record: dict, kind: str = "original") -> Path | None:
        """The kept original (.png) or overlay (.jpg) of a record, if it is still there."""
        folder = self._folder(record.get("camera")).resolve()
        path = (folder / record["original"]).resolve()
        if kind == "overlay":
            path = path.with_suffix(".jpg")
        return path if folder in path.parents and path.is_file() else None

    def folder_for(self, record: dict) -> Path:
        """The review folder a record's label goes to: `dir`, or dir/v<N> for version N of a versioned model folder."""
        version = record.get("model_version")
        if self._per_version and isinstance(version, int) and not isinstance(version, bool):
            return self.dir / f"v{version}"
        return self.dir

    def labels(self, folder: Path | None = None) -> dict[str, dict]:
        """The current label of each id (the last line of each), from review.jsonl (of `folder`, default `dir`)."""
        labels: dict[str, dict] = {}
        file = self.file if folder is None else folder / REVIEW_FILE
        if file.is_file():
            for entry in _records(file, b""):
                if isinstance(entry.get("id"), str):
                    labels[entry["id"]] = entry
        return labels

    def listing(self, limit: int = 50) -> list[dict]:
        """The newest kept frames with their review state (label, who, when), for GET /api/review and `adtr review`."""
        labels: dict[Path, dict[str, dict]] = {}
        items = []
        for r in self.kept(limit):
            rid = review_id(r)
            folder = self.folder_for(r)
            if folder not in labels:
                labels[folder] = self.labels(folder)
            done = labels[folder].get(rid)
            items.append(
                {
                    "id": rid,
                    **{k: r.get(k) for k in ("camera", "source", "frame", "timestamp", "run", "model_sha256")},
                    "model_version": r.get("model_version"),
                    **{k: r.get(k) for k in ("score", "normalized_score", "is_anomaly")},
                    "kind": "flagged" if r.get("is_anomaly") else "sample",
                    "label": done and done["label"],
                    "who": done and done["who"],
                    "labelled_at": done and done["time"],
                }
            )
        return items

    # -- labelling ---------------------------------------------------------------------------------------------------
    def label(
        self, rid: str, label: str, who: str | None, *, note: str | None = None, relabel: bool = False, via: str = "cli"
    ) -> dict:
        """Label one kept frame: its original into good/ or defect/, one line into review.jsonl. Returns the line."""
        if label not in LABELS:
            raise UserError(f"label {label!r} is not one of defect, false_alarm, good")
        if not isinstance(who, str) or not who.strip():
            raise UserError('say who labels it (--by NAME, or "by" in the request)')
        if note is not None and not isinstance(note, str):
            raise UserError("the note must be text")
        record = self.find(rid)
        folder = self.folder_for(record)
        with self._lock, _FileLock(folder):
            labels = self.labels(folder)
            sha = record.get("model_sha256")
            other = next((e["model_sha256"] for e in labels.values() if e.get("model_sha256") != sha), None)
            if other is not None:
                raise UserError(
                    f"{folder} holds labels of another model (sha256 {other}…) and this record is of model "
                    f"{sha}…; give a review folder of its own to each model (--review-dir)"
                )
            earlier = labels.get(rid)
            if earlier is not None and not relabel:
                raise UserError(
                    f"{rid!r} is already labelled {earlier['label']} by {earlier['who']} at {earlier['time']}; "
                    'pass --relabel (API: "relabel": true) to change it'
                )
            source = self.image(record)
            if source is None:
                raise UserError(f"the kept frame of {rid!r} is gone from {self.out} (removed by --keep?)")
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", rid)[-80:] + "-" + hashlib.sha1(rid.encode()).hexdigest()[:8]
            image = f"{LABELS[label]}/{name}.png"
            atomic_write_bytes(folder / image, source.read_bytes())
            if earlier is not None and earlier.get("image") != image:
                (folder / earlier["image"]).unlink(missing_ok=True)
            entry = {
                "id": rid,
                **{k: record.get(k) for k in ("camera", "frame", "source", "run", "timestamp", "model_sha256")},
                "model_version": record.get("model_version"),
                **{k: record.get(k) for k in ("score", "normalized_score", "is_anomaly")},
                "label": label,
                "image": image,
                "who": who.strip(),
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "note": note,
                "via": via,
                "relabel": earlier is not None,
            }
            with open(folder / REVIEW_FILE, "ab") as fh:
                fh.write((dumps_strict(entry) + "\n").encode())
        return entry


class _FileLock:
    """The review folder's lock (fcntl.flock on REVIEW_DIR/.lock): a running service and `adtr review` never write
    review.jsonl at the same time."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fd = -1

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock
