"""adtr-train --init-from CURRENT --feedback REVIEW_DIR: continue training a model on its operator's review folder
(issue 26 step 3; the folder is read by data/feedback.py).

- The review's good images (false alarms first) join the good training images, and a seeded quarter of them
  (data/feedback.py `CALIBRATION_SHARE`) joins the held-out calibration images instead: the threshold is recalibrated
  by the usual path (the data's own held-out goods + the held-out review goods, the usual defect margin).
- Confirmed defects make the run ADTR+: image-level anomalies (L_img; L_px only where a mask was drawn), mixed with
  equal weight with the default synthetic ones. They are never calibration images.
- Without confirmed defects the run is plain continued ADTR training (MSE on cached features, the cheapest run);
  --mode adtr+ adds the synthetic anomalies.
- --data and --category default to those the --init-from checkpoint was trained on.

The checkpoint's info["feedback"] (`record`) says where the run came from; adtr-export copies it into model.json's
extra, where `adtr promote` reads "model_sha256" (the reviewed model's sha256 prefix) to match a review folder to it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adtr_deploy.data.datasets import AnomalyData
from adtr_deploy.data.feedback import CALIBRATION_SHARE, ReviewData, ReviewDefects, read_review, split_review_goods
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.data.plus_dataset import test_split_of
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.leak_guard import check_no_test_leak
from adtr_deploy.model.checkpoint import read_checkpoint
from adtr_deploy.train.trainer import CHECKPOINT_NAME

# Default epochs of a feedback run: a short fine-tuning of a trained model, the ADTR+ stage of the project's ADTR vs
# ADTR+ benchmark (2 epochs after 10 of ADTR). An ADTR+ epoch runs the backbone on every image and on as many anomalies,
# so on a 2-core CPU 280 reviewed frames plus the demo's brick images take about 2 minutes an epoch with lite0
# (docs/adtr_plus.md has the measured run).
FEEDBACK_EPOCHS = 2


@dataclass(frozen=True)
class Feedback:
    """A review folder read and split for one run."""

    review: ReviewData
    train_good: list[Sample]
    calibration_good: list[Sample]

    def extra_good(self) -> tuple[list[Sample], list[Sample]]:
        """trainer.train's extra_good: (trained, calibration only)."""
        return self.train_good, self.calibration_good

    def anomaly_sources(self) -> list[ReviewDefects]:
        """The ADTR+ sources the review adds (its confirmed defects), [] without any."""
        return [ReviewDefects(self.review.defects)] if self.review.defects else []

    def record(self, init_from: str | None) -> dict[str, Any]:
        """info["feedback"] of the checkpoint (and model.json's extra after export)."""
        review = self.review
        return {
            "review_dir": str(review.root),
            "review_sha256": review.file_sha256,
            "model_sha256": review.model_sha256,
            "init_from": init_from,
            "init_from_sha256": sha256_file(init_from) if init_from else None,
            "good_train": len(self.train_good),
            "good_calibration": len(self.calibration_good),
            "false_alarms": review.false_alarms,
            "defects": len(review.defects),
            "defects_with_mask": sum(s.mask is not None for s in review.defects),
            "left_out": len(review.skipped),
            "calibration_share": CALIBRATION_SHARE,
        }

    def summary(self) -> str:
        review = self.review
        masks = sum(s.mask is not None for s in review.defects)
        return (
            f"feedback {review.root}: {len(review.good)} good images ({review.false_alarms} false alarms; "
            f"{len(self.train_good)} train, {len(self.calibration_good)} calibrate), {len(review.defects)} confirmed "
            f"defects ({masks} with a mask), {len(review.skipped)} left out"
        )


def open_feedback(review_dir: str, init_from: str | None, seed: int) -> Feedback:
    """Read and split the review folder of `adtr-train --feedback` (refused without --init-from)."""
    if init_from is None:
        raise UserError(
            "--feedback continues training an existing model; give its checkpoint or run folder with --init-from"
        )
    review = read_review(review_dir)
    return Feedback(review, *split_review_goods(review, seed))


