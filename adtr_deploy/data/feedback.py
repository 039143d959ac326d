"""An operator's review folder as training data (`adtr-train --feedback REVIEW_DIR`, issue 26 step 3).

`adtr review` and POST /api/review (runtime/review.py) write the review folder in the MVTec layout:

    REVIEW_DIR/good/*.png                            false alarms and confirmed-good samples
    REVIEW_DIR/defect/*.png                          confirmed defects
    REVIEW_DIR/ground_truth/defect/<stem>_mask.png   optional pixel masks of defects, drawn by hand later
    REVIEW_DIR/review.jsonl                          one JSON line per label; the last line of an id is its label

`read_review` reads it into good samples (false alarms first) and defects; a listed file that is missing or does not
decode is reported and left out. `split_review_goods` holds out a seeded share of the good ones for calibration;
`ReviewDefects` is the ADTR+ anomaly source of the defects. numpy + OpenCV only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import ImageDecodeError, load_image, load_mask, read_image

REVIEW_FILE = "review.jsonl"  # runtime/review.py's name (data/ does not import the runtime)
FOLDERS = {"false_alarm": "good", "good": "good", "defect": "defect"}  # label -> folder, false alarms first
# Share of the review's good images held out for calibration, per label (false alarms, confirmed good). A quarter,
# more than --val-fraction's tenth: these images are few and are exactly what the threshold must learn to accept, while
# three quarters still teach the model their look. Calibrating on trained images would read their scores too low and
# set the threshold too low, so every held-out image is calibration only.
CALIBRATION_SHARE = 0.25


@dataclass(frozen=True)
class ReviewData:
    """The usable labels of one review folder."""

    root: Path
    file_sha256: str  # of review.jsonl as read
    model_sha256: str | None  # the reviewed model's sha256 prefix (records' model_sha256)
    good: tuple[Sample, ...]  # the false alarms first, then the confirmed-good samples, each in review.jsonl order
    false_alarms: int  # how many of `good` are false alarms
    defects: tuple[Sample, ...]  # label 1; mask set where ground_truth/defect/<stem>_mask.png decodes
    skipped: tuple[str, ...]  # one sentence per listed file left out

    def files(self) -> list[Path]:
        """Every image and mask file that training reads (for the test-split leak guard)."""
        return [p for s in self.good + self.defects for p in (s.path, s.mask) if p is not None]


def _current_labels(file: Path, text: bytes) -> tuple[dict[str, dict], list[str]]:
    """id -> its last line in review.jsonl (`text`), and sentences for lines that are not records (a torn last line)."""
    labels: dict[str, dict] = {}
    bad: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            bad.append(f"line {n} of {file} is not a review record; left out")
            continue
        labels[entry["id"]] = entry
    return labels, bad


def _readable(path: Path, what: str) -> str | None:
    """None when `path` decodes as an image, else the sentence saying why it is left out."""
    if not path.is_file():
        return f"{what} {path} is missing; left out"
    try:
        read_image(path)
    except ImageDecodeError as exc:
        return f"{what}: {exc}; left out"
    return None


def read_review(root: str | Path) -> ReviewData:
    """The current label of each reviewed id in `root` and its image; refuses (UserError) a folder without
    review.jsonl, one with no usable label, one mixing labels of several models, and a line naming a file outside it."""
    root = Path(root).expanduser()
    file = root / REVIEW_FILE
    if not file.is_file():
        versions = sorted(p.parent.name for p in root.glob(f"v*/{REVIEW_FILE}"))
        if versions:  # a versioned model folder's review: one folder per version (runtime/review.py)
            raise UserError(
                f"{root} holds the review folders of versions {', '.join(versions)}; give --feedback the one of the "
                f"version that was reviewed, e.g. {root / versions[-1]}"
            )
        raise UserError(
            f"{root} is not a review folder (no {REVIEW_FILE}); give --feedback the folder `adtr review` writes "
            "(OUT/review by default)"
        )
    text = file.read_bytes()  # once: the digest is of exactly the lines read, while a service may append more
    labels, skipped = _current_labels(file, text)
    models = sorted({str(e.get("model_sha256")) for e in labels.values() if e.get("model_sha256")})
    if len(models) > 1:
        raise UserError(
            f"{root} mixes labels of {len(models)} models (sha256 {', '.join(m + '…' for m in models)}); give "
            "--feedback a review folder of one model"
        )
    base = root.resolve()
    by_label: dict[str, list[Sample]] = {label: [] for label in FOLDERS}
    for rid, entry in labels.items():
        label, image = entry.get("label"), entry.get("image")
        if label not in FOLDERS:
            skipped.append(f"{rid!r} has the label {label!r}, not one of defect, false_alarm, good; left out")
            continue
        path = (root / str(image)).resolve() if isinstance(image, str) and image else None
        if path is None or base not in path.parents:
            raise UserError(
                f"{file} names the image {image!r} for {rid!r}, which is not a file inside {root}; remove that line "
                "or restore the folder as `adtr review` wrote it"
            )
        if path.parent != base / FOLDERS[label]:
            skipped.append(f"{rid!r} is labelled {label} but its image {image} is not in {FOLDERS[label]}/; left out")
            continue
        why = _readable(path, f"the image of {rid!r}")
        if why:
            skipped.append(why)
            continue
        mask = None
        if label == "defect":
            candidate = base / "ground_truth" / "defect" / f"{path.stem}_mask.png"
            if candidate.exists():
                why = _readable(candidate, f"the mask of {rid!r}")
                mask = None if why else candidate
                if why:
                    skipped.append(why.replace("; left out", "; the defect is used without it"))
        by_label[label].append(Sample(path, 1, "defect", mask) if label == "defect" else Sample(path))
    good = tuple(by_label["false_alarm"] + by_label["good"])
    if not good and not by_label["defect"]:
        raise UserError(
            f"{root} holds no usable labels ({len(labels)} ids in {REVIEW_FILE}, {len(skipped)} left out); label "
            "kept frames with `adtr review` first"
        )
    return ReviewData(
        root=base,
        file_sha256=hashlib.sha256(text).hexdigest(),
        model_sha256=models[0] if models else None,
        good=good,
        false_alarms=len(by_label["false_alarm"]),
        defects=tuple(by_label["defect"]),
        skipped=tuple(skipped),
    )


def split_review_goods(review: ReviewData, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, calibration) of the review's good images: within each label, a seeded CALIBRATION_SHARE (rounded half
    up) is held out; at least one image overall once there are two, so the threshold always sees a reviewed frame
    (from the larger label). A single image trains: it cannot be both, and the data's own held-out goods calibrate."""
    groups = [list(review.good[: review.false_alarms]), list(review.good[review.false_alarms :])]
    counts = [int(len(g) * CALIBRATION_SHARE + 0.5) for g in groups]
    if sum(counts) == 0 and len(review.good) >= 2:
        counts[int(len(groups[1]) > len(groups[0]))] = 1
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    calibration: list[Sample] = []
    for group, k in zip(groups, counts, strict=True):
        held = set(rng.permutation(len(group))[:k].tolist())
        train += [s for i, s in enumerate(group) if i not in held]
        calibration += [s for i, s in enumerate(group) if i in held]
    return train, calibration


class ReviewDefects:
    """The review's confirmed defects as an ADTR+ anomaly source: image-level anomalies (L_img), with the pixel loss
    only where a hand-drawn mask exists."""

    needs_normal = False

    def __init__(self, defects: Sequence[Sample], name: str = "review-defects"):
        if not defects:
            raise UserError("the review folder holds no confirmed defects to train on")
        self.items = [(s.path, s.mask) for s in defects]
        self.name = name
        self.gives_masks = any(m is not None for _, m in self.items)

    def draw(self, rng: np.random.Generator, size: tuple[int, int], normal: np.ndarray | None = None):
        path, mask = self.items[int(rng.integers(len(self.items)))]
        return load_image(path, size), (load_mask(mask, size) if mask is not None else None)

    def files(self) -> list[Path]:
        return [p for item in self.items for p in item if p is not None]
