"""The benchmark run: every backend and the PyTorch reference, side by side, at each batch size; then FLOPs, the machine's
matrix-multiply peak, the pipeline's stage breakdown, optional profiles, and the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adtr_deploy.bench import runners as R
from adtr_deploy.bench.machine import load_average, machine_info
from adtr_deploy.bench.timing import TimingPlan, gpu_matmul_peak, matmul_peak, measure_interleaved, summarize
from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import IMAGE_SUFFIXES, load_image, stack_batch

REPORT_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    """Everything `adtr-bench` takes (see adtr_deploy/cli/bench.py for the user-facing meaning)."""

    model: Path
    out: Path
    reference: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 8)
    backends: tuple[str, ...] | None = None  # None: every backend available here
    plan: TimingPlan = field(default_factory=TimingPlan)
    threads: int | None = None  # None: physical cores
    spinning: str = "off"  # onnxruntime-cpu: intra-op spin-waiting "off" (the runtime's default), "on", or "both" rows
    streams: int = 1  # onnxruntime-cpu: > 1 adds a row splitting each batch over that many concurrent sessions
    pipeline: bool = True
    images: Path | None = None  # image files for the pipeline and as timing input; None: write demo images
    profile: bool = False
    memory: bool = True  # per-backend memory probes in child processes
    peak_seconds: float = 1.0  # time spent measuring the matmul peak (twice: before and after the timings)


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def image_files(cfg: BenchConfig, log: Callable[[str], None]) -> tuple[list[Path], str]:
    """The real image files the run uses: --images, else the built-in demo images written under OUT/images."""
    if cfg.images is not None:
        folder = Path(cfg.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder} is not a folder; give a folder of image files")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files, str(folder)
    try:
        from adtr_deploy.data.demo import write_demo_dataset
    except ImportError as exc:
        raise UserError(
            f"the built-in demo images cannot be written here ({exc}); pass --images FOLDER with some image files"
        ) from None
    root = cfg.out / "images"
    log(f"writing demo images to {root}")
    write_demo_dataset(root, categories=("brick",))
    files = sorted((root / "brick" / "test").rglob("*.png"))
    return files, f"built-in demo data set, category brick, test split ({root})"


def _select_backends(cfg: BenchConfig, artifacts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    available = R.available_backends(artifacts)
    wanted = list(cfg.backends) if cfg.backends else list(R.BACKEND_CHOICES)
    unknown = [b for b in wanted if b not in R.BACKEND_CHOICES]
    if unknown:
        raise UserError(
            f"unknown backend(s) {', '.join(unknown)} in --backends; choose from {', '.join(R.BACKEND_CHOICES)}"
        )
    chosen = [b for b in wanted if available[b] is None]
    skipped = {b: available[b] for b in wanted if available[b] is not None}
    return chosen, skipped


def _ratio(backend: dict, reference: dict | None) -> float | None:
    if reference is None:
        return None
    return backend["throughput_ips"] / reference["throughput_ips"]


def _reference_for(runner: R.Runner, refs: list[R.Runner]) -> R.Runner | None:
    """The reference a backend is compared with: the eager model on the same device with the same copy mode."""
    same = [r for r in refs if r.device == runner.device and r.copies == runner.copies]
    cpu = [r for r in refs if r.device == "cpu"]
    return (same or cpu or [None])[0]


def _agreement(outputs: dict[str, tuple[np.ndarray, np.ndarray]], reference: str | None) -> dict:
    """Max |score| and |map| differences of every runner against the reference on the timed batch: proof that the
    runners compute the same model (a wrong --reference would make every ratio meaningless)."""
    if reference is None or reference not in outputs:
        return {}
    ref_map, ref_score = outputs[reference]
    out = {}
    for name, (amap, score) in outputs.items():
        if name == reference:
            continue
        out[name] = {
            "max_abs_score_diff": float(np.max(np.abs(score - ref_score))),
            "max_abs_map_diff": float(np.max(np.abs(amap - ref_map))),
            "reference_score_range": float(np.ptp(ref_score)) if ref_score.size > 1 else float(abs(ref_score[0])),
        }
    return out


def _as_numpy(result) -> tuple[np.ndarray, np.ndarray] | None:
    """Outputs of a host-side call as numpy; device-resident calls return device objects and are skipped."""
    if isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, np.ndarray) for r in result):
        return result
    return None


def _memory_row(memory: dict[str, dict], runner: R.Runner, bs: int) -> dict | None:
    """This runner's figures from its backend's child-process probe."""
    label = runner.backend if not runner.is_reference else f"{R.REFERENCE} ({runner.device})"
    probe = memory.get(label) or {}
    if "error" in probe:
        return {"error": probe["error"]}
    row = (probe.get("runners", {}).get(runner.name) or {}).get(str(bs))
    if row is None:
        return None
    return {
        "torch_imported": probe.get("torch_imported"),
        "baseline_mb": probe["baseline_mb"],
        "load_mb": probe["load_mb"],
        "loaded_mb": probe["loaded_mb"],
        **row,
        "method": probe["method"],
    }


def _find_reference(cfg: BenchConfig, spec) -> tuple[Path | None, str]:
    if cfg.reference is None:
        return R.find_reference(spec, cfg.model)
    reference = Path(cfg.reference)
    if not reference.is_file():
        raise FileNotFoundError(f"--reference {reference} does not exist; give the checkpoint.pt the model came from")
    return reference, f"given with --reference ({reference})"


def _make_runners(
    cfg: BenchConfig, artifacts: dict[str, Path], reference: Path | None, threads: int, log: Callable[[str], None]
) -> tuple[list[R.Runner], list[dict], dict[str, str], Path | None]:
    """(runners, their plain descriptions for the memory probes, skipped backends with reasons, TorchScript made here)."""
    from adtr_deploy.runtime.base import BackendError

    descs: list[dict] = []
    if reference is not None:
        devices = ["cpu", "cuda"] if R.cuda_available() else ["cpu"]
        descs += [{"kind": "reference", "checkpoint": str(reference), "device": d, "threads": threads} for d in devices]
    made_here = None
    wants_ts = cfg.backends is None or any(b.startswith("torchscript") for b in cfg.backends)
    if ".torchscript" not in artifacts and reference is not None and wants_ts:
        log("no TorchScript artifact beside the model: exporting one from the reference with adtr-export's exporter")
        made_here = R.export_torchscript(reference, cfg.out / "artifacts")
        artifacts[".torchscript"] = made_here
    chosen, skipped = _select_backends(cfg, artifacts)
    session = {"threads": threads, "spinning": cfg.spinning, "streams": cfg.streams}
    descs += [
        {"kind": "backend", "name": n, "path": str(artifacts[R.BACKEND_CHOICES[n][0]]), **session} for n in chosen
    ]
    runners: list[R.Runner] = []
    for desc in descs:
        try:
            runners += R.build_runners(desc)
        except (BackendError, ValueError, OSError) as exc:
            if desc["kind"] == "reference":
                raise
            skipped[desc["name"]] = str(exc)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    if not [r for r in runners if not r.is_reference]:
        raise UserError(
            "no backend can run this model here ("
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            + "); install onnxruntime or give an ONNX/TorchScript model"
        )
    return runners, [d for d in descs if d.get("name") not in skipped], skipped, made_here


def _time_batch(
    bs: int,
    batch: np.ndarray,
    runners: list[R.Runner],
    plan: TimingPlan,
    memory: dict[str, dict],
    log: Callable[[str], None],
) -> tuple[list[dict], dict]:
    """Every runner at one batch size, interleaved: (result rows, agreement with the reference)."""
    refs = [r for r in runners if r.is_reference]
    calls = {r.name: r.bind(batch) for r in runners}
    outputs = {}
    for r in runners:  # one call each checks that every runner works on this batch and gives its outputs
        out = _as_numpy(calls[r.name]())
        if out is not None:
            outputs[r.name] = out
    agreement = _agreement(outputs, refs[0].name if refs else None)
    log(f"batch {bs}: timing {', '.join(calls)} interleaved")
    cpu: dict[str, list[float]] = {}
    samples = measure_interleaved(calls, plan, cpu)
    rows = {}
    for r in runners:
        stats = summarize(samples[r.name], bs * r.in_flight(bs))  # images per timed call
        cpu_ms = np.asarray(cpu[r.name]) * 1e3
        ref = _reference_for(r, refs) if not r.is_reference else None
        rows[r.name] = {
            "runner": r.name,
            "backend": r.backend,
            "device": r.device,
            "host_device_copies": r.copies,
            "batch_size": bs,
            **stats,
            "samples_ms": [round(x * 1e3, 4) for x in samples[r.name]],
            # process CPU time (all threads) per call: robust to other processes' load, includes spin-waiting
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
            "cpu_mean_ms": float(cpu_ms.mean()),
            "cpu_per_wall": float(cpu_ms.sum() / (stats["total_s"] * 1e3)),
            "memory": _memory_row(memory, r, bs),
            "reference": ref.name if ref else None,
            "speedup_vs_reference": None,
        }
    for row in rows.values():
        if row["reference"]:
            row["speedup_vs_reference"] = _ratio(row, rows[row["reference"]])
        log(
            f"  {row['runner']:<40} p50 {row['p50_ms']:8.2f} ms  {row['throughput_ips']:8.2f} img/s"
            + (f"  x{row['speedup_vs_reference']:.2f} vs {row['reference']}" if row["speedup_vs_reference"] else "")
        )
    return list(rows.values()), agreement


def _add_compute(results: list[dict], flops: dict, peak: float, gpu_peak: dict | None, threads: int) -> None:
    """GFLOP/s and the fraction of the measured matmul peak, by wall time and by CPU time, on every row."""
    if not flops.get("flops_per_image"):
        return
    for row in results:
        row["achieved_gflops"] = flops["flops_per_image"] * row["throughput_ips"] / 1e9
        device_peak = peak if row["device"] == "cpu" else (gpu_peak or {}).get("peak_gflops")
        row["fraction_of_peak"] = row["achieved_gflops"] / device_peak if device_peak else None
        # The same per core-second of CPU time against the per-thread peak: what the engine does with the CPU it got,
        # which other processes' load does not dilute (spin-waiting counts against it).
        per_core = flops["flops_per_image"] * row["batch_size"] / (row["cpu_mean_ms"] / 1e3) / 1e9
        row["fraction_of_peak_cpu_time"] = per_core / (peak / threads) if row["device"] == "cpu" else None


def _profiles(
    cfg: BenchConfig, artifacts: dict[str, Path], ref_model, pool: list, threads: int, log: Callable[[str], None]
) -> dict:
    from adtr_deploy.bench.profile import profile_eager, profile_onnxruntime

    profiles = {}
    for bs in cfg.batch_sizes:
        batch = stack_batch(pool[:bs])
        entry = {}
        if ".onnx" in artifacts:
            log(f"profiling ONNX Runtime at batch {bs}")
            entry["onnxruntime-cpu"] = profile_onnxruntime(artifacts[".onnx"], batch, threads, cfg.out / "profiles")
        if ref_model is not None:
            log(f"profiling PyTorch eager at batch {bs}")
            entry[R.REFERENCE] = profile_eager(ref_model, batch)
        profiles[str(bs)] = entry
    return profiles


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = _log_default) -> dict:
    """Run the whole benchmark and write report.json, report.md and the plots into cfg.out. Returns the report dict."""
    from adtr_deploy.bench import flops as F
    from adtr_deploy.bench.memory import measure_memory
    from adtr_deploy.bench.report import write_report
    from adtr_deploy.runtime.base import read_spec

    started = time.time()
    user_log = log

    def log(msg: str) -> None:  # noqa: F811  (every message carries the elapsed time: where a long run spends it)
        user_log(f"[{time.time() - started:6.1f}s] {msg}")

    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise UserError(f"--batch-sizes {cfg.batch_sizes} must be positive integers, e.g. 1,8")
    cfg.out.mkdir(parents=True, exist_ok=True)
    artifacts = R.find_artifacts(cfg.model)
    primary = Path(cfg.model) if Path(cfg.model).is_file() else artifacts.get(".onnx", next(iter(artifacts.values())))
    spec = read_spec(primary)
    threads = cfg.threads or R.default_threads()
    machine = machine_info()
    log(f"model {primary} ({spec.preset}, {spec.input_size[0]}x{spec.input_size[1]}), threads {threads}")

    reference, reference_note = _find_reference(cfg, spec)
    runners, descs, skipped, made_here = _make_runners(cfg, artifacts, reference, threads, log)
    ref_model = None
    if reference is not None:
        from adtr_deploy.model.checkpoint import load_checkpoint

        ref_model = load_checkpoint(reference)[0]  # a CPU copy for counting FLOPs and profiling

    files, images_note = image_files(cfg, log)
    size = spec.input_size
    pool = [load_image(files[i % len(files)], size) for i in range(max(cfg.batch_sizes))]

    memory: dict[str, dict] = {}
    if cfg.memory:
        labels = [d.get("name") or f"{R.REFERENCE} ({d['device']})" for d in descs]
        log(f"measuring memory of {', '.join(labels)}, each in its own child process")
        for label, probe in zip(labels, measure_memory(descs, list(cfg.batch_sizes), [str(f) for f in files], size)):
            if "error" in probe:
                log(f"  {label}: {probe['error']}")
            memory[label] = probe

    log("counting FLOPs")
    flops = F.count_flops(ref_model, artifacts.get(".onnx"), size)
    log("measuring the fp32 matrix-multiply peak")
    peak_before = matmul_peak(cfg.peak_seconds, threads=threads)

    results: list[dict] = []
    agreement: dict[str, dict] = {}
    for bs in cfg.batch_sizes:
        rows, agreement[str(bs)] = _time_batch(bs, stack_batch(pool[:bs]), runners, cfg.plan, memory, log)
        results += rows

    peak_after = matmul_peak(cfg.peak_seconds, threads=threads)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])
    gpu_peak = gpu_matmul_peak(cfg.peak_seconds) if any(r.device == "cuda" for r in runners) else None
    _add_compute(results, flops, peak, gpu_peak, threads)

    pipeline = None
    if cfg.pipeline:
        from adtr_deploy.bench.pipeline import pipeline_breakdown

        target = next((r for r in runners if r.backend == "onnxruntime-cpu"), None) or next(
            r for r in runners if not r.is_reference and r.copies != "excluded (device-resident)"
        )
        suffix, device = R.BACKEND_CHOICES[target.backend]
        log(f"pipeline stage breakdown on {target.name}")
        pipeline = pipeline_breakdown(artifacts[suffix], device, files, cfg.batch_sizes, cfg.plan, threads, log)
        pipeline["backend"] = target.name

    profiles = _profiles(cfg, artifacts, ref_model, pool, threads, log) if cfg.profile else None

    report = {
        "report_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": None,
        "model": {
            "path": str(primary),
            "artifacts": {k: str(v) for k, v in artifacts.items()},
            "torchscript_made_here": str(made_here) if made_here else None,
            "preset": spec.preset,
            "backbone": spec.backbone,
            "input_size": list(size),
            "precision": spec.precision,
        },
        "reference": {"checkpoint": str(reference) if reference else None, "note": reference_note},
        "machine": machine,
        "settings": {
            "batch_sizes": list(cfg.batch_sizes),
            "threads": threads,
            "onnxruntime_spinning": cfg.spinning,
            "onnxruntime_streams": cfg.streams,
            "warmup": cfg.plan.warmup,
            "min_iters": cfg.plan.min_iters,
            "min_seconds": cfg.plan.min_seconds,
            "block_seconds": cfg.plan.block_seconds,
            "interleaved": True,
            "images": images_note,
            "num_image_files": len(files),
        },
        "backends": {"timed": sorted({r.name for r in runners}), "skipped": skipped},
        "results": results,
        "agreement": agreement,
        "flops": flops,
        "matmul_peak": {"before": peak_before, "after": peak_after, "peak_gflops": peak, "gpu": gpu_peak},
        "pipeline": pipeline,
        "profiles": profiles,
    }
    report["machine"]["load_average_end"] = load_average()
    report["duration_s"] = time.time() - started
    write_report(report, cfg.out)
    log(f"wrote {cfg.out / 'report.json'}, {cfg.out / 'report.md'} and plots")
    return report


def parse_batch_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """'1,8' -> (1, 8), with one clear sentence for anything else."""
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    try:
        sizes = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"--batch-sizes {text!r} is not a comma-separated list of integers; write e.g. 1,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UserError(f"--batch-sizes {text!r} must list positive integers; write e.g. 1,8")
    return tuple(dict.fromkeys(sizes))
