"""The gate before rollout: `adtr promote CANDIDATE --against CURRENT --review REVIEW_DIR --to MODELS/NAME`.

Both exported models score, each with its own calibrated threshold, the reviewed items of REVIEW_DIR (review.jsonl's
last label per id: good/ = false alarms and confirmed-good samples, defect/ = confirmed defects) and, with --good DIR,
held-out good images the candidate was not trained on. Per model: how many reviewed good items and held-out good images
it flags (false alarms), how many confirmed defects it flags (recall), and the median normalized score of the good
images (0 = the calibration's good mean, 0.5 = the threshold); the shift is candidate minus current.

Refused, in one sentence, with nothing written (ties pass: a candidate as good as the current one may replace it):
- no labels: an empty review.jsonl; no confirmed defect (the gate could not check that defects are still found);
- a review of another model: a label's model_sha256 is not CURRENT's sha256 prefix;
- a candidate trained on the review of another model (its model.json extra.feedback.model_sha256 is not CURRENT's);
- an incompatible candidate: another input size, backbone, input layout (layout, dtype, colour) or tiling than CURRENT;
- a versioned folder (--to) whose active version is not CURRENT, or whose versions are all revoked;
- a regression: the candidate finds fewer confirmed defects than CURRENT, flags more held-out good images than CURRENT,
  or flags more of the reviewed good items than CURRENT (the parts the operator called good).
The reviewed items are what a feedback candidate was trained on, so only the held-out good images measure false alarms
on parts neither model has seen; without --good the gate says so. Bad input is an error sentence, also changing nothing:
--good inside the review folder (or the one the candidate's feedback names), a label naming an image outside its review
folder or a missing one, a model that scores NaN.

Promoted: the candidate's model file, model.json and the other files its extra.files names are published as the next
version of MODELS/NAME (runtime/modelrepo.py) with promotion.json (the figures, candidate, against, review folder and
review.jsonl's sha256, who, when). A folder without versions first gets CURRENT as version 1 ("baseline") so a rollback
has something to return to. CURRENT may itself be the versioned folder: its active version is compared, and the
candidate is published into it unless --to says otherwise.

Torch-free (numpy + the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adtr_deploy.calibration import normalize_scores
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.runtime.modelrepo import ModelRepo, is_model_repo, now_iso
from adtr_deploy.runtime.review import LABELS, REVIEW_FILE, Review
from adtr_deploy.spec import ModelSpec

SHA_PREFIX = 16  # records and review labels carry the model's sha256 cut to 16 hex digits (runtime/records.py)


class PromotionRefused(UserError):
    """The gate refused the candidate; `report` holds what it measured (figures may be absent for early refusals)."""

    def __init__(self, sentence: str, report: dict):
        super().__init__(sentence)
        self.report = {**report, "decision": "refused", "sentence": sentence}


@dataclass(frozen=True)
class Model:
    """An exported model as the gate sees it: its files, spec, sha256, and the versioned folder it came from."""

    given: Path
    artifact: Path
    spec_path: Path
    spec: ModelSpec
    sha256: str
    repo: ModelRepo | None = None
    version: int | None = None

    @property
    def short(self) -> str:
        return self.sha256[:SHA_PREFIX]

    def files(self) -> list[Path]:
        """The model file, model.json and every other file adtr-export listed (extra.files: model.bin of OpenVINO)."""
        files = [self.artifact, self.spec_path]
        listed = self.spec.extra.get("files") if isinstance(self.spec.extra, dict) else None
        for name in listed if isinstance(listed, list) else []:
            path = self.artifact.parent / str(name)
            if path in files:
                continue
            if not path.is_file():
                raise UserError(f"{self.spec_path} lists {name}, which is missing beside {self.artifact}; re-export it")
            files.append(path)
        return files

    def describe(self) -> dict:
        return {
            "path": str(self.given),
            "model": str(self.artifact),
            "sha256": self.sha256,
            "version": self.version,
            "threshold": self.spec.threshold,
        }


def open_exported(path: str | Path) -> Model:
    """An export folder, its model.json or model file, or a versioned folder (its active version)."""
    from adtr_deploy.runtime.recalibrate import resolve

    given = Path(path)
    repo = version = None
    if is_model_repo(given):
        repo = ModelRepo(given)
        version = repo.require_active()
        artifact, spec_path = resolve(repo.folder(version))
    else:
        artifact, spec_path = resolve(given)
    spec = ModelSpec.load(spec_path)
    sha = spec.extra.get("sha256") if isinstance(spec.extra, dict) else None  # as records.model_sha256 says it
    return Model(given, artifact, spec_path, spec, sha or sha256_file(artifact), repo, version)


# -- what is refused before anything is scored ------------------------------------------------------------------------
def incompatibility(current: ModelSpec, candidate: ModelSpec) -> str | None:
    """The first way the candidate cannot take the current model's place, or None."""
    layout = ("input_layout", "input_dtype", "color")
    checks = [
        ("input size", list(current.input_size), list(candidate.input_size)),
        ("backbone", current.backbone, candidate.backbone),
        ("input layout", [getattr(current, k) for k in layout], [getattr(candidate, k) for k in layout]),
        ("tiling", _tiling(current.tiling), _tiling(candidate.tiling)),
    ]
    for what, ours, theirs in checks:
        if ours != theirs:
            return (
                f"the candidate has another {what} ({theirs}) than the current model ({ours}); a new version "
                "replaces the running one in place, so export the candidate with the current model's settings"
            )
    return None