def mode_for(review: ReviewData, mode: str, mode_given: bool) -> str:
    """ADTR+ when the review holds confirmed defects (only ADTR+ learns from them), else the mode asked for."""
    if not review.defects:
        return mode
    if mode_given and mode != "adtr+":
        raise UserError(
            f"{review.root} holds {len(review.defects)} confirmed defects, which only ADTR+ learns from; drop "
            f"--mode {mode} (the run is ADTR+ by itself)"
        )
    return "adtr+"


def _info(checkpoint: str) -> dict[str, Any]:
    """The info of `checkpoint` (a file or run folder)."""
    path = Path(checkpoint)
    return read_checkpoint(path / CHECKPOINT_NAME if path.is_dir() else path).get("info") or {}


def data_of(checkpoint: str, data_root: str | None, category: str | None) -> tuple[str, str | None]:
    """--data and --category, each defaulting to what `checkpoint` (a file or run folder) was trained on."""
    data = _info(checkpoint).get("data") or {}
    root = data.get("root")
    if data_root is None:
        if not root or not Path(root).exists():
            raise UserError(
                f"the data {checkpoint} was trained on ({root or 'not recorded'}) is not there; give the good images with "
                "--data"
            )
        data_root = root
    if category is None and root and Path(data_root).resolve() == Path(root).resolve():
        category = data.get("category")
    return data_root, category


def check_no_leak(feedback: Feedback, data: AnomalyData) -> None:
    """Refuse review images that are files (or byte copies) of the split `data` is evaluated on."""
    test = test_split_of(data)
    if test:
        check_no_test_leak(feedback.review.files(), test)


def prepare(
    review_dir: str | None,
    data_root: str | None,
    category: str | None,
    out_dir: str,
    given: Collection[str],
    **opts: Any,
) -> tuple[Feedback | None, str, str, str | None]:
    """adtr-train's options -> (the feedback, the mode, --data, --category). With --feedback (`review_dir`) the review
    decides the mode and --data/--category default to the --init-from checkpoint's; without it, only a --resume may
    omit --data (the run's own); `given` names the options given on the command line, `opts` are adtr-train's."""
    if review_dir is None:
        if not opts["resume"]:
            raise UserError("give the data folder with --data")
        if not (Path(out_dir) / CHECKPOINT_NAME).is_file():
            raise UserError(f"{out_dir} holds no run to resume; check --out")
        return None, opts["mode"], *data_of(out_dir, None, category)
    feedback = open_feedback(review_dir, opts["init_from"], opts["seed"])
    mode = mode_for(feedback.review, opts["mode"], "mode" in given)
    if _info(opts["init_from"]).get("tiling") or opts.get("tile"):
        # A tiled model's reviewed frames are whole images; ADTR+ trains on whole model-size images (not on tiles).
        raise UserError(f"{opts['init_from']} is a tiled model (--tile); --feedback trains whole-image models only")
    return feedback, mode, *data_of(opts["init_from"], data_root, category)


def for_run(
    feedback: Feedback | None, out_dir: Path, *, resume: bool, init_from: str | None, seed: int
) -> tuple[Feedback | None, dict[str, Any] | None]:
    """The feedback of a run and its record: a new run's from --feedback; a resumed run's read again from the review
    folder its checkpoint names (None for runs without feedback). A review folder changed since the run started is
    refused: the run would train on other images than it began with."""
    if not resume:
        return feedback, None if feedback is None else feedback.record(init_from)
    stored = (read_checkpoint(out_dir / CHECKPOINT_NAME).get("info") or {}).get("feedback")
    if not stored:
        return None, None
    review = read_review(stored["review_dir"])
    if review.file_sha256 != stored["review_sha256"]:
        raise UserError(
            f"{stored['review_dir']} has new labels since the run in {out_dir} started; start a new run with "
            "--feedback (and --overwrite or another --out) instead of --resume"
        )
    return Feedback(review, *split_review_goods(review, seed)), stored
