"""Where the end-to-end time goes: decode, preprocess, inference, postprocess, and the pipeline's overhead as one number.

Two measurements on the same backend, on real image files:
- the stage breakdown: each stage of the runtime's code path (`decode_frame` -> preprocess.read_image, preprocess.resize +
  stack_batch, `backend.run`, the runtime's Postprocessor) timed one after the other, per image;
- the end-to-end throughput of the runtime's real `Pipeline` (worker threads decoding while the backend infers, results.jsonl
  written) against model-only throughput (`backend.run` on already prepared batches), timed interleaved.
The overhead is 1 - pipeline / model-only throughput. Passes alternate (pipeline, model-only, pipeline, ...), so each
pipeline pass has a model-only pass next to it; `overhead_paired` is 1 - the median of those pairs' ratios, which
cancels slow drifts of the machine's load that the totals still contain.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize
from adtr_deploy.preprocess import resize, stack_batch

STAGES = ("decode", "preprocess", "inference", "postprocess")
PASS_SECONDS = 2.0  # model time of one timed pipeline pass (at most): start-up is amortized as in a real run


def _paired_overhead(pipeline_s: Sequence[float], model_s: Sequence[float]) -> float:
    """1 - median over neighbouring passes of model-only time / pipeline time (same images in both)."""
    k = min(len(pipeline_s), len(model_s))
    ratios = np.asarray(model_s[:k]) / np.asarray(pipeline_s[:k])
    return float(1.0 - np.median(ratios))


def stage_breakdown(backend, files: Sequence[Path], batch_size: int, plan: TimingPlan) -> dict:
    """Per-image milliseconds of each stage, the stages run one after the other on batches of real files."""
    from adtr_deploy.runtime.postprocess import Postprocessor
    from adtr_deploy.runtime.sources import Frame, decode_frame

    post = Postprocessor(backend.spec.calibration)
    size = backend.spec.input_size
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    start, i, n_batches = time.perf_counter(), 0, 0
    warm = plan.warmup
    while n_batches < plan.min_iters or time.perf_counter() - start < plan.min_seconds:
        paths = [files[(i + k) % len(files)] for k in range(batch_size)]
        i += batch_size
        t0 = time.perf_counter()
        decoded = [decode_frame(Frame(source=str(p), frame=0, key=p.name, timestamp=0.0, path=p)) for p in paths]
        t1 = time.perf_counter()
        x = stack_batch(resize(img, size) for img in decoded)  # (B, H, W, 3) uint8
        t2 = time.perf_counter()
        maps, scores = backend.run(x)
        t3 = time.perf_counter()
        post(maps, scores)
        t4 = time.perf_counter()
        if warm > 0:
            warm -= 1
            start = time.perf_counter()
            continue
        for name, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(dt / batch_size)
        n_batches += 1
    per_image = {s: float(np.mean(v)) * 1e3 for s, v in times.items()}
    total = sum(per_image.values())
    return {
        "batches": n_batches,
        "ms_per_image": per_image,
        "share": {s: v / total for s, v in per_image.items()},
        "serial_ms_per_image": total,
        "serial_throughput_ips": 1e3 / total,
        "p50_ms_per_image": {s: float(np.percentile(v, 50)) * 1e3 for s, v in times.items()},
    }


def pipeline_breakdown(
    model_path: Path,
    device: str,
    files: Sequence[Path],
    batch_sizes: Sequence[int],
    plan: TimingPlan,
    threads: int | None,
    log: Callable[[str], None],
    workers: int | None = None,
) -> dict:
    """Stage breakdown and pipeline-vs-model-only throughput at every batch size (see the module docstring)."""
    from adtr_deploy.preprocess import load_image, read_image
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
    from adtr_deploy.runtime.sources import ImageFiles

    opts = {"threads": threads} if threads and Path(model_path).suffix == ".onnx" else {}
    backend = open_model(model_path, device, **opts)
    defaults = RunOptions()
    workers = workers or defaults.workers
    image_shape = load_image(files[0], backend.spec.input_size).shape
    source_shape = read_image(files[0]).shape
    tmp = Path(tempfile.mkdtemp(prefix="adtr-bench-pipeline-"))
    rows = []
    try:
        for bs in batch_sizes:
            stages = stage_breakdown(backend, files, bs, plan)
            # One timed call = one pass over n images (n a multiple of the batch size, about PASS_SECONDS of inference).
            batch_s = bs * stages["ms_per_image"]["inference"] / 1e3
            pass_s = min(PASS_SECONDS, plan.min_seconds / 5)
            n = bs * min(64, max(2, math.ceil(pass_s / max(batch_s, 1e-4))))
            paths = [Path(files[k % len(files)]) for k in range(n)]
            prepared = [
                stack_batch(load_image(p, backend.spec.input_size) for p in paths[k : k + bs]) for k in range(0, n, bs)
            ]
            counter = [0]

            def run_pipeline(paths=paths, bs=bs, counter=counter):
                counter[0] += 1
                out = tmp / f"run{counter[0]}"
                src = ImageFiles("adtr-bench", [(p, None) for p in paths])
                summary = Pipeline(
                    backend, src, out, RunOptions(batch_size=bs, workers=workers), log=lambda m: None
                ).run()
                shutil.rmtree(out, ignore_errors=True)
                if summary["ok"] != len(paths):
                    raise RuntimeError(f"the pipeline processed {summary['ok']} of {len(paths)} benchmark images")
                return summary

            def run_model(prepared=prepared):
                for x in prepared:
                    backend.run(x)

            log(f"  batch {bs}: pipeline vs model-only over {n} images per pass, interleaved")
            pplan = TimingPlan(
                warmup=1,
                min_iters=max(3, min(plan.min_iters, 8)),
                min_seconds=plan.min_seconds,
                block_seconds=0.0,
                max_seconds=plan.max_seconds,
            )
            samples = measure_interleaved({"pipeline": run_pipeline, "model-only": run_model}, pplan)
            pipe, model = summarize(samples["pipeline"], n), summarize(samples["model-only"], n)
            rows.append(
                {
                    "batch_size": bs,
                    "images_per_pass": n,
                    "workers": workers,
                    "stages": stages,
                    "pipeline": {
                        "passes": pipe["count"],
                        "throughput_ips": pipe["throughput_ips"],
                        "pass_ms": {k: pipe[k] for k in ("p50_ms", "p90_ms", "min_ms", "max_ms")},
                    },
                    "model_only": {
                        "passes": model["count"],
                        "throughput_ips": model["throughput_ips"],
                        "pass_ms": {k: model[k] for k in ("p50_ms", "p90_ms", "min_ms", "max_ms")},
                    },
                    "overhead": 1.0 - pipe["throughput_ips"] / model["throughput_ips"],
                    "overhead_paired": _paired_overhead(samples["pipeline"], samples["model-only"]),
                    "pipeline_vs_model_only": pipe["throughput_ips"] / model["throughput_ips"],
                }
            )
            log(
                f"    pipeline {pipe['throughput_ips']:.2f} img/s, model-only {model['throughput_ips']:.2f} img/s, "
                f"overhead {100 * rows[-1]['overhead']:.1f}% (paired median {100 * rows[-1]['overhead_paired']:.1f}%)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        backend.close()
    return {
        "model": str(model_path),
        "device": device,
        "source_image_shape": list(source_shape),
        "input_shape": list(image_shape),
        "rows": rows,
        "method": (
            "stages: decode_frame/read_image, resize+stack_batch, backend.run, Postprocessor, run one after the other; "
            "end to end: adtr_deploy.runtime.pipeline.Pipeline over image files (results.jsonl written) vs backend.run "
            "on prepared batches, interleaved"
        ),
    }