def _tiling(record: dict | None) -> str:
    if not isinstance(record, dict):
        return "whole images"
    return ", ".join(f"{k} {record[k]}" for k in ("tile", "scale", "overlap", "score_pool") if k in record)


def read_labels(review_dir: Path) -> dict[str, list[dict]]:
    """The current label of every id, as {"good": [...], "defect": [...]}, each entry with its image's full path."""
    review = Review(review_dir, review_dir)
    if not review.file.is_file():
        raise UserError(
            f"{review_dir} has no {REVIEW_FILE}; give the review folder that adtr review or the /review page wrote "
            "(OUT/review by default)"
        )
    found: dict[str, list[dict]] = {"good": [], "defect": []}
    root = review_dir.resolve()
    for rid, entry in review.labels().items():
        folder = LABELS.get(entry.get("label"))
        image = (review_dir / str(entry.get("image"))).resolve()
        if folder is None:
            continue
        if root not in image.parents:
            raise UserError(
                f"{review.file} names {entry.get('image')!r} for {rid!r}, a file outside {review_dir}; a review folder "
                "holds its own images (adtr review copies them in), so label the record again"
            )
        if not image.is_file():
            raise UserError(
                f"{review.file} labels {rid!r} {entry['label']} but its image {image} is missing; put it back or "
                "label the record again (--relabel)"
            )
        found[folder].append({**entry, "path": image})
    return found


def review_refusal(labels: dict[str, list[dict]], current: Model, review_dir: Path) -> str | None:
    entries = labels["good"] + labels["defect"]
    if not entries:
        return (
            f"{review_dir / REVIEW_FILE} holds no labels; label flagged parts first (adtr review, or the /review page)"
        )
    if not labels["defect"]:
        return (
            f"{review_dir} holds no confirmed defect, so the gate cannot check that the candidate still finds defects; "
            "label at least one flagged part as a defect"
        )
    other = next((e for e in entries if _other_model(e.get("model_sha256"), current)), None)
    if other is not None:
        return (
            f"{review_dir} holds labels of another model (sha256 {other['model_sha256']}...) than the current one "
            f"({current.short}...); compare against the model that was reviewed"
        )
    return None


def _other_model(sha: object, current: Model) -> bool:
    """A recorded sha256 (a prefix, as records carry it) that is not the current model's; None means not recorded."""
    return isinstance(sha, str) and bool(sha) and not current.sha256.startswith(sha)


def feedback_refusal(candidate: Model, current: Model) -> str | None:
    feedback = candidate.spec.extra.get("feedback") if isinstance(candidate.spec.extra, dict) else None
    theirs = feedback.get("model_sha256") if isinstance(feedback, dict) else None
    if _other_model(theirs, current):
        return (
            f"the candidate was trained on the review of another model (sha256 {theirs}...) than the current one "
            f"({current.short}...); train it on a review of the running model"
        )
    return None


