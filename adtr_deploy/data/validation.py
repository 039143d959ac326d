"""A validation split carved from the TRAINING good images, for choosing levers, presets and bounds honestly (issue 24):
the test split is never read.

`write_validation_split(ROOT, CATEGORY, OUT)` writes another MVTec-layout root:

    OUT/<cat>/train/good/*.png          the training images that are not held out (what a model is trained on)
    OUT/<cat>/test/good/*.png           the held-out good training images
    OUT/<cat>/test/<kind>/*.png         synthetic defects made on the held-out images with the package's own anomaly
    OUT/<cat>/ground_truth/<kind>/*_mask.png   synthesizer (data/anomalies.py: confetti, cutpaste, cutpaste-scar)
    OUT/<cat>/.adtr_validation.json     what was held out, the seed and the sources (written last)

A model trained on OUT (`adtr train --data OUT --category CAT`) never saw the held-out images, so its "test" split there
is a validation split: levers are chosen on it, and the real test split (ROOT/<cat>/test) is read only for the chosen
setting. Deterministic: the same seed gives the same split and the same defects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.data.anomalies import ConfettiNoise, CutPaste
from adtr_deploy.data.mvtec import GOOD, list_mvtec
from adtr_deploy.errors import UserError
from adtr_deploy.leak_guard import check_no_test_leak, mvtec_test_split
from adtr_deploy.preprocess import read_image

MARKER = ".adtr_validation.json"
# The synthetic defect kinds of the validation split: a small confetti (a local colour change, like a stain or a
# speck), a patch of the same texture moved and jittered, and a thin scar.
SOURCES = {
    "confetti": ConfettiNoise(count=(1, 3), side=(0.04, 0.12), noise_std=10.0),
    "cutpaste": CutPaste(),
    "scar": CutPaste.scar(),
}


def synthetic_defects(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """One defect of each SOURCES kind drawn on every (uint8 RGB) good image, from its own seeded random stream: what
    calibration.calibrate's margin toward the defects is measured on (adtr-train, on its calibration images)."""
    rng = np.random.default_rng(seed + 7919)
    return [source.draw(rng, img.shape[:2], img)[0] for img in images for source in SOURCES.values()]


def split_indices(n: int, hold_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of n training images: `hold_out` of them drawn with `seed`, each list sorted."""
    if not 0 < hold_out < n:
        raise UserError(f"cannot hold out {hold_out} of {n} training images; give --hold-out between 1 and {n - 1}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[hold_out:].tolist()), sorted(perm[:hold_out].tolist())


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    if not cv2.imwrite(str(path), arr):
        raise UserError(f"cannot write {path}; check that the folder is writable")


def write_validation_split(
    root: str | Path, category: str, out: str | Path, *, hold_out: int = 16, seed: int = 0
) -> Path:
    """Write OUT/<category> (see the module docstring) from ROOT/<category>/train/good only; returns OUT/<category>.

    A category already written with the same settings is kept as it is."""
    root, out = Path(root), Path(out)
    train = list_mvtec(root, category, "train")
    kept, held = split_indices(len(train), hold_out, seed)
    settings = {
        "root": str(root.resolve()),
        "category": category,
        "hold_out": hold_out,
        "seed": seed,
        "sources": sorted(SOURCES),
        "held_out": [train[i].path.name for i in held],
    }
    dest = out / category
    marker = dest / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    for i in kept:
        p = train[i].path
        _write_png(dest / "train" / GOOD / f"{p.stem}.png", read_image(p))
    rng = np.random.default_rng(seed + 1)
    for i in held:
        p = train[i].path
        img = read_image(p)
        _write_png(dest / "test" / GOOD / f"{p.stem}.png", img)
        for kind, source in SOURCES.items():
            defect, mask = source.draw(rng, img.shape[:2], img)
            _write_png(dest / "test" / kind / f"{p.stem}.png", defect)
            _write_png(dest / "ground_truth" / kind / f"{p.stem}_mask.png", mask.astype(np.uint8) * 255)
    # Nothing written may be (a byte copy of) a file of the real test split.
    check_no_test_leak(dest, [q for q in mvtec_test_split(root, category) if q.exists()])
    marker.write_text(json.dumps(settings, indent=1, allow_nan=False))
    return dest


def write_validation_root(
    root: str | Path, categories: list[str], out: str | Path, *, hold_out: int = 16, seed: int = 0
) -> Path:
    """write_validation_split for each category into one root OUT; returns OUT."""
    for category in categories:
        write_validation_split(root, category, out, hold_out=hold_out, seed=seed)
    return Path(out)
