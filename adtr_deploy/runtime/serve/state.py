"""What the live view shows, held in bounded memory whatever the number of viewers.

The pipeline calls `LiveState.observe(record, picture, infer_ms)` on its inference thread. That call only updates
counters and bounded rings (timeline, latencies) and, when wanted, hands the frame's lazy `picture()` to the render
thread: the latest frame at most `max_fps` times a second and only while somebody watches, and a gallery thumbnail for at
most GALLERY_PER_S anomalies a second. Drawing the overlay and encoding JPEGs happen on that thread, never on the
inference thread, and every viewer is served the same shared JPEG bytes.

`line_state()` is the one place that decides what the line is doing now (OK, ALARM, NO SIGNAL, PAUSED, ...): the page's
large banner, /readyz and the adtr_line_state metric all come from it.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np

TIMELINE_LEN = 600  # score points kept for the timeline
GALLERY_LEN = 12  # latest anomalies kept with a thumbnail
GALLERY_PER_S = 1.0  # thumbnails drawn per second at most (a burst of anomalies must not eat the CPU)
LATENCY_WINDOW = 1024  # latest end-to-end latencies for p50/p99
RATE_WINDOW_S = 5.0  # images/s over this many seconds
SNAPSHOT_TTL_S = 0.2  # viewers polling within this time share one status snapshot
FRAME_MAX_WIDTH = 960  # the live frame is downscaled to this width: viewers need a picture, not the sensor's pixels
THUMB_WIDTH = 240
WATCH_TIMEOUT_S = 5.0  # no frame is drawn when nobody asked for one this long
JPEG_QUALITY = 80
ALARM_HOLD_S = 3.0  # the line shows ALARM this long after its last anomalous frame, so a single one is seen
STALL_S = 10.0  # no record for this long means NO SIGNAL (live sources: their --timeout instead)
LINE_STATES = ("STARTING", "OK", "ALARM", "DRIFT", "NO SIGNAL", "PAUSED", "FINISHED")
READY_STATES = ("OK", "ALARM", "DRIFT")  # inspecting now: /readyz answers 200
_USERINFO = re.compile(r"(//[^:/@\s]*):[^@/\s]*@")  # user:password@ inside free text (an error message)


def line_state(f: dict) -> tuple[str, str]:
    """What the line is doing now, and why, from the facts gathered by LiveState.line_facts(); the first rule that
    holds wins. A new state (a drift monitor's, say) is one more rule here, in its place, and one more fact."""
    if f["run"] == "finished":
        return "FINISHED", "the source has ended; the run is over"
    if f["run"] == "paused":
        return "PAUSED", "inspection is paused from the live view (resume it there or POST /api/resume)"
    if not f["source_up"]:
        why = f"; {f['source_error']}" if f["source_error"] else ""
        return "NO SIGNAL", f"the source is down (reconnecting){why}"
    if f["frame_age_s"] is None:
        if f["since_start_s"] > f["stall_s"]:
            return "NO SIGNAL", f"no frame since the start {f['since_start_s']:.0f} s ago"
        return "STARTING", "waiting for the first frame"
    if f["frame_age_s"] > f["stall_s"]:
        return "NO SIGNAL", f"no frame for {f['frame_age_s']:.0f} s (stall timeout {f['stall_s']:g} s)"
    if f["drift"]:  # before ALARM: when the whole population moved, every part is an "anomaly"; this says why
        return "DRIFT", "the scores of good parts have moved away from the calibration (see the drift notice)"
    if f["anomaly_age_s"] is not None and f["anomaly_age_s"] <= ALARM_HOLD_S:
        return "ALARM", f"an anomaly {f['anomaly_age_s']:.1f} s ago"
    return "OK", "inspecting: frames flow and none is anomalous"


def encode_jpeg(image_bgr: np.ndarray, max_width: int) -> bytes:
    """A BGR image as JPEG bytes, downscaled to max_width when wider."""
    h, w = image_bgr.shape[:2]
    if w > max_width:
        image_bgr = cv2.resize(image_bgr, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


class LiveState:
    """Counters, timeline, latest frame and gallery of one run. Thread-safe; every container is bounded."""

    def __init__(
        self,
        model: dict,
        source: dict,
        *,
        source_stats: Callable[[], dict] = dict,
        max_fps: float = 5.0,
        stale_s: float = STALL_S,
        timing: Callable[[str, float], None] | None = None,
    ):
        self.model = model  # identity shown on the page: name, sha256, threshold, input size, backend, device
        self.source = source  # {"name", "live"}
        self.source_stats = source_stats
        self.min_frame_gap = 1.0 / max_fps
        self.stale_s = stale_s  # the stall timeout: no record for this long is NO SIGNAL
        self.model_loaded = False
        self.frame_listeners: list[Callable[[], None]] = []  # called (render thread) after each new frame
        self.drift = None  # the run's drift monitor (adtr_deploy.runtime.drift), when there is one
        self.last_anomaly_time: float | None = None  # time.monotonic() of the last anomalous record
        self.latency_ema_s = 0.0
        self._line: tuple[str, float] = ("STARTING", time.time())  # current line state and since when
        self.timing = timing  # prometheus histogram hook: timing(stage, seconds)
        self.cond = threading.Condition()  # guards everything below; MJPEG streams wait on it for new frames
        self.state = "starting"
        self.started = time.time()
        self.counts = {"images": 0, "ok": 0, "anomalies": 0, "errors": 0}
        self.seq = 0
        self.last: dict | None = None
        self.last_time: float | None = None
        self.timeline: deque[list] = deque(maxlen=TIMELINE_LEN)  # [seq, unix time, normalized score, is_anomaly]
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.rate_marks: deque[tuple[float, int]] = deque(maxlen=64)  # (monotonic time, images) every 0.25 s
        self._snapshot: tuple[float, dict] | None = None  # shared by all viewers for SNAPSHOT_TTL_S
        self.gallery: deque[dict] = deque(maxlen=GALLERY_LEN)  # newest first, each with its "jpeg" thumbnail
        self.gallery_next_id = 1
        self.frame_jpeg: bytes | None = None
        self.frame_seq = 0
        self.frame_info: dict | None = None
        self.watched_at = 0.0
        self._job_frame: tuple | None = None  # (info, picture): only the newest is kept
        self._latest: tuple | None = None  # (info, picture) of the last good record, drawn when a viewer arrives late
        self._job_thumbs: deque[tuple] = deque(maxlen=4)
        self._next_frame_at = 0.0
        self._next_thumb_at = 0.0
        self._stats_cache: tuple[float, dict] = (0.0, {})
        self._stop = False
        # CPU seconds the serving itself costs, per part, measured per thread (time.thread_time), so the figure holds
        # whatever else runs on the machine: the bookkeeping on the inference thread, drawing, answering HTTP.
        self.cpu_s = {"observe": 0.0, "draw": 0.0, "http": 0.0}
        self._thread = threading.Thread(target=self._render_loop, name="adtr-serve-render", daemon=True)

    # -- inference thread ------------------------------------------------------------------------------------------
    def observe(self, record: dict, picture: Callable[[], np.ndarray | None], infer_ms: float | None) -> None:
        """Pipeline observer: cheap bookkeeping; pictures are drawn later on the render thread, if at all."""
        cpu0 = time.thread_time()
        now, mono = time.time(), time.monotonic()
        ok = record["status"] == "ok"
        with self.cond:
            self.seq += 1
            self.counts["images"] += 1
            self.counts["ok" if ok else "errors"] += 1
            self.last = {**record, "seq": self.seq, "time": now}
            self.last_time = mono
            if not self.rate_marks or mono - self.rate_marks[-1][0] >= 0.25:
                self.rate_marks.append((mono, self.counts["images"]))
            if self.state == "starting":
                self.state = "running"
            if ok:
                self.latencies.append(record["latency_ms"])
                self.latency_ema_s += 0.05 * (record["latency_ms"] / 1000 - self.latency_ema_s)
                anomalous = bool(record["is_anomaly"])
                if anomalous:
                    self.last_anomaly_time = mono
                self.counts["anomalies"] += anomalous
                self.timeline.append([self.seq, round(now, 3), round(record["normalized_score"], 6), int(anomalous)])
                info = {k: record[k] for k in ("source", "frame", "score", "normalized_score", "is_anomaly", "status")}
                info.update(seq=self.seq, time=now)
                self._latest = (info, picture)
                if anomalous and mono >= self._next_thumb_at:
                    self._next_thumb_at = mono + 1.0 / GALLERY_PER_S
                    self._job_thumbs.append((info, picture))
                    self.cond.notify_all()
                if mono >= self._next_frame_at and mono - self.watched_at < WATCH_TIMEOUT_S:
                    self._next_frame_at = mono + self.min_frame_gap
                    self._job_frame = (info, picture)
                    self.cond.notify_all()
        if self.timing is not None:
            self.timing("end_to_end", record["latency_ms"] / 1000)
            if infer_ms is not None:
                self.timing("inference", infer_ms / 1000)
                self.timing("before_inference", max(record["latency_ms"] - infer_ms, 0.0) / 1000)
        self.cpu_s["observe"] += time.thread_time() - cpu0  # only this thread writes this entry

    # -- render thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _render_loop(self) -> None:
        while True:
            with self.cond:
                while not self._stop and self._job_frame is None and not self._job_thumbs:
                    self.cond.wait()
                if self._stop:
                    return
                frame_job, self._job_frame = self._job_frame, None
                thumbs = list(self._job_thumbs)
                self._job_thumbs.clear()
            cpu0 = time.thread_time()
            for info, picture in thumbs:
                jpeg = self._draw(picture, THUMB_WIDTH)
                if jpeg is not None:
                    with self.cond:
                        self.gallery.appendleft({**info, "id": self.gallery_next_id, "jpeg": jpeg})
                        self.gallery_next_id += 1
            if frame_job is not None:
                info, picture = frame_job
                jpeg = self._draw(picture, FRAME_MAX_WIDTH)
                if jpeg is not None:
                    with self.cond:
                        self.frame_jpeg, self.frame_info = jpeg, info
                        self.frame_seq += 1
                        self.cond.notify_all()
                    for listener in self.frame_listeners:
                        listener()
            self.cpu_s["draw"] += time.thread_time() - cpu0

    @staticmethod
    def _draw(picture: Callable[[], np.ndarray | None], width: int) -> bytes | None:
        try:
            image = picture()
            return None if image is None else encode_jpeg(image, width)
        except (cv2.error, ValueError, MemoryError):
            return None  # a picture that cannot be drawn is skipped; the record itself is already written

    # -- HTTP threads ------------------------------------------------------------------------------------------------
    def watched(self) -> None:
        """A viewer asked for the live picture: keep drawing frames for the next WATCH_TIMEOUT_S seconds, and draw the
        last one now if nothing newer is on its way (a run that is paused, finished or was not watched until now)."""
        mono = self.watched_at = time.monotonic()
        with self.cond:
            latest = self._latest
            shown = self.frame_info["seq"] if self.frame_info else 0
            if latest and latest[0]["seq"] > shown and self._job_frame is None and mono >= self._next_frame_at:
                self._next_frame_at = mono + self.min_frame_gap
                self._job_frame = latest
                self.cond.notify_all()

    def add_http_cpu(self, seconds: float) -> None:
        with self.cond:  # many handler threads add here
            self.cpu_s["http"] += seconds

    def set_state(self, state: str) -> None:
        with self.cond:
            self.state = state
            self.cond.notify_all()

    def stats(self) -> dict:
        """The source's own statistics (dropped frames, reconnects), fetched at most twice a second."""
        at, cached = self._stats_cache
        if time.monotonic() - at > 0.5:
            try:
                cached = self.source_stats()
            except Exception:  # noqa: BLE001 -- a source that cannot report must not break the status page
                cached = {}
            self._stats_cache = (time.monotonic(), cached)
        return cached

    def frame_age(self) -> float | None:
        return None if self.last_time is None else round(time.monotonic() - self.last_time, 3)

    def source_state(self) -> dict:
        """The source now: up or down, age of its last frame, reconnect attempts, outages, current outage start."""
        stats = self.stats()
        live = bool(self.source.get("live"))
        if not live:  # files and videos: up while they are being read
            with self.cond:
                age = self.frame_age()
            return {"live": False, "up": True, "last_frame_age_s": age, "reconnects": 0, "outages": 0,
                    "outage_start": None, "outage_s": None, "last_error": None}  # fmt: skip
        start = stats.get("outage_start")
        error = stats.get("last_error")
        return {
            "live": True,
            "up": bool(stats.get("up", True)),
            "last_frame_age_s": stats.get("last_frame_age_s"),
            "reconnects": int(stats.get("reconnects", 0)),
            "outages": int(stats.get("outages", 0)),
            "outage_start": start,
            "outage_s": None if start is None else round(max(time.time() - start, 0.0), 1),
            "last_error": None if error is None else _USERINFO.sub(r"\1:***@", str(error)),
        }

    def line_facts(self, source: dict | None = None) -> dict:
        """Everything line_state() decides from, gathered at one moment."""
        source = source or self.source_state()
        mono = time.monotonic()
        with self.cond:
            run, age, anomaly = self.state, self.frame_age(), self.last_anomaly_time
            stall = max(self.stale_s, 3 * self.latency_ema_s)  # a slow model is not a stalled source
        return {
            "run": run,
            "model_loaded": self.model_loaded,
            "source_up": source["up"],
            "source_error": source["last_error"],
            "frame_age_s": age,
            "since_start_s": time.time() - self.started,
            "stall_s": round(stall, 3),
            "anomaly_age_s": None if anomaly is None else mono - anomaly,
            "drift": bool(self.drift is not None and self.drift.status().get("active")),
        }

    def line(self, source: dict | None = None) -> dict:
        """{"state", "reason", "since"}: the line's state now, and the unix time it entered it."""
        facts = self.line_facts(source)
        state, reason = line_state(facts)
        with self.cond:
            if state != self._line[0]:
                self._line = (state, time.time())
            since = self._line[1]
        return {"state": state, "reason": reason, "since": round(since, 3), "stall_timeout_s": facts["stall_s"]}

    def readiness(self) -> dict:
        """For /readyz: ready while inspecting (source up, frames within the stall timeout, model loaded)."""
        source = self.source_state()
        line = self.line(source)
        with self.cond:
            age = self.frame_age()
        return {
            "ready": line["state"] in READY_STATES and self.model_loaded,
            "line": line["state"],
            "reason": line["reason"],
            "source_up": source["up"],
            "last_frame_age_s": age,
            "stall_timeout_s": line["stall_timeout_s"],
            "model_loaded": self.model_loaded,
            "backend": self.model.get("backend"),
        }

    def snapshot(self, since: int = 0) -> dict:
        """The JSON status: counters, rates, latency percentiles, the last record, timeline points after `since`.

        One snapshot is built at most every SNAPSHOT_TTL_S and shared by every viewer; each gets only the timeline
        points it has not seen yet (seq > since, found by bisection: the points are in seq order)."""
        mono = time.monotonic()
        cached = self._snapshot
        if cached is None or mono - cached[0] > SNAPSHOT_TTL_S:
            cached = self._snapshot = (mono, self._build_snapshot(mono))
        snap = dict(cached[1])
        timeline = snap["timeline"]
        snap["timeline"] = timeline[bisect.bisect_right(timeline, since, key=lambda p: p[0]) :]
        return snap

    def _build_snapshot(self, mono: float) -> dict:
        with self.cond:
            counts = dict(self.counts)
            lat = np.asarray(self.latencies, dtype=np.float64)
            marks = [m for m in self.rate_marks if mono - m[0] <= RATE_WINDOW_S]
            timeline = list(self.timeline)
            gallery = [{k: v for k, v in g.items() if k != "jpeg"} for g in self.gallery]
            last, state, frame_seq, frame_info = self.last, self.state, self.frame_seq, self.frame_info
            age = self.frame_age()
        stats = self.stats()
        source = self.source_state()
        line = self.line(source)
        rate = (counts["images"] - marks[0][1]) / max(mono - marks[0][0], 1e-3) if marks else 0.0
        return {
            "state": state,
            "uptime_s": round(time.time() - self.started, 1),
            "line": line,
            "ready": line["state"] in READY_STATES and self.model_loaded,
            "model": self.model,
            "source": {**self.source, **source},
            "counts": {
                **counts,
                "dropped_frames": int(stats.get("dropped", 0)),
                "reconnects": int(stats.get("reconnects", 0)),
            },
            "images_per_s": round(rate, 2) if state == "running" else 0.0,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            },
            "last_frame_age_s": age,
            "last": last,
            "frame": {"seq": frame_seq, "info": frame_info},
            "timeline": timeline,
            "gallery": gallery,
        }

    def thumbnail(self, entry_id: int) -> bytes | None:
        with self.cond:
            for g in self.gallery:
                if g["id"] == entry_id:
                    return g["jpeg"]
        return None

    def wait_frame(self, after_seq: int, timeout: float) -> tuple[int, bytes | None]:
        """For MJPEG streams: block until a frame newer than after_seq is drawn (or timeout); (seq, jpeg)."""
        with self.cond:
            self.cond.wait_for(lambda: self.frame_seq > after_seq or self._stop or self.state == "finished", timeout)
            return self.frame_seq, self.frame_jpeg
