"""/metrics in the Prometheus text format, with prometheus-client (imported only when --serve is used).

Counters are read from the live state at scrape time by a custom collector (one source of truth, nothing to keep in
sync); latencies go into real histograms, one per stage, observed from the pipeline's observer.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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
            ("reconnects", "Times a live source was reopened after a drop."),
        ):
            yield CounterMetricFamily(f"adtr_{key}", help_text, value=counts[key])
        yield GaugeMetricFamily(
            "adtr_paused", "1 while inference is paused from the live view.", value=int(snap["state"] == "paused")
        )
        age = snap["last_frame_age_s"]
        yield GaugeMetricFamily(
            "adtr_last_frame_age_seconds", "Seconds since the last record.", value=-1 if age is None else age
        )
        yield GaugeMetricFamily(
            "adtr_images_per_second", "Images per second over the last 5 s.", value=snap["images_per_s"]
        )
        model = snap["model"]
        yield GaugeMetricFamily("adtr_threshold", "Raw score threshold in use.", value=model["threshold"])
        info = InfoMetricFamily("adtr_model", "The model being run.")
        info.add_metric([], {k: str(model.get(k, "")) for k in ("name", "sha256", "backend", "device", "input_size")})
        yield info
        sink = CounterMetricFamily(
            "adtr_sink_messages", "Anomaly messages per sink and outcome.", labels=["sink", "outcome"]
        )
        for s in self.service.sink_stats():
            for outcome in ("sent", "dropped", "failed", "retries"):
                sink.add_metric([s["name"], outcome], s[outcome])
        yield sink
        yield GaugeMetricFamily("adtr_mjpeg_streams", "Open /stream.mjpg connections.", value=self.service.streams)
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
