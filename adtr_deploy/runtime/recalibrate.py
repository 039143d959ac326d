"""Recalibration from frames an operator confirms as good, recorded in model.json with the model it applies to.

Torch-free (numpy + the runtime). The threshold never changes by itself (adtr_deploy.runtime.drift only reports); an
operator recalibrates with `adtr recalibrate --model EXPORT --images GOOD_FRAMES` or `POST /api/recalibrate` on a
served run. Both compute a new calibration with adtr_deploy.calibration.calibrate and write model.json atomically:
the new `calibration`, the previous one appended to `extra.calibration_history`, and `extra.calibration_record`
(version, when, by whom, how many frames, from what, the sha256 of the model file it applies to).

Refused, with one sentence:
- fewer than MIN_FRAMES frames;
- frames that look like flagged parts: a frame scored above the current threshold AND more than FLAG_SIGMAS robust
  sigmas above the median of the frames given (robust sigma: 1.4826 x the median absolute deviation, and never less
  than the calibration's score_std). The median test is what lets a drifted line be recalibrated: after a lamp change
  every good frame may sit above the old threshold, but a defective part still stands out from its neighbours.
  `allow_flagged` (--allow-flagged) takes them anyway;
- another model: a model.json written for another model file (its sha256 differs from the file's); a folder of
  frames whose adtr-run records (results.jsonl) name another model's sha256; for a running service, a model.json on
  disk that now describes another model than the one running;
- scores that are not finite (a broken model); a model.json whose calibration is not finite is refused when it is
  loaded (adtr_deploy.spec).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from adtr_deploy.calibration import THRESHOLD_SIGMAS, calibrate
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.spec import SPEC_FILENAME, Calibration, ModelSpec, spec_path_for

MIN_FRAMES = 20
FLAG_SIGMAS = 5.0
HISTORY_KEY = "calibration_history"
RECORD_KEY = "calibration_record"
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation


class RecalibrationError(UserError):
    """A recalibration was refused: too few frames, flagged frames, another model."""


def default_operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def check_finite(cal: Calibration, where: str) -> None:
    for name, value in dataclasses.asdict(cal).items():
        if name != "method" and not math.isfinite(value):
            raise RecalibrationError(
                f"{where}: calibration.{name} is {value!r}, not a finite number; re-export the model or recalibrate it"
            )


def flagged(scores: np.ndarray, current: Calibration, threshold: float) -> np.ndarray:
    """Indices of frames that look like flagged parts (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median)))
    floor = current.score_std if math.isfinite(current.score_std) and current.score_std > 0 else 0.0
    sigma = max(MAD_TO_SIGMA * mad, floor, 1e-9 * max(abs(median), 1.0))
    return np.flatnonzero((scores > threshold) & (scores > median + FLAG_SIGMAS * sigma))


