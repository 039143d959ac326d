"""The report's pictures (matplotlib, Agg): latency distributions, throughput against batch size, the pipeline's stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_COLOR = "#7f7f7f"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
STAGE_COLORS = {"decode": "#8c9eff", "preprocess": "#80cbc4", "inference": "#ef6c00", "postprocess": "#ce93d8"}


def _horizontal() -> dict:
    """violinplot's horizontal option: `orientation` since matplotlib 3.10, `vert=False` (deprecated there) before."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _colors(names: list[str]) -> dict[str, str]:
    out, i = {}, 0
    for n in names:
        if n.startswith("pytorch-eager"):
            out[n] = REFERENCE_COLOR
        else:
            out[n] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


def _runner_order(results: list[dict]) -> list[str]:
    names = list(dict.fromkeys(r["runner"] for r in results))
    return sorted(names, key=lambda n: (not n.startswith("pytorch-eager"), n))


def latency_plot(report: dict, path: Path) -> None:
    """One panel per batch size: every backend's latency samples (dots) over their distribution (violin), p50 and p99
    marked, and the figures written at the right."""
    import matplotlib.pyplot as plt

    results = report["results"]
    sizes = report["settings"]["batch_sizes"]
    names = _runner_order(results)
    colors = _colors(names)
    fig, axes = plt.subplots(len(sizes), 1, figsize=(9, 0.6 + (0.75 * len(names) + 0.7) * len(sizes)), squeeze=False)
    for ax, bs in zip(axes[:, 0], sizes):
        rows = {r["runner"]: r for r in results if r["batch_size"] == bs}
        present = [n for n in names if n in rows]
        data = [np.asarray(rows[n]["samples_ms"]) for n in present]
        lo = min(float(d.min()) for d in data)
        hi = max(float(d.max()) for d in data)
        log = hi / max(lo, 1e-9) > 8  # very different backends: a log axis keeps every distribution readable
        ypos = np.arange(len(present))[::-1]
        parts = ax.violinplot(data, positions=ypos, widths=0.75, showextrema=False, **_horizontal())
        for body, n in zip(parts["bodies"], present):
            body.set_facecolor(colors[n])
            body.set_edgecolor(colors[n])
            body.set_alpha(0.35)
        rs = np.random.default_rng(0)
        for y, n, d in zip(ypos, present, data):
            r = rows[n]
            ax.scatter(d, y + rs.uniform(-0.15, 0.15, d.size), s=6, color=colors[n], alpha=0.7, linewidths=0)
            ax.plot([r["p50_ms"]] * 2, [y - 0.36, y + 0.36], color="black", lw=1.8)
            ax.plot([r["p99_ms"]] * 2, [y - 0.24, y + 0.24], color="black", lw=1.0, ls=":")
            text = f"p50 {r['p50_ms']:.1f}  p99 {r['p99_ms']:.1f} ms"
            if r.get("speedup_vs_reference"):
                text += f"   {r['speedup_vs_reference']:.2f}x"
            ax.text(1.01, y, text, transform=ax.get_yaxis_transform(), va="center", fontsize=8.5, color=colors[n])
        ax.set_yticks(ypos, [f"{n}  (n={rows[n]['count']})" for n in present], fontsize=8.5)
        if log:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(lo / 1.3, hi * 1.3)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            pad = 0.08 * (hi - lo) + 1e-3
            ax.set_xlim(max(0.0, lo - pad), hi + pad)
        ax.set_ylim(-0.6, len(present) - 0.4)
        ax.set_xlabel("latency per call (ms)" + (", log scale" if log else ""), fontsize=9)
        ax.set_title(f"batch {bs}", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.suptitle(
        f"Latency per call: {report['model']['preset']}, threads: {report['settings']['threads']}; "
        "solid line p50, dotted p99, speed-up vs PyTorch eager at the right",
        fontsize=10,
    )
    fig.tight_layout()
    fig.subplots_adjust(right=0.72)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_plot(report: dict, path: Path) -> None:
    """Images/s of every backend, grouped by batch size, with the compute bound (peak GFLOP/s / FLOPs per image)."""
    import matplotlib.pyplot as plt

    results = report["results"]
    names = _runner_order(results)
    colors = _colors(names)
    sizes = report["settings"]["batch_sizes"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 0.9 * len(names) * len(sizes)), 4.6))
    width = 0.8 / len(names)
    values = []
    for i, n in enumerate(names):
        rows = {r["batch_size"]: r for r in results if r["runner"] == n}
        xs = [k + (i - (len(names) - 1) / 2) * width for k, bs in enumerate(sizes) if bs in rows]
        ys = [rows[bs]["throughput_ips"] for bs in sizes if bs in rows]
        values += ys
        hatch = "//" if "resident" in n else None
        ax.bar(xs, ys, width * 0.92, color=colors[n], label=n, hatch=hatch, edgecolor="white")
        for x, bs in zip(xs, [bs for bs in sizes if bs in rows]):
            r = rows[bs]
            tag = f"{r['throughput_ips']:.1f}"
            if r.get("speedup_vs_reference"):
                tag += f"\n{r['speedup_vs_reference']:.2f}x"
            ax.annotate(
                tag,
                (x, r["throughput_ips"]),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    top = max(values)
    fl, pk = report["flops"], report["matmul_peak"]
    bound = pk["peak_gflops"] * 1e9 / fl["flops_per_image"] if fl.get("flops_per_image") else None
    log = min(values) > 0 and top / min(values) > 30
    if bound and (bound < 3 * top or log):
        ax.axhline(bound, color="black", ls="--", lw=1)
        ax.annotate(
            f"compute bound {bound:.1f} img/s ({pk['peak_gflops']:.0f} GFLOP/s matmul peak / "
            f"{fl['gflops_per_image']:.3g} GFLOP per image)",
            (0.01, bound), xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points", fontsize=8,
        )  # fmt: skip
        top = max(top, bound)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 2, top * 4)
    else:
        ax.set_ylim(0, top * 1.22)
    ax.set_xticks(range(len(sizes)), [f"batch {bs}" for bs in sizes])
    ax.set_ylabel("throughput (images/s)" + (", log scale" if log else ""))
    ax.set_title(
        f"Throughput: {report['model']['preset']} on {report['machine']['cpu']}, threads: {report['settings']['threads']}\n"
        "labels: images/s and speed-up vs PyTorch eager",
        fontsize=9.5,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pipeline_plot(report: dict, path: Path) -> None:
    """Left: ms per image of each stage (stacked). Right: pipeline vs model-only throughput with the overhead."""
    import matplotlib.pyplot as plt

    pipe = report["pipeline"]
    rows = pipe["rows"]
    labels = [f"batch {r['batch_size']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2 + 0.3 * len(rows)))
    left = np.zeros(len(rows))
    y = np.arange(len(rows))[::-1]
    totals = np.array([r["stages"]["serial_ms_per_image"] for r in rows])
    for stage, color in STAGE_COLORS.items():
        vals = np.array([r["stages"]["ms_per_image"][stage] for r in rows])
        label = f"{stage} ({' / '.join(f'{v:.3g}' for v in vals)} ms)"  # small stages are unreadable as bars
        a1.barh(y, vals, left=left, color=color, label=label, height=0.55)
        for yi, v, lft, tot in zip(y, vals, left, totals):
            if v > 0.08 * tot:
                a1.text(lft + v / 2, yi, f"{v:.1f}", ha="center", va="center", fontsize=8)
        left = left + vals
    for yi, total in zip(y, left):
        a1.text(total, yi, f" {total:.1f} ms", va="center", fontsize=8)
    a1.set_yticks(y, labels)
    a1.set_xlim(0, left.max() * 1.18)
    a1.set_xlabel("ms per image, stages run one after the other")
    a1.set_title(f"Stage breakdown on {pipe['backend']}", fontsize=10)
    a1.legend(fontsize=7.5, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.1))
    h = 0.36
    pipe_t = np.array([r["pipeline"]["throughput_ips"] for r in rows])
    model_t = np.array([r["model_only"]["throughput_ips"] for r in rows])
    a2.barh(y + h / 2, model_t, height=h, color="#ef6c00", label="model only (backend.run)")
    a2.barh(y - h / 2, pipe_t, height=h, color="#5c6bc0", label="end-to-end pipeline (files -> results.jsonl)")
    for yi, r, p in zip(y, rows, pipe_t):
        text = f" {p:.1f} img/s, overhead {100 * r['overhead']:.1f}% (paired median {100 * r['overhead_paired']:.1f}%)"
        a2.text(p, yi - h / 2, text, va="center", fontsize=8)
    a2.set_yticks(y, labels)
    a2.set_xlim(0, max(model_t.max(), pipe_t.max()) * 2.0)
    a2.set_xlabel("images/s")
    a2.set_title("Pipeline vs model-only throughput (interleaved)", fontsize=10)
    a2.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Write every plot the report has data for; returns title -> file name (relative to out_dir)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    out: dict[str, str] = {}
    latency_plot(report, out_dir / "latency.png")
    out["Latency distribution per backend"] = "latency.png"
    throughput_plot(report, out_dir / "throughput.png")
    out["Throughput vs batch size"] = "throughput.png"
    if report.get("pipeline") and report["pipeline"]["rows"]:
        pipeline_plot(report, out_dir / "pipeline.png")
        out["Pipeline stages and overhead"] = "pipeline.png"
    return out
