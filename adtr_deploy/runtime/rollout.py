"""Rollout without stopping the line: `adtr-run --model MODELS/NAME` runs the active version of a versioned model folder
(adtr_deploy.runtime.modelrepo), takes the newer versions that appear while it runs, and rolls back by API.

- Start: the active version (the highest not revoked). One that cannot be opened or verified is refused (logged, shown
  on the page and in GET /api/model) and the next live version below it runs, so a restart never stops on it.
- Watch: a thread looks at the folder every `poll_s` seconds (--model-poll). When the active version differs from the
  running one (a new version was published, or the running one was revoked), it is opened beside the running one with
  the same backend and device options, checked against it (input size, tiling, the batch size the run uses: the frames
  already decoded must fit either model) and verified (one inference on a neutral grey image: finite map and score of
  the right shape). A version that fails is refused with its sentence and the running one keeps running. It is not
  revoked: a failure can be the machine's (memory while two models are loaded), and revoking is a person's decision.
- Switch: the pipeline calls `between_batches` on its own thread between two batches. The batches still in flight on
  inference streams finish on the old model and are recorded first; then the backend, postprocessor, tiling, sha256 and
  version change at once, so no batch is inferred half by each model and no frame is dropped. The old backend is
  closed after. Listeners follow the new version: the drift monitor restarts on its calibration, recalibration writes
  its model.json, the page and the metrics show it.
- Rollback (POST /api/model/rollback): the highest live version below the running one is opened and verified, the
  running one is revoked (who, when, why: a restart does not take it up again) and the other switched in. Refused with
  a sentence when there is none. POST /api/model/activate {"version": N} goes forward again: N (no live version above
  it) is opened, verified, its revoked mark removed, and switched in.

Torch-free.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.base import Backend
from adtr_deploy.runtime.modelrepo import ModelRepo, is_model_repo, now_iso
from adtr_deploy.runtime.records import model_sha256
from adtr_deploy.tiling import from_spec, run_frames

DEFAULT_POLL_S = 2.0
SWITCH_WAIT_S = 60.0  # how long an API call waits for the pipeline to reach the next batch boundary
_REASON_CHARS = 400


@dataclass
class Candidate:
    """A version opened and verified, waiting for the next batch boundary."""

    version: int
    backend: Backend
    sha256: str | None
    why: str
    by: str | None = None


def versioned(model: str | Path) -> ModelRepo | None:
    """The ModelRepo when `model` is a versioned model folder (MODELS/NAME), else None (a plain model path)."""
    return ModelRepo(model) if is_model_repo(model) else None


def check_compatible(running: Backend, new: Backend, batch_size: int) -> None:
    """The new version takes the frames the running one takes (same input size and tiling, the run's batch size)."""
    old_size, new_size = tuple(running.spec.input_size), tuple(new.spec.input_size)
    if new_size != old_size:
        raise UserError(
            f"its input size {new_size[0]}x{new_size[1]} differs from the running version's "
            f"{old_size[0]}x{old_size[1]}; frames already prepared would not fit: export it at the running size, or "
            "restart the run to change size"
        )
    if from_spec(new.spec) != from_spec(running.spec):
        raise UserError(
            "its tiling differs from the running version's (tile, scale, overlap, pooling); restart the run to change "
            "the tiling"
        )
    if new.max_batch is not None and new.max_batch < batch_size:
        raise UserError(
            f"it takes at most {new.max_batch} images per call and the run uses batches of {batch_size}; export it "
            "with a larger batch, or restart the run with a smaller --batch-size"
        )


def verify(backend: Backend) -> None:
    """One inference on a neutral grey image of the model's input size: a finite map and score of the right shape."""
    h, w = backend.spec.input_size
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    maps, scores = run_frames(backend, [image], from_spec(backend.spec))
    amap = np.asarray(maps[0] if isinstance(maps, list) else maps)
    scores = np.asarray(scores)
    expected = (1, h, w) if isinstance(maps, list) else (1, 1, h, w)
    if scores.shape != (1,) or amap.shape != expected:
        raise UserError(
            f"one test inference gave a map of shape {amap.shape} and scores of shape {scores.shape}, not {expected} "
            "and (1,); it is not an ADTR export of this runtime's contract"
        )
    if not (math.isfinite(float(scores[0])) and np.isfinite(amap).all()):
        raise UserError("one test inference on a grey image gave a non-finite score or map; the export is broken")


class Rollout:
    """One run's versioned model: the version running, the watcher, the switch, rollback (see the module's text).

    `open_engine(folder)` opens a version folder with the run's backend and device options. `listeners` are called
    as `listener(rollout, backend)` on the pipeline's thread right after a switch (before the old backend closes)."""

    def __init__(
        self,
        repo: ModelRepo,
        open_engine: Callable[[Path], Backend],
        *,
        poll_s: float = DEFAULT_POLL_S,
        log: Callable[[str], None] = print,
    ):
        if not (math.isfinite(poll_s) and poll_s > 0):
            raise UserError(f"--model-poll {poll_s} is not a positive number of seconds; give e.g. {DEFAULT_POLL_S:g}")
        self.repo = repo
        self.open_engine = open_engine
        self.poll_s = float(poll_s)
        self.log = log
        self.pipeline = None
        self.version: int | None = None
        self.sha256: str | None = None
        self.since: str | None = None  # when the running version started running
        self.last_swap: dict | None = None
        self.swaps = 0
        self.refused: dict[int, dict] = {}  # version -> {"version", "reason", "time"}; not retried by the watcher
        self.listeners: list[Callable[[Rollout, Backend], None]] = []
        self._pending: Candidate | None = None
        self._lock = threading.Lock()  # one version is prepared at a time (the watcher, the API)
        self._switch_lock = threading.Lock()
        self._switched = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def repo_id(self) -> str:
        """What the summary records and --resume compares: the folder's real path."""
        return os.path.realpath(self.repo.path)

    @property
    def folder(self) -> Path:
        """The running version's folder (its model file and model.json)."""
        return self.repo.folder(self.version)

    # -- opening -------------------------------------------------------------------------------------------------
    def _refuse(self, version: int, reason: str) -> None:
        reason = reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"
        self.refused[version] = {"version": version, "reason": reason, "time": now_iso()}
        running = "" if self.version is None else f", version {self.version} keeps running"
        self.log(f"{self.repo.path} version {version} refused{running}: {reason}")

    def _open(self, version: int, running: Backend | None) -> Backend:
        """Open and check one version (beside `running`, if any); a UserError sentence says why it cannot run."""
        try:
            backend = self.open_engine(self.repo.folder(version))
        except Exception as exc:  # noqa: BLE001 -- whatever the engine raises on a broken file is a refusal
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"it cannot be opened ({text})") from None
        try:
            if running is not None:
                check_compatible(running, backend, self.pipeline.batch_size if self.pipeline else 1)
            verify(backend)
        except Exception as exc:  # noqa: BLE001
            backend.close()
            raise UserError(str(exc) if isinstance(exc, UserError) else f"its test inference failed ({exc})") from None
        return backend

    def open_first(self) -> Backend:
        """The backend of the active version, or of the highest live one below it that opens and verifies."""
        live = self.repo.live_versions()
        if not live:
            self.repo.require_active()  # the sentence: none, or all revoked
        for version in reversed(live):
            try:
                backend = self._open(version, None)
            except UserError as exc:
                self._refuse(version, str(exc))
                continue
            self.version, self.since = version, now_iso()
            self.sha256 = model_sha256(backend)
            return backend
        reasons = "; ".join(f"version {v}: {r['reason']}" for v, r in sorted(self.refused.items()))
        raise UserError(f"no version of {self.repo.path} can run ({reasons}); publish a working one with adtr promote")

    def attach(self, pipeline) -> None:
        """Hook into the pipeline: its model version and folder in every record and summary, the switch."""
        self.pipeline = pipeline
        pipeline.model_repo, pipeline.model_version = self.repo_id, self.version
        pipeline.between_batches = self.between_batches

    # -- the watcher ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="adtr-model-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                target = self.repo.active()
            except OSError:
                continue  # the folder is being replaced or the disk hiccups: look again at the next poll
            if target is None or target == self.version or target in self.refused:
                continue
            why = "published" if self.version is None or target > self.version else "the running version was revoked"
            try:
                self.take(target, why=why)
            except Exception as exc:  # noqa: BLE001 -- the watcher must outlive any one version
                self.log(f"the model watcher could not take version {target}: {type(exc).__name__}: {exc}")

    def take(self, version: int, *, why: str, by: str | None = None) -> dict | None:
        """Open, check and verify `version`, then switch to it at the next batch boundary. Returns the swap, or None
        when it was refused (then it is in `refused`) or is already running."""
        with self._lock:
            if version == self.version:
                return None
            try:
                backend = self._open(version, self.pipeline.backend)
            except UserError as exc:
                self._refuse(version, str(exc))
                return None
            return self._switch_when_ready(Candidate(version, backend, model_sha256(backend), why, by))

    def rollback(self, by: str | None = None, why: str | None = None) -> dict:
        """Revoke the running version (who, why) and run the highest live version below it that verifies."""
        by = _text(by, "by") or "api"
        why = _text(why, "why") or "rolled back from the live view"
        with self._lock:
            running = self.version
            below = [v for v in self.repo.live_versions() if v < running and v not in self.refused]
            for version in reversed(below):
                try:
                    backend = self._open(version, self.pipeline.backend)
                except UserError as exc:
                    self._refuse(version, str(exc))
                    continue
                mark = self.repo.revoke(running, by, why)
                swap = self._switch_when_ready(Candidate(version, backend, model_sha256(backend), "rollback", by))
                self.log(f"rollback by {by}: version {running} revoked ({why}); version {version} runs")
                return {**swap, "revoked": mark}
            refused = f"; refused: {sorted(self.refused)}" if self.refused else ""
            raise UserError(
                f"no version below {running} to roll back to in {self.repo.path} (live: {self.repo.live_versions()}"
                f"{refused}); publish a fixed version with adtr promote, or restore a revoked one"
            )

    def activate(self, version, by: str | None = None, why: str | None = None) -> dict:
        """Run `version` again (roll forward after a rollback): it must become the active one, so no live version may
        lie above it; a revoked mark on it is removed once it has opened and verified."""
        by = _text(by, "by") or "api"
        why = _text(why, "why") or "activated from the live view"
        if isinstance(version, bool) or not isinstance(version, int) or version not in self.repo.versions():
            raise UserError(f"{self.repo.path} has no version {version!r}; versions: {self.repo.versions() or 'none'}")
        with self._lock:
            if version == self.version:
                raise UserError(f"version {version} is already running")
            above = [v for v in self.repo.live_versions() if v > version]
            if above:
                raise UserError(
                    f"version {version} would not be the active one: live versions {above} lie above it; roll back "
                    "(POST /api/model/rollback) to leave the running version, or revoke the others first"
                )
            try:
                backend = self._open(version, self.pipeline.backend)
            except UserError as exc:
                self._refuse(version, str(exc))
                raise UserError(f"version {version} cannot run: {exc}") from None
            self.refused.pop(version, None)
            self.repo.restore(version)
            swap = self._switch_when_ready(Candidate(version, backend, model_sha256(backend), why, by))
            self.log(f"version {version} activated by {by} ({why})")
            return swap

    # -- the switch ----------------------------------------------------------------------------------------------
    def _switch_when_ready(self, candidate: Candidate) -> dict:
        """Hand the candidate to the pipeline's thread and wait (bounded) until it is switched in. After the run (its
        loop has ended) the switch happens here."""
        with self._switch_lock:  # one left pending by an earlier call that stopped waiting is replaced, and closed
            earlier, self._pending = self._pending, candidate
        if earlier is not None:
            earlier.backend.close()
        deadline = time.monotonic() + SWITCH_WAIT_S
        with self._switched:
            while self._pending is candidate and time.monotonic() < deadline:
                state = getattr(self.pipeline, "state", None)
                if state is not None and state.closing:
                    break
                self._switched.wait(0.1)
        if self._pending is candidate:
            state = getattr(self.pipeline, "state", None)
            if state is None or not state.closing:
                return {"pending": candidate.version, "note": "the switch happens at the next batch boundary"}
            self._switch(candidate)
        return dict(self.last_swap)

    def between_batches(self, state) -> None:
        """The pipeline's hook, on its thread between two batches: switch in a pending version."""
        candidate = self._pending
        if candidate is None:
            return
        self.pipeline._drain(state)  # batches in flight on the old model finish on it and are recorded first
        self._switch(candidate)

    def _switch(self, candidate: Candidate) -> None:
        from adtr_deploy.runtime.postprocess import Postprocessor

        with self._switch_lock:
            if self._pending is not candidate:
                return
            p, new = self.pipeline, candidate.backend
            old, previous = p.backend, self.version
            p.backend = new
            p.post = Postprocessor(new.spec.calibration, p.options.threshold)
            p.tiling = from_spec(new.spec)
            p.batch_size = min(p.options.batch_size, new.max_batch or p.options.batch_size)
            p.model_sha256, p.model_version = candidate.sha256, candidate.version
            self.version, self.sha256, self.since = candidate.version, candidate.sha256, now_iso()
            self.swaps += 1
            self.last_swap = {
                "from": previous, "to": candidate.version, "time": self.since, "why": candidate.why, "by": candidate.by,
            }  # fmt: skip
            self._pending = None
            for listener in self.listeners:
                try:
                    listener(self, new)
                except Exception as exc:  # noqa: BLE001 -- a view that cannot follow must not stop the line
                    self.log(f"after the switch to version {candidate.version}: {type(exc).__name__}: {exc}")
            old.close()
        self.log(f"model {self.repo.path}: version {previous} -> {candidate.version} ({candidate.why})")
        with self._switched:
            self._switched.notify_all()

    # -- what the API shows --------------------------------------------------------------------------------------
    def status(self) -> dict:
        """GET /api/model's versioned part."""
        versions = self.repo.versions()
        revoked = {v: self.repo.revoked(v) for v in versions}
        return {
            "versioned": True,
            "repo": str(self.repo.path),
            "version": self.version,
            "sha256": self.sha256,
            "since": self.since,
            "versions": versions,
            "live": [v for v in versions if revoked[v] is None],
            "active": self.repo.active(),
            "revoked": {str(v): mark for v, mark in revoked.items() if mark is not None},
            "swaps": self.swaps,
            "poll_s": self.poll_s,
            **self.brief(),
        }

    def brief(self) -> dict:
        """What the page shows, from memory only (/api/status is polled twice a second): the version, the last swap,
        the refused versions with their sentences, a pending switch."""
        pending = self._pending
        return {
            "version": self.version,
            "last_swap": self.last_swap,
            "refused": {str(v): r for v, r in sorted(dict(self.refused).items())},
            "pending": None if pending is None else pending.version,
        }

    def close(self) -> None:
        """Stop the watcher; close a version that was opened but never switched in."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.poll_s + 1))
        with self._switch_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.backend.close()


def _text(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise UserError(f"{name} must be a text of at most 200 characters")
    return value.strip() or None
