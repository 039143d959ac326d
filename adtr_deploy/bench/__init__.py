"""Benchmarks: latency, throughput and memory of every backend against the PyTorch reference, side by side.

`run_benchmark(BenchConfig(...))` is what `adtr-bench` calls. Heavy modules (torch, onnxruntime, matplotlib) are imported
inside the functions that use them.
"""

from adtr_deploy.bench.core import BenchConfig, parse_batch_sizes, run_benchmark
from adtr_deploy.bench.timing import TimingPlan

__all__ = ["BenchConfig", "TimingPlan", "parse_batch_sizes", "run_benchmark"]