def target_refusal(repo: ModelRepo, current: Model) -> str | None:
    if not repo.versions():
        return None
    active = repo.active()
    if active is None:
        return f"{repo.path} has versions but all are revoked; restore one before promoting a new one"
    running = open_exported(repo.folder(active))
    if running.sha256 != current.sha256:
        return (
            f"{repo.path} runs version {active} (sha256 {running.short}...), not the current model given "
            f"({current.short}...); compare against what runs there: --against {repo.path}"
        )
    return None


# -- scoring and deciding --------------------------------------------------------------------------------------------
def score(model: Model, sets: dict[str, tuple[str, list[Path]]], device: str) -> dict[str, np.ndarray]:
    """Raw scores of each set of image files ({name: (where they are, files)}); a broken model (NaN) is refused."""
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.recalibrate import score_images

    engine = open_model(model.artifact, device)  # refuses a model.json written for another model file
    try:
        scores = {name: score_images(engine, paths, what=where)[0] for name, (where, paths) in sets.items()}
    finally:
        engine.close()
    for name, (where, _) in sets.items():
        bad = int((~np.isfinite(scores[name])).sum())
        if bad:
            raise UserError(f"{model.artifact} scores {bad} images of {where} as NaN or infinite; the model is broken")
    return scores


def figures(model: Model, scores: dict[str, np.ndarray]) -> dict:
    """Counts and rates of one model on each set, decided as runtime/postprocess.py decides (raw score > threshold)."""
    cal = model.spec.calibration
    out = {"threshold": float(cal.threshold)}
    for name, values in scores.items():
        flagged = np.asarray(values, dtype=np.float32).reshape(-1) > cal.threshold
        normalized = normalize_scores(np.asarray(values, dtype=np.float32), cal)
        n = int(flagged.size)
        out[name] = {
            "images": n,
            "flagged": int(flagged.sum()),
            "rate": float(flagged.mean()) if n else None,
            "median_normalized": float(np.median(normalized)) if n else None,
        }
    return out


def regression(current: dict, candidate: dict, missed: list[str]) -> str | None:
    """The first way the candidate is worse than the current model, or None (ties pass). `missed`: the ids of
    confirmed defects the current model flags and the candidate does not."""
    cur, cand = current["defect"], candidate["defect"]
    if cand["flagged"] < cur["flagged"]:
        return (
            f"the candidate finds {cand['flagged']} of the {cand['images']} confirmed defects and the current model "
            f"{cur['flagged']} (it misses {', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}): it would pass "
            "defective parts that the running model stops"
        )
    for key, what in (("held_out", "held-out good images"), ("good", "reviewed good parts")):
        cur, cand = current.get(key), candidate.get(key)
        if cur and cand and cand["flagged"] > cur["flagged"]:
            return (
                f"the candidate flags {cand['flagged']} of the {cand['images']} {what} and the current model "
                f"{cur['flagged']}: more false alarms than the model it would replace"
            )
    return None


def held_out_images(good_dir: Path, candidate: Model, review_dir: Path) -> list[Path]:
    """The images of --good, refused when they are the review's own (what a feedback candidate was trained on)."""
    from adtr_deploy.preprocess import is_image_file
    from adtr_deploy.runtime.sources import list_folder

    if not good_dir.is_dir():
        raise UserError(f"--good {good_dir} is not a folder; give a folder of good images the candidate never saw")
    feedback = candidate.spec.extra.get("feedback") if isinstance(candidate.spec.extra, dict) else None
    trained = [review_dir]
    if isinstance(feedback, dict) and isinstance(feedback.get("review_dir"), str):
        trained.append(Path(feedback["review_dir"]))
    here = good_dir.resolve()
    for folder in trained:
        folder = folder.resolve()
        if here == folder or folder in here.parents:
            raise UserError(
                f"--good {good_dir} lies in the review folder {folder}, whose images a feedback candidate was trained "
                "on; give good images neither model has seen"
            )
    images = [p for p in list_folder(good_dir) if is_image_file(p)]
    if not images:
        raise UserError(f"--good {good_dir} holds no images; give a folder of good images the candidate never saw")
    return images


