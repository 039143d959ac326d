"""Where the time goes inside the model: ONNX Runtime's per-node profile and torch.profiler for the eager reference,
both summed per operator type.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

TOP = 12  # operator types listed per profile


def _table(totals: Counter, runs: int) -> list[dict]:
    grand = sum(totals.values()) or 1
    return [
        {"op": op, "ms_per_run": us / runs / 1e3, "share": us / grand} for op, us in totals.most_common(TOP) if us > 0
    ]


def profile_onnxruntime(path: Path, batch: np.ndarray, threads: int | None, out_dir: Path, runs: int = 5) -> dict:
    """ORT profiling (SessionOptions.enable_profiling): kernel time per operator type after ORT's graph optimizations,
    so fused kernels (FusedConv, FusedMatMul, SkipLayerNormalization ...) appear under their own names."""
    import onnxruntime as ort

    out_dir.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(out_dir / f"ort_profile_b{batch.shape[0]}")
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(2):  # warm-up runs are in the trace too; only the last `runs` model_run spans are summed below
        sess.run(None, {name: batch})
    for _ in range(runs):
        sess.run(None, {name: batch})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = model_runs[-runs:]
    t_from = min(e["ts"] for e in last)
    totals: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= t_from:
            totals[e["args"].get("op_name", "?")] += e["dur"]
    return {
        "tool": "onnxruntime SessionOptions.enable_profiling",
        "runs": runs,
        "batch_size": int(batch.shape[0]),
        "model_run_ms": float(np.mean([e["dur"] for e in last])) / 1e3,
        "kernel_ms_per_run": sum(totals.values()) / runs / 1e3,
        "by_op": _table(totals, runs),
        "trace": str(trace),
    }


def profile_eager(model: Any, batch: np.ndarray, runs: int = 3) -> dict:
    """torch.profiler on the eager reference: self CPU time per aten operator."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.from_numpy(batch)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    totals: Counter = Counter()
    for evt in prof.key_averages():
        totals[evt.key.replace("aten::", "")] += evt.self_cpu_time_total  # microseconds
    return {
        "tool": "torch.profiler (self CPU time)",
        "runs": runs,
        "batch_size": int(batch.shape[0]),
        "self_cpu_ms_per_run": sum(totals.values()) / runs / 1e3,
        "by_op": _table(totals, runs),
    }