def check_frames(
    scores: np.ndarray,
    current: Calibration,
    threshold: float,
    *,
    names: list[str] | None = None,
    allow_flagged: bool = False,
    what: str = "frames",
) -> None:
    """Refuse too few frames, non-finite scores and (unless allowed) flagged frames, with one sentence."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size < MIN_FRAMES:
        raise RecalibrationError(
            f"recalibration needs at least {MIN_FRAMES} frames confirmed as good, and {what} hold {scores.size}; "
            "give more good frames"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        name = names[bad[0]] if names else f"frame {bad[0]}"
        raise RecalibrationError(
            f"the model scored {bad.size} of the {what} as NaN or infinite (e.g. {name}); the model or the frames are "
            "broken, so no calibration is computed"
        )
    hits = flagged(scores, current, threshold)
    if hits.size and not allow_flagged:
        i = int(hits[np.argmax(scores[hits])])
        name = names[i] if names else f"frame {i}"
        raise RecalibrationError(
            f"{hits.size} of the {scores.size} {what} look like flagged parts (e.g. {name} scores {scores[i]:.6g}, above "
            f"the threshold {threshold:.6g} and over {FLAG_SIGMAS:g} sigmas above the others' median "
            f"{float(np.median(scores)):.6g}); remove them, or pass --allow-flagged if they really are good"
        )


def recalibrated(
    spec: ModelSpec,
    scores: np.ndarray,
    maps: np.ndarray | None = None,
    *,
    by: str,
    source: str,
    model_sha256: str | None,
    allow_flagged: bool = False,
    sigmas: float = THRESHOLD_SIGMAS,
) -> ModelSpec:
    """The spec with a new calibration from these good scores (and maps; without maps the pixel statistics, which only
    colour the heatmaps, are kept), the previous calibration in the history and the record of this recalibration."""
    old = spec.calibration
    new = calibrate(scores, maps, sigmas=sigmas, keep_margin=old.margin)  # the margin toward defects stays
    if maps is None:
        new = dataclasses.replace(new, map_mean=old.map_mean, map_std=old.map_std, map_threshold=old.map_threshold)
    check_finite(new, "the new calibration")
    extra = dict(spec.extra)
    previous_record = extra.get(RECORD_KEY)
    version = int(previous_record.get("version", 0)) + 1 if isinstance(previous_record, dict) else 1
    history = list(extra.get(HISTORY_KEY) or [])
    history.append({"calibration": dataclasses.asdict(old), "record": previous_record})
    extra[HISTORY_KEY] = history
    extra[RECORD_KEY] = {
        "version": version,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "by": by,
        "frames": int(np.asarray(scores).size),
        "source": source,
        "model_sha256": model_sha256,
        "allow_flagged": bool(allow_flagged),
        "previous_threshold": old.threshold,
    }
    return spec.replace(calibration=new, extra=extra)


def write_spec(spec: ModelSpec, path: str | Path) -> Path:
    """model.json as strict JSON (no NaN), written atomically (ModelSpec.save)."""
    return spec.save(path)


def check_same_model(spec_path: Path, running_sha256: str | None) -> ModelSpec:
    """The model.json on disk, refused when it now describes another model file than the one running."""
    spec = ModelSpec.load(spec_path)  # refuses missing or non-finite calibration values (adtr_deploy.spec)
    on_disk = spec.extra.get("sha256")
    if running_sha256 and on_disk and on_disk != running_sha256:
        raise RecalibrationError(
            f"{spec_path} now describes another model (sha256 {on_disk[:12]}...) than the one running "
            f"({running_sha256[:12]}...); restart adtr-run with that model, then recalibrate"
        )
    return spec


# -- the CLI side: score a folder of good frames with the exported model ----------------------------------------------
def resolve(model: str | Path) -> tuple[Path, Path]:
    """EXPORT_DIR, model.json or the model file -> (model file, model.json beside it)."""
    from adtr_deploy.runtime.backends import model_file

    path = Path(model)
    if path.name == SPEC_FILENAME or path.suffix.lower() == ".json":
        if not path.is_file():
            raise RecalibrationError(f"{path} does not exist; give the export folder or its model.json")
        artifact = model_file(path.parent)
    else:
        if not path.exists():
            raise RecalibrationError(f"{path} does not exist; give the export folder, its model.json or model file")
        artifact = model_file(path)
    spec_path = spec_path_for(artifact)
    if not spec_path.is_file():
        raise RecalibrationError(
            f"{artifact} has no {SPEC_FILENAME} beside it to record a calibration in; export it with adtr-export"
        )
    return artifact, spec_path


def score_folder(engine, folder: Path, batch_size: int = 8) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, raw scores (N,), maps (N, 1, H, W)) of every image under `folder`, with the runtime's decoding. A
    tiled model scores them tiled, as adtr-run does; its maps (of each image's size) come back flattened, (P,)."""
    from adtr_deploy.preprocess import is_image_file
    from adtr_deploy.runtime.sources import list_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise RecalibrationError(f"--images {folder} is not a folder; give a folder of frames confirmed as good")
    paths = [p for p in list_folder(folder) if is_image_file(p)]
    scores, maps = score_images(engine, paths, batch_size, what="the folder of good frames")
    return [str(p.relative_to(folder)) for p in paths], scores, maps


def score_images(
    engine, paths: list[Path], batch_size: int = 8, *, what: str = "the folder"
) -> tuple[np.ndarray, np.ndarray]:
    """(raw scores (N,), maps) of these image files, decoded and scored as score_folder does (adtr promote scores the
    review's labelled files with it); an unreadable file is refused naming `what` holds it."""
    from adtr_deploy.preprocess import ImageDecodeError, read_image, resize
    from adtr_deploy.tiling import from_spec, run_frames

    tiling = from_spec(engine.spec)
    scores, maps = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = []
        for p in chunk:
            try:
                image = read_image(p)
                images.append(image if tiling else resize(image, engine.spec.input_size))
            except (ImageDecodeError, OSError, ValueError) as exc:
                raise RecalibrationError(f"cannot read {p} ({exc}); remove it from {what} or replace it") from None
        m, s = run_frames(engine, images, tiling)
        scores.append(np.asarray(s, dtype=np.float64).reshape(-1))
        maps.append(np.concatenate([x.ravel() for x in m]) if tiling else np.asarray(m, dtype=np.float32))
    if not scores:
        return np.zeros(0), np.zeros((0, 1, *engine.spec.input_size), np.float32)
    return np.concatenate(scores), np.concatenate(maps)


RESULTS_FILE = "results.jsonl"  # adtr-run's records (adtr_deploy.runtime.outdir); each names its model's sha256
MAX_RECORDS_READ = 100_000


