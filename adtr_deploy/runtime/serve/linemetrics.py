"""/metrics of a line of cameras: every per-camera series of the single-camera /metrics, labelled `camera`.

The single-camera collector (adtr_deploy.runtime.serve.metrics) is run over each camera's view and its samples are
relabelled, so a camera has exactly the series one camera had (adtr_images_total{camera="top"}, adtr_line_state
{camera="top",state="ok"}, ...) and a dashboard written for one camera works per camera with a `camera` selector. The
series of the process itself (sinks, HTTP, serving CPU) appear once, without the label; the shared batches add
adtr_batches_total and adtr_batch_frames_total per model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from adtr_deploy.runtime.serve.metrics import LATENCY_BUCKETS, _StateCollector

# Series of the whole process: not repeated per camera.
PROCESS_WIDE = {
    "adtr_sink_messages",
    "adtr_sink_spooled",
    "adtr_mjpeg_streams",
    "adtr_http_connections",
    "adtr_http_rejected",
    "adtr_serve_cpu_seconds",
}


class _LineCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        merged: dict[str, Metric] = {}
        with self.service._lock:
            views = list(self.service.views.values())
        for view in views:
            for family in _StateCollector(view).collect():
                if family.name in PROCESS_WIDE:
                    continue
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    out.add_sample(s.name, {"camera": view.name, **s.labels}, s.value)
        yield from merged.values()
        for family in _StateCollector(self.service).collect():  # the process-wide ones, once
            if family.name in PROCESS_WIDE:
                yield family
        yield GaugeMetricFamily("adtr_line_cameras", "Cameras on the line now.", value=len(views))
        line = self.service.line
        batchers = line.batchers.items() if line is not None else ()
        batches = CounterMetricFamily(
            "adtr_batches", "Inference calls of the shared batcher, per model.", labels=["model"]
        )
        frames = CounterMetricFamily(
            "adtr_batch_frames", "Frames (of all cameras) in those calls, per model.", labels=["model"]
        )
        for key, batcher in batchers:
            stats = batcher.stats()
            batches.add_metric([str(key or "default")], stats["batches"])
            frames.add_metric([str(key or "default")], stats["images"])
        yield batches
        yield frames


def build_line_registry(service) -> tuple[CollectorRegistry, Histogram]:
    """The line's registry and its stage-latency histogram (labels camera, stage; each view observes its own)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_LineCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    hist = Histogram(
        "adtr_stage_latency_seconds",
        "Latency per camera and stage: before_inference (queue, decode, resize, batching), inference, end_to_end.",
        labelnames=["camera", "stage"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return registry, hist
