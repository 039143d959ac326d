"""/metrics in the Prometheus text format, with prometheus-client (imported only when --serve is used).

Counters are read from the live state at scrape time by a custom collector (one source of truth, nothing to keep in
sync); latencies go into real histograms, one per stage, observed from the pipeline's observer.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from adtr_deploy.runtime.serve.state import LINE_STATES

# Seconds: from sub-millisecond (tiny models on a GPU) to seconds (big models on a small CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("before_inference", "inference", "end_to_end")


class _StateCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        snap = self.service.state.snapshot(since=1 << 62)  # no timeline points needed here
        counts = snap["counts"]
        for key, help_text in (
            ("images", "Images and frames taken from the source (each has one record in results.jsonl)."),
            ("anomalies", "Images judged anomalous."),
            ("errors", "Images that could not be read or decoded."),
            ("dropped_frames", "Live frames replaced by a newer one before inference (consumer slower than camera)."),
            ("reconnects", "Attempts to reopen a live source after a drop, the failed ones included."),
        ):
            yield CounterMetricFamily(f"adtr_{key}", help_text, value=counts[key])
        source, line = snap["source"], snap["line"]
        yield GaugeMetricFamily(
            "adtr_source_up", "1 while the source delivers (a live stream connected, a file being read).",
            value=int(bool(source.get("up", True))),
        )  # fmt: skip
        yield CounterMetricFamily(
            "adtr_source_outages", "Times a live source dropped (each outage once, however many attempts).",
            value=source.get("outages", 0),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "adtr_source_outage_seconds", "Seconds the current outage of the source has lasted (0 while it is up).",
            value=source.get("outage_s") or 0.0,
        )  # fmt: skip
        states = GaugeMetricFamily(
            "adtr_line_state", "1 for the line's state now (the page's banner), 0 for the others.", labels=["state"]
        )
        for name in LINE_STATES:
            states.add_metric([name.lower().replace(" ", "_")], int(line["state"] == name))
        yield states
        yield GaugeMetricFamily(
            "adtr_ready", "1 while /readyz answers 200: source up, frames within the stall timeout, model loaded.",
            value=int(bool(snap["ready"])),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "adtr_stall_timeout_seconds", "No record for this long makes the line NO SIGNAL.",
            value=line["stall_timeout_s"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "adtr_paused", "1 while inference is paused from the live view.", value=int(snap["state"] == "paused")
        )
        age = snap["last_frame_age_s"]
        yield GaugeMetricFamily(
            "adtr_last_frame_age_seconds",
            "Seconds since the last record (since the start while there is none).",
            value=snap["uptime_s"] if age is None else age,
        )
        yield GaugeMetricFamily(
            "adtr_images_per_second", "Images per second over the last 5 s.", value=snap["images_per_s"]
        )
        model = snap["model"]
        yield GaugeMetricFamily("adtr_threshold", "Raw score threshold in use.", value=model["threshold"])
        monitor = getattr(self.service, "drift", None)  # adtr_deploy.runtime.drift: rolling median of good scores
        drift = monitor.status() if monitor is not None else {}
        yield GaugeMetricFamily(
            "adtr_score_drift",
            "Rolling median of recent good scores minus the calibration mean, in calibration sigmas (0 until the window "
            "is full).",
            value=drift.get("shift_sigmas") or 0.0,
        )
        yield GaugeMetricFamily(
            "adtr_drift_active",
            "1 while the line is in DRIFT (the whole score population moved).",
            value=int(bool(drift.get("active"))),
        )
        yield GaugeMetricFamily(
            "adtr_input_saturated_fraction",
            "Median share of the recent frames' pixel values clipped at 255 (over-exposure), over the drift window.",
            value=drift.get("saturated_fraction") or 0.0,
        )
        yield GaugeMetricFamily(
            "adtr_model_version", "Version of the versioned model folder running (0: a plain model path).",
            value=model.get("version") or 0,
        )  # fmt: skip
        rollout = getattr(self.service, "rollout", None)
        yield CounterMetricFamily(
            "adtr_model_swaps",
            "Switches to another model version during this run.",
            value=rollout.swaps if rollout else 0,
        )
        info = InfoMetricFamily("adtr_model", "The model being run.")
        info.add_metric([], {k: str(model.get(k, "")) for k in ("name", "sha256", "backend", "device", "input_size")})
        yield info
        sink = CounterMetricFamily(
            "adtr_sink_messages", "Anomaly messages per sink and outcome.", labels=["sink", "outcome"]
        )
        for s in self.service.sink_stats():
            for outcome in ("sent", "dropped", "failed", "retries"):
                sink.add_metric([s["name"], outcome], s.get(outcome, 0))
        yield sink
        spooled = GaugeMetricFamily(
            "adtr_sink_spooled", "Messages in each sink's spool, not yet acknowledged.", labels=["sink"]
        )
        for s in self.service.sink_stats():
            spooled.add_metric([s["name"]], s.get("spooled", 0))
        yield spooled
        yield GaugeMetricFamily("adtr_mjpeg_streams", "Open /stream.mjpg connections.", value=self.service.streams)
        server = self.service.server.stats() if self.service.server is not None else {"connections": 0, "rejected": {}}
        yield GaugeMetricFamily(
            "adtr_http_connections", "Open HTTP connections (viewers, pollers, waiting clients).",
            value=server["connections"],
        )  # fmt: skip
        rejected = CounterMetricFamily(
            "adtr_http_rejected",
            "Connections the server closed or refused to keep its budgets: refused, evicted (oldest waiting socket "
            "closed to make room), request_timeout, write_timeout, busy (503), bad_request.",
            labels=["reason"],
        )
        for reason in ("refused", "evicted", "request_timeout", "write_timeout", "busy", "bad_request"):
            rejected.add_metric([reason], server["rejected"].get(reason, 0))
        yield rejected
        cpu = CounterMetricFamily(
            "adtr_serve_cpu_seconds", "CPU the live view itself used: observe, draw, http.", labels=["part"]
        )
        for part, seconds in self.service.state.cpu_s.items():
            cpu.add_metric([part], seconds)
        yield cpu


def build_registry(service) -> tuple[CollectorRegistry, Callable[[str, float], None]]:
    """A registry of its own (so several services in one process never collide) and the timing hook for the state."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_StateCollector(service))
    # The process's own figures: process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...,
    # python_info and python_gc_*.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    hist = Histogram(
        "adtr_stage_latency_seconds",
        "Latency per stage: before_inference (queue, decode, resize, batching), inference, end_to_end.",
        labelnames=["stage"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    children = {stage: hist.labels(stage=stage) for stage in STAGES}

    def timing(stage: str, seconds: float) -> None:
        children[stage].observe(seconds)

    return registry, timing


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
