"""report.json (every figure), report.md (tables a person reads) and the plots, written into the report folder."""

from __future__ import annotations

from pathlib import Path

from adtr_deploy.fileio import atomic_write_text, dumps_strict

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _jsonable(obj):
    """numpy scalars and paths -> plain JSON values."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _f(x, digits: int = 2, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _load_warning(machine: dict) -> list[str]:
    """A busy machine inflates every absolute figure; say so where the reader looks first."""
    loads = [x for x in (machine.get("load_average_start"), machine.get("load_average_end")) if x]
    cpus = machine.get("logical_cpus") or 1
    worst = max((x[0] for x in loads), default=0.0)
    if worst <= 0.5 * cpus:
        return []
    return [
        f"- **The machine was busy** (1-minute load up to {worst:.1f} on {cpus} CPUs): absolute latencies are inflated "
        "and multi-threaded engines suffer most; compare the ratios measured side by side, not the absolute times."
    ]


def _gflops(x) -> str:
    if x is None:
        return "–"
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _memory_table(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r.get("memory")]
    if not rows:
        return []
    first = rows[0]["memory"]
    method = first.get("method", "")
    lines = [
        "",
        "## Memory",
        "",
        "Each backend measured alone in a fresh process (" + method + "): resident memory with its libraries imported, "
        "what loading the model adds, and the peak over two inferences at each batch size (ascending).",
        "",
        "| backend | batch | libraries MB | + model MB | peak RSS MB | peak over loaded MB | GPU |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m = r["memory"]
        if "error" in m:
            lines.append(f"| {r['runner']} | {r['batch_size']} | {m['error']} | | | | |")
            continue
        gpu = m.get("gpu") or {}
        gtxt = (
            f"peak alloc {gpu['peak_allocated_mb']:.0f} MB"
            if "peak_allocated_mb" in gpu
            else (f"device used {gpu['device_used_after_mb']:.0f} MB" if "device_used_after_mb" in gpu else "–")
        )
        lines.append(
            f"| {r['runner']} | {r['batch_size']} | {m['baseline_mb']:.0f} | {m['load_mb']:.0f} | "
            f"{m['peak_rss_mb']:.0f} | {m['peak_over_loaded_mb']:.0f} | {gtxt} |"
        )
    return lines


def markdown(report: dict, plots: dict[str, str]) -> str:
    """The report as Markdown: settings, the timing table, FLOPs and peak, pipeline breakdown, profiles, plots."""
    m, s, mach = report["model"], report["settings"], report["machine"]
    lines = [
        f"# adtr-bench: {m['preset']} ({m['input_size'][0]}x{m['input_size'][1]}, {m['precision']})",
        "",
        f"- Model: `{m['path']}`; reference: {report['reference']['note']}",
        f"- Machine: {mach['cpu']}, {mach['physical_cores']} cores / {mach['logical_cpus']} logical CPUs"
        + (f", GPU: {', '.join(g['name'] for g in mach['gpus'])}" if mach["gpus"] else ", no GPU")
        + f"; load average at start {mach.get('load_average_start')}, at end {mach.get('load_average_end')}",
        "- CPU flags for inference: " + (", ".join((mach.get("cpu_info") or {}).get("flags") or []) or "unknown"),
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in mach["libraries"].items()),
        f"- Threads: {s['threads']} (PyTorch and ONNX Runtime alike); warm-up {s['warmup']} calls; at least "
        f"{s['min_iters']} timed calls and {s['min_seconds']} s per backend and batch size; backends interleaved in "
        f"blocks of about {s['block_seconds']} s, each block after one untimed call (calls longer than a quarter block: "
        "after a 20 ms pause instead)",
        f"- Input: {s['images']} ({s['num_image_files']} files)",
        f"- Run took {report['duration_s']:.0f} s",
        *_load_warning(mach),
        "",
        "## Latency and throughput",
        "",
        "Speed-up = throughput / throughput of the PyTorch eager reference measured in the same run on the same device. "
        "GFLOP/s = counted FLOPs per image x throughput; % of peak = that / the measured fp32 matmul peak. "
        "CPU ms = process CPU time per call, all threads (spin-waiting included); CPU/wall = cores kept busy on average; "
        "% of peak by CPU time = FLOPs per CPU-second against the per-thread peak (not diluted by other processes' load).",
        "",
        "| backend | batch | copies | p50 ms | p90 ms | p99 ms | images/s | speed-up | GFLOP/s | % of peak "
        "| CPU ms p50 | CPU/wall | % of peak by CPU time | n |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['runner']} | {r['batch_size']} | {r['host_device_copies']} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | "
            f"{_f(r['p99_ms'])} | {_f(r['throughput_ips'])} | "
            + (f"**{r['speedup_vs_reference']:.2f}x**" if r["speedup_vs_reference"] else "–")
            + f" | {_gflops(r.get('achieved_gflops'))} | {_pct(r.get('fraction_of_peak'))} | "
            f"{_f(r.get('cpu_p50_ms'))} | {_f(r.get('cpu_per_wall'))} | {_pct(r.get('fraction_of_peak_cpu_time'))} | "
            f"{r['count']} |"
        )
    if report["backends"]["skipped"]:
        lines += ["", "Not timed here: " + "; ".join(f"{k} ({v})" for k, v in report["backends"]["skipped"].items())]
    lines += _memory_table(report)
    agree = report.get("agreement") or {}
    if any(agree.values()):
        lines += [
            "",
            "Outputs on the timed batch against the reference (proof that every row runs the same model):",
            "",
        ]
        lines += ["| batch | backend | max abs score diff | max abs map diff |", "|---:|---|---:|---:|"]
        for bs, rows in agree.items():
            for name, a in rows.items():
                lines.append(f"| {bs} | {name} | {a['max_abs_score_diff']:.2e} | {a['max_abs_map_diff']:.2e} |")

    fl, pk = report["flops"], report["matmul_peak"]
    lines += ["", "## Compute: FLOPs and the machine's peak", ""]
    if fl.get("flops_per_image"):
        lines.append(f"- **{fl['gflops_per_image']:.3f} GFLOP per image** (multiply-adds of Conv and MatMul x 2)")
        if fl.get("torch"):
            mods = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in fl["torch"]["by_module"].items())
            lines.append(f"  - PyTorch FlopCounterMode: {fl['torch']['flops_per_image'] / 1e9:.4f} GFLOP ({mods})")
        if fl.get("onnx"):
            ops = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in fl["onnx"]["by_op"].items())
            lines.append(f"  - ONNX graph walk: {fl['onnx']['flops_per_image'] / 1e9:.4f} GFLOP ({ops})")
        if fl.get("relative_difference") is not None:
            lines.append(f"  - the two counts differ by {100 * fl['relative_difference']:.3f}%")
    b, a = pk["before"], pk["after"]
    lines.append(
        f"- fp32 matmul peak ({b['n']}x{b['n']}, best of repeated products): **{pk['peak_gflops']:.1f} GFLOP/s** "
        f"(numpy {b['numpy_gflops']:.1f} / {a['numpy_gflops']:.1f}"
        + (f", torch {b['torch_gflops']:.1f} / {a['torch_gflops']:.1f}" if "torch_gflops" in b else "")
        + " GFLOP/s before / after the timings)"
    )
    if pk.get("gpu"):
        lines.append(
            f"- GPU fp32 matmul peak ({pk['gpu']['device']}, {pk['gpu']['dtype']}): **{pk['gpu']['peak_gflops']:.0f} "
            "GFLOP/s**; GPU rows' % of peak is against it"
        )
    if fl.get("flops_per_image"):
        bound = pk["peak_gflops"] * 1e9 / fl["flops_per_image"]
        lines.append(f"- compute bound at that peak: {bound:.1f} images/s ({1e3 / bound:.2f} ms per image)")

    pipe = report.get("pipeline")
    if pipe:
        lines += [
            "",
            f"## Pipeline on {pipe['backend']}: where the end-to-end time goes",
            "",
            f"Source images {pipe['source_image_shape'][1]}x{pipe['source_image_shape'][0]}, model input "
            f"{pipe['input_shape'][1]}x{pipe['input_shape'][0]}. Stages timed one after the other (ms per image); "
            "end to end is the runtime's Pipeline (decode workers overlapping inference, results.jsonl written) "
            "against backend.run on prepared batches, interleaved (pass by pass: the paired median compares each pipeline "
            "pass with the model-only pass beside it).",
            "",
            "| batch | decode | preprocess | inference | postprocess | serial sum | pipeline img/s | model-only img/s "
            "| overhead | overhead, paired median | passes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in pipe["rows"]:
            st = row["stages"]["ms_per_image"]
            lines.append(
                f"| {row['batch_size']} | {st['decode']:.2f} | {st['preprocess']:.2f} | {st['inference']:.2f} | "
                f"{st['postprocess']:.2f} | {row['stages']['serial_ms_per_image']:.2f} | "
                f"{row['pipeline']['throughput_ips']:.2f} | {row['model_only']['throughput_ips']:.2f} | "
                f"**{100 * row['overhead']:.1f}%** | {100 * row['overhead_paired']:.1f}% | "
                f"{row['pipeline']['passes']} x {row['images_per_pass']} images |"
            )

    prof = report.get("profiles")
    if prof:
        lines += ["", "## Profiles: time per operator type", ""]
        for bs, entry in prof.items():
            for name, p in entry.items():
                total = p.get("model_run_ms") or p.get("self_cpu_ms_per_run")
                ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in p["by_op"][:8])
                lines.append(f"- batch {bs}, {name} ({p['tool']}, {total:.1f} ms per run): {ops}")

    if plots:
        lines += ["", "## Plots", ""]
        for title, fname in plots.items():
            lines.append(f"![{title}]({fname})")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, the plots and report.md; returns their paths."""
    from adtr_deploy.bench.plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out_dir)
    report["plots"] = dict(plots)
    paths = {"json": out_dir / REPORT_JSON, "md": out_dir / REPORT_MD}
    atomic_write_text(paths["json"], dumps_strict(report, indent=1, default=_jsonable) + "\n")
    atomic_write_text(paths["md"], markdown(report, plots))
    return paths
