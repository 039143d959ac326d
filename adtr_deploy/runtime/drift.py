"""Score drift: is the whole population of recent parts scoring away from the calibration? (numpy only)

A lamp that dims, a camera swapped for another, dust on a lens: every image changes the same way, and every score moves
with it. One anomalous part moves one score; drift moves them all. `DriftMonitor` keeps the raw scores of the last
`window` good records (frames that decoded and were scored) in a fixed-size ring and compares their MEDIAN with the
calibration statistics of the model (model.json `calibration.score_mean`, `score_std`):

    shift = (median of the last `window` scores - score_mean) / score_std      (in calibration sigmas)

The line is in DRIFT when |shift| reaches `sigmas`, and leaves it only when |shift| falls below `clear_sigmas` (the
hysteresis band between the two keeps a median that hovers near the limit from flapping). Why these defaults:

- window 100: a median of 100 scores moves only when more than half of the last 100 parts moved. A single anomalous
  part, or a burst of up to 49, cannot raise it; on a line at a few parts per second a lamp change shows within a minute.
  The median of 100 good scores varies by about 0.13 calibration sigmas from chance, so a DRIFT is never a coincidence.
- sigmas 2: the default threshold sits at mean + 3 sigmas (adtr_deploy.calibration.THRESHOLD_SIGMAS); with the median
  2 sigmas up, about one good part in six already crosses it (for roughly normal scores). DRIFT is raised before the
  false alarms flood in, not after. A shift downwards counts too: defects then score under the threshold unseen.
- clear_sigmas 1 (half of `sigmas` unless given): the population has to come well back before the state clears.

Beside the scores the monitor keeps each record's `saturated` (the share of the frame's pixel values clipped at 255,
adtr_deploy.preprocess.saturated_fraction) and shows their median over the window. Clipped highlights are the one change
of the light that the model's input standardization cannot undo (texture above 255 is gone; docs/robustness.md): when
DRIFT starts upwards while at least SATURATION_HINT of the values are clipped, the event and the page say that the
exposure went up past what the camera records, and that a recalibration will not bring the lost texture back.

Nothing here changes the threshold: the monitor reports, the operator decides (adtr_deploy.runtime.recalibrate).
Everything is bounded: the ring holds `keep` floats (the last scores, also what an API recalibration may use), whatever
the run length. Thread-safe: the pipeline's inference thread adds scores, HTTP threads read the status.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.spec import Calibration

DEFAULT_WINDOW = 100
DEFAULT_SIGMAS = 2.0
MIN_WINDOW = 20  # also the fewest frames a recalibration accepts (adtr_deploy.runtime.recalibrate.MIN_FRAMES)
KEEP = 500  # scores kept for an API recalibration (at least `window`)
# The median share of clipped pixel values (at 255) from which an upward DRIFT is said to come from the exposure: 1 %.
# The demo's textures clip at most 0.2 % of their values unshifted and tissue's pale one 20 % at +15 % light.
SATURATION_HINT = 0.01


def _finite_calibration(cal: Calibration) -> str | None:
    """Why this calibration cannot judge drift (None: it can)."""
    if cal.method == "uncalibrated":
        return "the model carries no calibration"
    for name in ("score_mean", "score_std", "threshold"):
        if not math.isfinite(getattr(cal, name)):
            return f"calibration.{name} is {getattr(cal, name)!r}"
    if cal.score_std <= 0:
        return "calibration.score_std is not positive"
    return None


class DriftMonitor:
    """A pipeline observer that raises and clears DRIFT from the rolling median of recent good scores.

    `on_change(event)` is called (on the caller's thread, outside the lock) once when drift starts and once when it
    clears, with a JSON-ready dict whose "event" is "drift" and "state" is "started" or "cleared"."""

    def __init__(
        self,
        calibration: Calibration,
        *,
        window: int = DEFAULT_WINDOW,
        sigmas: float = DEFAULT_SIGMAS,
        clear_sigmas: float | None = None,
        threshold: float | None = None,
        keep: int = KEEP,
    ):
        if int(window) < MIN_WINDOW:
            raise UserError(f"--drift-window {window} is too small; give at least {MIN_WINDOW} frames")
        if not (math.isfinite(sigmas) and sigmas > 0):
            raise UserError(f"--drift-sigmas {sigmas} is not a positive number; give e.g. {DEFAULT_SIGMAS:g}")
        clear = sigmas / 2 if clear_sigmas is None else clear_sigmas
        if not (math.isfinite(clear) and 0 <= clear < sigmas):
            raise UserError(f"the drift clear level {clear} must be at least 0 and below --drift-sigmas {sigmas}")
        self.window = int(window)
        self.sigmas = float(sigmas)
        self.clear_sigmas = float(clear)
        self.keep = max(int(keep), self.window)
        self._ring = np.zeros(self.keep, dtype=np.float64)
        self._saturated = np.full(self.keep, np.nan)  # each score's record's `saturated` (NaN: not given)
        self._next = 0  # ring position of the next score
        self._count = 0  # scores held (<= keep)
        self._seen = 0  # good scores seen since the start or the last recalibration
        self._lock = threading.Lock()
        self.listeners: list[Callable[[dict], None]] = []
        self.active = False
        self.since: float | None = None  # unix time drift started
        self.median: float | None = None
        self.shift: float | None = None
        self.events = 0
        self.version = 0  # recalibrations applied during this run
        self._set_calibration(calibration, threshold)

    def _set_calibration(self, calibration: Calibration, threshold: float | None) -> None:
        self.calibration = calibration
        self.threshold = float(calibration.threshold if threshold is None else threshold)
        self.off_reason = _finite_calibration(calibration)

    # -- pipeline side -------------------------------------------------------------------------------------------
    def observe(self, record: dict, picture=None, infer_ms=None) -> None:
        """Pipeline observer: scored records feed the ring; error records and non-finite scores are skipped."""
        score = record.get("score")
        if record.get("status") != "ok" or score is None or not math.isfinite(score):
            return
        saturated = record.get("saturated")
        self.add(float(score), None if saturated is None else float(saturated))

    def add(self, score: float, saturated: float | None = None) -> dict | None:
        """Add one raw score (and its frame's share of clipped pixel values, if known); returns the event when this
        score started or cleared drift (listeners are told too)."""
        with self._lock:
            self._ring[self._next] = score
            self._saturated[self._next] = np.nan if saturated is None else saturated
            self._next = (self._next + 1) % self.keep
            self._count = min(self._count + 1, self.keep)
            self._seen += 1
            event = self._evaluate()
        if event is not None:
            self._tell(event)
        return event

    def _window_scores(self, n: int, ring: np.ndarray | None = None) -> np.ndarray:
        """The last n scores held (or their saturation, from that ring), oldest first (caller holds the lock)."""
        n = min(n, self._count)
        idx = (self._next - n + np.arange(n)) % self.keep
        return (self._ring if ring is None else ring)[idx]

    def _saturation(self) -> float | None:
        """Median share of clipped pixel values over the window's frames that gave one (caller holds the lock)."""
        values = self._window_scores(self.window, self._saturated)
        values = values[np.isfinite(values)]
        return float(np.median(values)) if values.size else None

    def _hint(self, saturated: float | None) -> str | None:
        """The over-exposure hint while an upward DRIFT comes with clipped highlights (caller holds the lock)."""
        if self.active and (self.shift or 0) > 0 and saturated is not None and saturated >= SATURATION_HINT:
            return saturation_hint(saturated)
        return None

    def _evaluate(self) -> dict | None:
        if self.off_reason is not None or self._count < self.window:
            self.median = self.shift = None
            return self._change(False) if self.active else None
        cal = self.calibration
        self.median = float(np.median(self._window_scores(self.window)))
        self.shift = (self.median - cal.score_mean) / cal.score_std
        if not self.active and abs(self.shift) >= self.sigmas:
            return self._change(True)
        if self.active and abs(self.shift) < self.clear_sigmas:
            return self._change(False)
        return None

    def _change(self, active: bool) -> dict:
        now = time.time()
        started = self.since
        self.active = active
        self.since = now if active else None
        self.events += 1
        event = {
            "event": "drift",
            "state": "started" if active else "cleared",
            "time": round(now, 3),
            "rolling_median": self.median,
            "shift_sigmas": None if self.shift is None else round(self.shift, 3),
            "window": self.window,
            "sigmas": self.sigmas,
            "calibration": self._calibration_view(),
        }
        saturated = self._saturation()
        event["saturated_fraction"] = None if saturated is None else round(saturated, 4)
        hint = self._hint(saturated)
        if hint:
            event["hint"] = hint
        if not active and started is not None:
            event["lasted_s"] = round(now - started, 3)
        return event

    def _tell(self, event: dict) -> None:
        for listener in list(self.listeners):
            listener(event)

    # -- operator side -------------------------------------------------------------------------------------------
    def recent_scores(self, n: int | None = None) -> np.ndarray:
        """A copy of the last n good scores (all held when None), oldest first."""
        with self._lock:
            return self._window_scores(self.keep if n is None else max(int(n), 0)).copy()

    def set_calibration(self, calibration: Calibration, threshold: float | None = None) -> dict | None:
        """Judge from now on against a new calibration (after a recalibration); the held scores are judged again at once,
        so recalibrating on them clears DRIFT. Returns the event, if the state changed."""
        with self._lock:
            self._set_calibration(calibration, threshold)
            self.version += 1
            event = self._evaluate()
        if event is not None:
            self._tell(event)
        return event

    def restart(self, calibration: Calibration, threshold: float | None = None) -> dict | None:
        """Another model runs from now on (a rollout, adtr_deploy.runtime.rollout): the held scores are the old model's
        scale, so they are forgotten and the window fills again against the new calibration (DRIFT clears)."""
        with self._lock:
            self._next = self._count = self._seen = 0
        return self.set_calibration(calibration, threshold)

    def _calibration_view(self) -> dict:
        cal = self.calibration
        return {"score_mean": cal.score_mean, "score_std": cal.score_std, "threshold": self.threshold}

    def status(self) -> dict:
        """JSON-ready view for /api/status: state, rolling median, shift in calibration sigmas, since when."""
        with self._lock:
            held = self._window_scores(self.window)
            over = float(np.mean(held > self.threshold)) if held.size else None
            saturated = self._saturation()
            if self.off_reason is not None:
                state = "off"
            elif self._count < self.window:
                state = "warming_up"
            else:
                state = "drift" if self.active else "ok"
            return {
                "state": state,
                "active": self.active,
                "rolling_median": self.median,
                "shift_sigmas": None if self.shift is None else round(self.shift, 3),
                "since": None if self.since is None else round(self.since, 3),
                "window": self.window,
                "scores_in_window": int(held.size),
                "sigmas": self.sigmas,
                "clear_sigmas": self.clear_sigmas,
                "over_threshold_fraction": None if over is None else round(over, 4),
                "saturated_fraction": None if saturated is None else round(saturated, 4),
                "hint": self._hint(saturated),
                "calibration": self._calibration_view(),
                "recalibrations": self.version,
                "off_reason": self.off_reason,
            }


def saturation_hint(saturated: float) -> str:
    """What an upward drift with clipped highlights means, and what to do."""
    return (
        f"{100 * saturated:.1f} % of the recent frames' pixel values are clipped at 255: the light or the camera's "
        "exposure/gain went up past what the camera records; lower it (a recalibration accepts the lost texture, it "
        "cannot bring it back)"
    )


def describe(event: dict) -> str:
    """One sentence for the terminal about a drift event."""
    if event["state"] == "started":
        return (
            f"DRIFT: the median of the last {event['window']} good scores ({event['rolling_median']:.6g}) is "
            f"{event['shift_sigmas']:+.2f} calibration sigmas from the good mean; the threshold is unchanged; "
            + (f"{event['hint']}; " if event.get("hint") else "")
            + "if the parts are good, recalibrate (POST /api/recalibrate or adtr recalibrate)"
        )
    lasted = f" after {event['lasted_s']:.0f} s" if event.get("lasted_s") is not None else ""
    return f"drift cleared{lasted}: the scores are back within the calibration"
