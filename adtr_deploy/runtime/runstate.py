"""What one start of a run keeps while it runs, all of it bounded however long the run lasts (numpy only).

A live run may last months, so nothing here grows per frame: counts are integers, latencies go into a fixed
log-bucket histogram, inference time into a running sum, gaps into the last few plus a count.

Why our own histogram: the runtime must not need prometheus-client (it is the serve extra's), and the summary needs
only percentiles good to a few percent. 240 log-spaced buckets from 0.01 ms to 10 min (each bucket 7.7% wide, so a
percentile is known to within 3.9% of its value) cost 2 KB, whatever the number of frames.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from adtr_deploy.runtime.frames import Frame

Batch = list[tuple[Frame, object]]  # frames in source order with (original, model input) or their error message

KEEP_GAPS = 100  # the summary lists the last this many stream outages; `gaps_total` counts them all


class LatencyHistogram:
    """Fixed log-spaced buckets (milliseconds): constant memory, percentiles within half a bucket (3.9%)."""

    LOW_MS, HIGH_MS, BUCKETS = 0.01, 600_000.0, 240

    def __init__(self) -> None:
        self.edges = np.geomspace(self.LOW_MS, self.HIGH_MS, self.BUCKETS + 1)
        self.counts = np.zeros(self.BUCKETS + 2, dtype=np.int64)  # [below LOW, buckets..., above HIGH]
        self.n = 0
        self.total = 0.0
        self.low = float("inf")
        self.high = 0.0

    def add(self, ms: float) -> None:
        self.counts[int(np.searchsorted(self.edges, ms, side="right"))] += 1
        self.n += 1
        self.total += ms
        self.low, self.high = min(self.low, ms), max(self.high, ms)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile: the geometric middle of the bucket holding it, clamped to the values seen."""
        if not self.n:
            return None
        rank = q / 100 * self.n
        i = int(np.searchsorted(np.cumsum(self.counts), max(rank, 1), side="left"))
        if i == 0:
            value = self.LOW_MS
        elif i > self.BUCKETS:
            value = self.HIGH_MS
        else:
            value = float(np.sqrt(self.edges[i - 1] * self.edges[i]))
        return min(max(value, self.low), self.high)

    def summary(self) -> dict:
        if not self.n:
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        return {
            "mean": round(self.total / self.n, 3),
            **{f"p{q}": round(self.percentile(q), 3) for q in (50, 90, 99)},
        }


def bounded_gaps(gaps: Iterable[dict]) -> tuple[list[dict], int]:
    """The last KEEP_GAPS outages and how many there were."""
    gaps = list(gaps)
    return gaps[-KEEP_GAPS:], len(gaps)


@dataclass
class RunState:
    """One start of a Pipeline: created by `Pipeline.run`, dropped when it returns. Everything is bounded."""

    run_id: str
    started_at: str
    t_start: float = field(default_factory=time.perf_counter)
    counts: dict = field(default_factory=lambda: {"images": 0, "ok": 0, "anomalies": 0, "errors": 0})
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    infer_ms_total: float = 0.0
    infer_calls: int = 0
    last_infer_ms: float = 0.0
    skipped: int = 0  # inputs recorded by an earlier start that --resume skips (files)
    # the loop
    pending: deque[tuple[Frame, Future]] = field(default_factory=deque)  # decoding, at most `window`
    batch: Batch = field(default_factory=list)  # decoded, waiting for the batch to fill
    running: deque[tuple[Batch, Future]] = field(default_factory=deque)  # batches on the streams, oldest first
    taken: int = 0
    exhausted: bool = False
    stopped: str = "end of source"
    signal: int | None = None  # the first SIGINT/SIGTERM
    closing: bool = False  # the summary is being written: signals no longer raise
    stop_requested: bool = False  # the --show window was closed
    next_checkpoint: float = 0.0  # perf_counter time of the next summary.json checkpoint

    def add_inference(self, ms: float) -> None:
        self.infer_ms_total += ms
        self.infer_calls += 1
        self.last_infer_ms = ms

    @property
    def infer_ms_mean(self) -> float | None:
        return round(self.infer_ms_total / self.infer_calls, 3) if self.infer_calls else None