def compare(
    current: Model, candidate: Model, labels: dict, held_out: tuple[str, list[Path]] | None, device: str
) -> dict:
    sets = {k: (f"the review's {k}/", [e["path"] for e in labels[k]]) for k in ("good", "defect")}
    if held_out is not None:
        sets["held_out"] = held_out
    cur_scores, cand_scores = score(current, sets, device), score(candidate, sets, device)
    cur, cand = figures(current, cur_scores), figures(candidate, cand_scores)
    shift = {
        k: cand[k]["median_normalized"] - cur[k]["median_normalized"]
        for k in ("good", "held_out")
        if k in cur and cur[k]["images"]
    }
    caught = np.asarray(cur_scores["defect"], np.float32) > current.spec.threshold
    kept = np.asarray(cand_scores["defect"], np.float32) > candidate.spec.threshold
    missed = [e["id"] for e, a, b in zip(labels["defect"], caught, kept) if a and not b]
    return {"figures": {"current": cur, "candidate": cand}, "shift": shift, "missed_by_candidate": missed}


def promote(
    candidate: str | Path,
    against: str | Path,
    review_dir: str | Path,
    *,
    to: str | Path | None = None,
    good_dir: str | Path | None = None,
    by: str | None = None,
    device: str = "cpu",
) -> dict:
    """Gate the candidate and publish it; returns the report (decision "promoted", the version, figures). A refusal
    raises PromotionRefused (with the report), bad input a UserError; neither writes anything."""
    from adtr_deploy.runtime.recalibrate import default_operator

    review_dir, good = Path(review_dir), (Path(good_dir) if good_dir is not None else None)
    current, cand = open_exported(against), open_exported(candidate)
    if to is None and current.repo is None:
        raise UserError(f"say where to publish: --to MODELS/NAME ({against} is an export folder, not a versioned one)")
    repo = ModelRepo(to) if to is not None else current.repo
    labels = read_labels(review_dir)
    report = {
        "candidate": cand.describe(),
        "against": current.describe(),
        "to": str(repo.path),
        "review": {
            "dir": str(review_dir.resolve()),
            "review_jsonl_sha256": sha256_file(review_dir / REVIEW_FILE),
            "good": len(labels["good"]),
            "false_alarms": sum(e.get("label") == "false_alarm" for e in labels["good"]),
            "defect": len(labels["defect"]),
        },
        "held_out_good": str(good.resolve()) if good is not None else None,
        "by": by or default_operator(),
    }
    for refusal in (
        review_refusal(labels, current, review_dir),
        feedback_refusal(cand, current),
        incompatibility(current.spec, cand.spec),
        target_refusal(repo, current),
    ):
        if refusal:
            raise PromotionRefused(refusal, report)
    held_out = None if good is None else (f"--good {good}", held_out_images(good, cand, review_dir))
    report.update(compare(current, cand, labels, held_out, device))
    refusal = regression(report["figures"]["current"], report["figures"]["candidate"], report["missed_by_candidate"])
    if refusal:
        raise PromotionRefused(refusal, report)
    report["time"] = now_iso()
    files = {"candidate": cand.files(), "current": current.files()}  # a missing listed file stops before any copy
    if not repo.versions():  # the running model becomes version 1, so that a rollback has something to return to
        report["baseline_version"] = repo.publish(
            files["current"],
            {
                "decision": "baseline",
                "model": current.describe(),
                "why": "the model that ran before the first promotion into this folder",
                "by": report["by"],
                "time": report["time"],
            },
        )
    report["decision"] = "promoted"
    report["version"] = repo.publish(files["candidate"], report)
    report["sentence"] = f"promoted: {cand.given} is version {report['version']} of {repo.path}" + (
        f" (version {report['baseline_version']} is the current model, to roll back to)"
        if "baseline_version" in report
        else ""
    )
    return report
