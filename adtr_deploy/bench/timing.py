"""Timing and memory measurement: interleaved timed iterations, latency statistics, peak resident memory.

Several backends are timed side by side in alternating blocks, so a burst of load from another process on a shared machine
slows all of them alike and their ratio stays meaningful. Each block starts with one untimed call (or, for calls longer
than a quarter block, a short pause): thread pools of the previous backend (ONNX Runtime and OpenMP spin-wait after a
run) must not be charged to the next one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adtr_deploy.errors import UserError

SETTLE_SECONDS = 0.02  # ONNX Runtime and OpenMP worker threads spin for at most a few milliseconds after a run


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure: `warmup` untimed calls, then timed calls until BOTH `min_iters` and `min_seconds` are reached."""

    warmup: int = 3
    min_iters: int = 20
    min_seconds: float = 5.0
    block_seconds: float = 0.5  # length of one block of consecutive calls of one backend
    max_seconds: float = 600.0  # safety stop for the whole interleaved measurement

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_iters < 1 or self.min_seconds < 0:
            raise UserError(
                f"warm-up {self.warmup}, minimum iterations {self.min_iters} and minimum seconds {self.min_seconds} "
                "must be >= 0, >= 1 and >= 0; fix --warmup/--min-iters/--min-seconds"
            )


def percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples_s: Sequence[float], batch_size: int) -> dict:
    """Latency statistics (milliseconds) and throughput (images/s) of the timed calls of one backend at one batch size.

    Throughput is images over the summed time of the timed calls, i.e. batch_size / mean latency.
    """
    s = np.asarray(samples_s, dtype=np.float64)
    if s.size == 0:
        raise UserError("no timed samples to summarize")
    total = float(s.sum())
    ms = s * 1e3
    return {
        "count": int(s.size),
        "total_s": total,
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if s.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": float(ms.max()),
        "throughput_ips": batch_size * s.size / total,
        "throughput_p50_ips": batch_size / (percentile(s, 50)),
    }


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call takes. The callable must block until its results exist (GPU callables synchronize)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_interleaved(
    calls: dict[str, Callable[[], object]], plan: TimingPlan, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Time every callable in alternating blocks until each has `min_iters` samples and `min_seconds` of timed calls.

    Returns name -> per-call latencies in seconds, in the order they were taken. The order of backends rotates every round,
    so none is always the first after a pause. When `cpu` is given it receives, per name, the process CPU time (all
    threads) of each timed call: unlike wall time it does not grow while other processes hold the cores.
    """
    if not calls:
        return {}
    names = list(calls)
    estimate: dict[str, float] = {}
    for name in names:
        for _ in range(plan.warmup):
            calls[name]()
        estimate[name] = time_call(calls[name])  # one more untimed call gives the block length
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rnd = 0
    while True:
        pending = [n for n in names if len(samples[n]) < plan.min_iters or sum(samples[n]) < plan.min_seconds]
        if not pending or time.perf_counter() - start > plan.max_seconds:
            break
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            if name not in pending:
                continue
            block = max(1, min(plan.min_iters, math.ceil(plan.block_seconds / max(estimate[name], 1e-6))))
            if estimate[name] < plan.block_seconds / 4:
                calls[name]()  # untimed: the previous backend's threads may still be spinning
            else:
                time.sleep(SETTLE_SECONDS)  # a call too long to waste: let the other pool's spinning threads sleep
            for _ in range(block):
                c0 = time.process_time()
                samples[name].append(time_call(calls[name]))
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - c0)
        rnd += 1
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# Memory


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def read_hwm() -> int | None:
    """The kernel's peak resident set of this process in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where the platform does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The machine's matrix-multiply peak


def _gemm_rate(matmul: Callable[[], object], n: int, seconds: float) -> float:
    """Best GFLOP/s of repeated n x n x n products over about `seconds` (best-of: the machine's capability, not its load)."""
    matmul()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time_call(matmul)
        best = max(best, 2.0 * n**3 / t / 1e9)
    return best


def matmul_peak(seconds: float = 1.0, n: int = 1024, threads: int | None = None) -> dict:
    """Measured fp32 matrix-multiply GFLOP/s with numpy (BLAS) and, where installed, torch; `peak_gflops` is the higher.

    This is what dense fp32 compute reaches on this machine in this run; a model's FLOPs divided by it bound its latency.
    """
    rs = np.random.default_rng(0)
    a = rs.standard_normal((n, n), dtype=np.float32)
    b = rs.standard_normal((n, n), dtype=np.float32)
    out: dict = {"n": n, "dtype": "float32"}
    try:  # numpy's BLAS thread pool follows --threads where threadpoolctl (a scikit-learn dependency) is installed
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None and threads:
        with threadpool_limits(limits=threads, user_api="blas"):
            out["numpy_gflops"] = _gemm_rate(lambda: a @ b, n, seconds / 2)
    else:
        out["numpy_gflops"] = _gemm_rate(lambda: a @ b, n, seconds / 2)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        prev = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        try:
            out["torch_gflops"] = _gemm_rate(lambda: ta @ tb, n, seconds / 2)
        finally:
            torch.set_num_threads(prev)
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    out["threads"] = threads or os.cpu_count()
    return out


def gpu_matmul_peak(seconds: float = 1.0, n: int = 4096) -> dict | None:
    """Measured fp32 matmul GFLOP/s on the first CUDA device (TF32 off: true fp32), None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")

        def mm():
            a @ b
            torch.cuda.synchronize()

        rate = _gemm_rate(mm, n, seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"n": n, "dtype": "float32 (TF32 off)", "device": torch.cuda.get_device_name(0), "peak_gflops": rate}
