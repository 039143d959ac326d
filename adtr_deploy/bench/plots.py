"""The report's pictures (matplotlib, Agg): latency distributions, throughput against batch size, the pipeline's stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_COLOR = "#7f7f7f"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
STAGE_COLORS = {"decode": "#8c9eff", "preprocess": "#80cbc4", "inference": "#ef6c00", "postprocess": "#ce93d8"}


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
    """One panel per batch size: every backend's latency samples as a violin with its p50/p99 marked."""
    import matplotlib.pyplot as plt

    results = report["results"]
    sizes = report["settings"]["batch_sizes"]
    names = _runner_order(results)
    colors = _colors(names)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 0.9 + 0.75 * len(names) + 0.8), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        rows = {r["runner"]: r for r in results if r["batch_size"] == bs}
        present = [n for n in names if n in rows]
        data = [np.asarray(rows[n]["samples_ms"]) for n in present]
        ypos = np.arange(len(present))[::-1]
        parts = ax.violinplot(data, positions=ypos, vert=False, widths=0.8, showextrema=False)
        for body, n in zip(parts["bodies"], present):
            body.set_facecolor(colors[n])
            body.set_edgecolor(colors[n])
            body.set_alpha(0.45)
        for y, n, d in zip(ypos, present, data):
            r = rows[n]
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=d.size)
            ax.scatter(d, y + jitter, s=5, color=colors[n], alpha=0.6, linewidths=0)
            ax.plot([r["p50_ms"]] * 2, [y - 0.38, y + 0.38], color="black", lw=1.6)
            ax.plot([r["p99_ms"]] * 2, [y - 0.25, y + 0.25], color="black", lw=1, ls=":")
            label = f"p50 {r['p50_ms']:.1f} ms"
            if r.get("speedup_vs_reference"):
                label += f"  ({r['speedup_vs_reference']:.2f}x)"
            ax.annotate(
                label,
                (r["p50_ms"], y + 0.42),
                fontsize=8,
                ha="center",
                va="bottom",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        ax.set_yticks(ypos, [f"{n}\n(n={rows[n]['count']})" for n in present], fontsize=8)
        lo = min(float(d.min()) for d in data)
        hi = max(float(d.max()) for d in data)
        ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo)), hi + 0.1 * (hi - lo))
        ax.set_ylim(-0.6, len(present) - 0.2)
        ax.set_xlabel("latency per call (ms)")
        ax.set_title(f"batch {bs}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Latency per call ({report['model']['preset']}, {report['settings']['threads']} threads); "
        "solid line p50, dotted p99, (x) speed-up vs PyTorch eager",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_plot(report: dict, path: Path) -> None:
    """Images/s against batch size for every backend, with the compute bound (peak GFLOP/s / FLOPs per image)."""
    import matplotlib.pyplot as plt

    results = report["results"]
    names = _runner_order(results)
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    top = 0.0
    for n in names:
        rows = sorted((r for r in results if r["runner"] == n), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        y = [r["throughput_ips"] for r in rows]
        top = max(top, *y)
        ls = "--" if "resident" in n else "-"
        ax.plot(x, y, ls, marker="o", color=colors[n], label=n, lw=2 if not n.startswith("pytorch") else 1.6)
        for xi, yi, r in zip(x, y, rows):
            tag = f"{yi:.1f}" + (f"\n{r['speedup_vs_reference']:.2f}x" if r.get("speedup_vs_reference") else "")
            ax.annotate(tag, (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8, color=colors[n])
    fl, pk = report["flops"], report["matmul_peak"]
    if fl.get("flops_per_image"):
        bound = pk["peak_gflops"] * 1e9 / fl["flops_per_image"]
        ax.axhline(bound, color="black", ls=":", lw=1)
        ax.annotate(
            f"compute bound: {pk['peak_gflops']:.0f} GFLOP/s matmul peak / {fl['gflops_per_image']:.2f} GFLOP per image",
            (0.01, bound),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
        top = max(top, bound)
    sizes = report["settings"]["batch_sizes"]
    if len(sizes) > 1 and max(sizes) / min(sizes) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(0, top * 1.2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(f"Throughput vs batch size ({report['model']['preset']}, {report['machine']['cpu']})", fontsize=10)
    ax.grid(alpha=0.3)
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
    for stage, color in STAGE_COLORS.items():
        vals = np.array([r["stages"]["ms_per_image"][stage] for r in rows])
        a1.barh(y, vals, left=left, color=color, label=stage, height=0.55)
        for yi, v, lft in zip(y, vals, left):
            if v > 0.06 * (left + vals).max():
                a1.text(lft + v / 2, yi, f"{v:.1f}", ha="center", va="center", fontsize=8)
        left = left + vals
    for yi, total in zip(y, left):
        a1.text(total, yi, f" {total:.1f} ms", va="center", fontsize=8)
    a1.set_yticks(y, labels)
    a1.set_xlim(0, left.max() * 1.18)
    a1.set_xlabel("ms per image, stages run one after the other")
    a1.set_title(f"Stage breakdown on {pipe['backend']}", fontsize=10)
    a1.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.1))
    h = 0.36
    pipe_t = np.array([r["pipeline"]["throughput_ips"] for r in rows])
    model_t = np.array([r["model_only"]["throughput_ips"] for r in rows])
    a2.barh(y + h / 2, model_t, height=h, color="#ef6c00", label="model only (backend.run)")
    a2.barh(y - h / 2, pipe_t, height=h, color="#5c6bc0", label="end-to-end pipeline (files -> results.jsonl)")
    for yi, r, p in zip(y, rows, pipe_t):
        a2.text(p, yi - h / 2, f" {p:.1f} img/s, overhead {100 * r['overhead']:.1f}%", va="center", fontsize=8)
    a2.set_yticks(y, labels)
    a2.set_xlim(0, max(model_t.max(), pipe_t.max()) * 1.6)
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
