"""Inference streams: each batch split over several ONNX Runtime CPU sessions that run at the same time.

One session with T intra-op threads splits every operator of a frame over T threads and joins them again (~300
operators per frame for lite0): at batch 1 on 2 cores a quarter of the time goes to that hand-off. N sessions with T/N
threads each, every one on its own part of the batch or its own batch (the pipeline keeps streams // batch batches
in flight), hand nothing off: two frames in flight, one per stream, were 1.44x the throughput of batch 1 on one
2-thread session at 1.36x its latency (benchmarks/results/speed_levers_focus.md), 1.53x through adtr-run's whole
pipeline (streams_pipeline.md); at batch 8, where one session already keeps both cores busy, 1.18x. This is what
other inference servers call throughput mode (OpenVINO's streams).

ONNX Runtime releases the GIL inside `InferenceSession.run`, and `run` may be called from several threads at once, so
plain threads run the streams in parallel. With one intra-op thread per stream (the case measured above: as many
streams as cores) each run executes on its calling thread, so the streams share ONE session and one copy of the
weights: the lite0 export's resident memory with 4 streams went from 262 to 116 MB
(benchmarks/results/streams_memory.md). Streams of several threads each keep a session (and a copy of the weights)
apiece: a session's intra-op thread pool is shared by all its concurrent runs, which would take those threads away.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def physical_cores() -> int:
    """Physical cores where psutil knows them, else logical CPUs: what ONNX Runtime and PyTorch default to."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return int(n or os.cpu_count() or 1)


def threads_per_stream(threads: int | None, streams: int) -> int:
    """Intra-op threads of each of `streams` sessions sharing `threads` (default: the physical cores); at least 1."""
    return max(1, (threads or physical_cores()) // streams)


class Streams:
    """`sessions` (ONNX Runtime InferenceSessions of one model, or one session listed once per stream) run the parts of
    a batch concurrently: part 0 on the
    calling thread, the others on a pool, outputs concatenated in batch order. Each session serves one part at a time
    (a queue of free sessions), so several callers may run batches at once: with batches smaller than the stream count
    the pipeline keeps streams // batch of them in flight (at batch 1, one frame per stream, live sources included).
    At batch 8 one batch split 4 + 4 was 1.18x one 2-thread session (speed_levers_focus.md); two whole batches at once
    were 0.98x in one scratch adtr-bench run that is not kept, so larger batches are split instead."""

    def __init__(self, sessions: Sequence[Any]):
        self.sessions = list(sessions)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)
        self._pool = ThreadPoolExecutor(len(self.sessions) - 1, thread_name_prefix="adtr-stream")

    def _run_part(self, fetch: list[str], input_name: str, part: np.ndarray) -> list[np.ndarray]:
        session = self._free.get()  # never held while waiting for anything else: no deadlock
        try:
            return session.run(fetch, {input_name: part})
        finally:
            self._free.put(session)

    def run(self, fetch: list[str], input_name: str, batch: np.ndarray) -> list[np.ndarray]:
        parts = np.array_split(batch, max(1, min(len(self.sessions), len(batch))))  # contiguous slices, in order
        futures = [self._pool.submit(self._run_part, fetch, input_name, part) for part in parts[1:]]
        outputs = [self._run_part(fetch, input_name, parts[0])] + [f.result() for f in futures]
        return [np.concatenate([out[i] for out in outputs]) for i in range(len(fetch))]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def open_streams(make_session: Callable[[], Any], first: Any, count: int, *, share: bool = False) -> Streams | None:
    """`count` streams, or None for a single one. `share`: all of them run the already open session `first` (for
    sessions of one intra-op thread: one copy of the weights); else `first` plus count - 1 new sessions."""
    if count <= 1:
        return None
    return Streams([first] * count if share else [first] + [make_session() for _ in range(count - 1)])