def check_recorded_model(folder: Path, sha256: str | None, names: list[str]) -> None:
    """A folder that holds adtr-run records (results.jsonl) says which model scored its frames: refuse another model's,
    and refuse its overlays/ (heatmaps drawn over the frames, not frames)."""
    results = folder / RESULTS_FILE
    if not results.is_file():
        return
    if any(Path(n).parts[:1] == ("overlays",) for n in names):
        raise RecalibrationError(
            f"{folder} is an adtr-run output folder and its overlays/ are annotated pictures (heatmaps over the frames), "
            "not camera frames; give a folder of the frames themselves"
        )
    if not sha256:
        return
    with open(results, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if i >= MAX_RECORDS_READ:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            theirs = record.get("model_sha256") if isinstance(record, dict) else None
            if isinstance(theirs, str) and theirs and not sha256.startswith(theirs):
                raise RecalibrationError(
                    f"{results} says these frames were recorded with another model (sha256 {theirs[:12]}...) than this "
                    f"one ({sha256[:12]}...); recalibrate that model, or collect frames with this one"
                )


def recalibrate_export(
    model: str | Path,
    images: str | Path,
    *,
    by: str | None = None,
    allow_flagged: bool = False,
    device: str = "cpu",
    sigmas: float = THRESHOLD_SIGMAS,
) -> tuple[ModelSpec, ModelSpec, Path]:
    """Score the good frames in `images` with the exported model, check them, write the new model.json.
    Returns (previous spec, new spec, model.json path)."""
    from adtr_deploy.runtime.backends import open_model

    artifact, spec_path = resolve(model)
    old = ModelSpec.load(spec_path)  # refuses missing or non-finite calibration values (adtr_deploy.spec)
    sha = old.extra.get("sha256") or sha256_file(artifact)
    engine = open_model(artifact, device)  # refuses a model.json written for another model file (sha256)
    try:
        names, scores, maps = score_folder(engine, Path(images))
    finally:
        engine.close()
    check_recorded_model(Path(images), sha, names)
    check_frames(
        scores, old.calibration, old.threshold, names=names, allow_flagged=allow_flagged, what=f"images in {images}"
    )
    new = recalibrated(
        old,
        scores,
        maps,
        by=by or default_operator(),
        source=f"images:{Path(images).resolve()}",
        model_sha256=sha,
        allow_flagged=allow_flagged,
        sigmas=sigmas,
    )
    write_spec(new, spec_path)
    return old, new, spec_path


# -- the run side: recalibrate a running pipeline from the scores its drift monitor kept --------------------------------
class RunRecalibrator:
    """`POST /api/recalibrate` for one run: the operator confirms that the last `frames` good records (default: the
    drift window) were good parts; their raw scores, kept by the drift monitor, give the new calibration. It is written
    to the model.json beside the model (when there is one: not for Triton), used at once by the pipeline (a new
    Postprocessor; a --threshold given on the command line is replaced by the new calibrated one) and by the monitor,
    which judges the same scores again: DRIFT clears."""

    def __init__(self, pipeline, engine, model_path: str | Path, monitor, identity: dict | None = None):
        self.pipeline = pipeline
        self.monitor = monitor
        self.identity = identity if identity is not None else {}
        self._lock = threading.Lock()
        self.follow(engine, model_path)

    def follow(self, engine, model_path: str | Path) -> None:
        """The model whose model.json a recalibration writes: the one running (after a rollout, the new version's)."""
        from adtr_deploy.runtime.backends import model_file

        with self._lock:
            self.spec: ModelSpec = engine.spec
            self.sha256 = self.identity.get("sha256") or self.spec.extra.get("sha256")
            self.spec_path: Path | None = None
            if getattr(engine, "local", True):
                try:
                    candidate = spec_path_for(model_file(model_path))
                    self.spec_path = candidate if candidate.is_file() else None
                except UserError:
                    self.spec_path = None

    def recalibrate(self, frames: int | None = None, by: str | None = None, allow_flagged: bool = False) -> dict:
        from adtr_deploy.runtime.postprocess import Postprocessor

        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise RecalibrationError(f'frames {frames!r} is not a positive whole number; give e.g. {{"frames": 100}}')
        if by is not None and (not isinstance(by, str) or len(by) > 200):
            raise RecalibrationError("by must be a name of at most 200 characters")
        if not isinstance(allow_flagged, bool):
            raise RecalibrationError("allow_flagged must be true or false")
        with self._lock:
            scores = self.monitor.recent_scores(frames or self.monitor.window)
            post = self.pipeline.post
            check_frames(
                scores, post.calibration, post.threshold, allow_flagged=allow_flagged, what="frames this run kept"
            )
            base = check_same_model(self.spec_path, self.sha256) if self.spec_path else self.spec
            new = recalibrated(
                base,
                scores,
                None,
                by=by or "api",
                source=f"run:last {scores.size} good frames",
                model_sha256=self.sha256,
                allow_flagged=allow_flagged,
            )
            if self.spec_path is not None:
                write_spec(new, self.spec_path)
            override = post.threshold != self.spec.threshold  # --threshold replaced the calibrated one
            self.spec = new
            self.pipeline.post = Postprocessor(new.calibration)
            self.monitor.set_calibration(new.calibration)
            self.identity.update(threshold=new.threshold, calibration=new.calibration.method)
            return {
                "record": new.extra[RECORD_KEY],
                "calibration": dataclasses.asdict(new.calibration),
                "previous_threshold": post.threshold,
                "written": None if self.spec_path is None else str(self.spec_path),
                "replaced_threshold_override": bool(override),
            }
