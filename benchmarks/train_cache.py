"""Per-epoch training time with the backbone-feature cache vs without it, measured side by side in one run.

The backbone is frozen and training uses no augmentation, so adtr-train computes each image's features once and trains the
transformer on the cached tensor. This script times the trainer's own step function both ways on the same images,
alternating cached and uncached epochs so that load from other processes hits both alike, and reports wall and CPU time
per epoch, their ratio, and the one-time cost of filling the cache.

    python benchmarks/train_cache.py                         # demo data (written to a temp folder), brick, lite0
    python benchmarks/train_cache.py --data ROOT --category NAME --preset lite0 --epochs 3

Writes benchmarks/results/train_cache.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import command_line, machine, write_result

HERE = Path(__file__).resolve().parent


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(preset: str, samples, args, torch) -> dict:
    """Time cached and uncached epochs of one preset, alternated."""
    from adtr_deploy.data.datasets import image_loader
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import cache_features
    from adtr_deploy.train.loop import epoch_order, train_step
    from adtr_deploy.train.losses import get_loss

    cfg = TrainConfig(batch_size=args.batch_size, progress=False)
    torch.manual_seed(0)
    model_cfg = get_preset(preset)
    weights = "pretrained" if model_cfg.pretrained else "random"
    if preset == "paper" and model_cfg.weights is None:
        # No B4 weights ship on PyPI; the timing does not depend on the weights' values.
        model_cfg, weights = model_cfg.replace(pretrained=False), "random (timing only)"
    model = ADTR(model_cfg)
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss_fn = get_loss("adtr")

    cache, fill_wall, fill_cpu = timed(lambda: cache_features(model, samples, cfg, device, progress=False))

    def epoch(cached: bool, e: int) -> None:
        model.train()
        order = epoch_order(len(samples), 0, e)
        if cached:
            batches = ({"index": i, "features": cache[i]} for i in order.split(cfg.batch_size))
        else:
            batches = image_loader(samples, model.cfg.input_size, batch_size=cfg.batch_size, order=order)
        for batch in batches:
            train_step(model, batch, loss_fn, opt, scaler, params, cfg, device, False)

    epoch(True, 0)  # warm-up of both paths (allocator, kernels), not timed
    epoch(False, 0)
    times = {"cached": [], "uncached": []}
    for e in range(1, args.epochs + 1):
        for mode in ("cached", "uncached"):
            _, w, c = timed(lambda mode=mode, e=e: epoch(mode == "cached", e))
            times[mode].append({"wall_s": w, "cpu_s": c})

    def med(mode: str, key: str) -> float:
        return statistics.median(t[key] for t in times[mode])

    return {
        "preset": preset,
        "backbone": model_cfg.backbone,
        "weights": weights,
        "channels": model.channels,
        "input_size": list(model.cfg.input_size),
        "cache_fill": {"wall_s": fill_wall, "cpu_s": fill_cpu, "mib": cache.numel() * cache.element_size() / 2**20},
        "epochs": times,
        "median_epoch": {m: {"wall_s": med(m, "wall_s"), "cpu_s": med(m, "cpu_s")} for m in times},
        "speedup_wall": med("uncached", "wall_s") / med("cached", "wall_s"),
        "speedup_cpu": med("uncached", "cpu_s") / med("cached", "cpu_s"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="MVTec-layout root (default: the demo data in a temp folder)")
    ap.add_argument("--category", default="brick")
    ap.add_argument("--presets", default="lite0,paper", help="comma-separated presets (paper: random B4 weights)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per mode")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "train_cache.json"))
    args = ap.parse_args(argv)

    import torch

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.trainer import split_validation

    data_root = args.data
    if data_root is None:
        from adtr_deploy.data.demo import write_demo_dataset

        data_root = write_demo_dataset(Path(tempfile.gettempdir()) / "adtr_demo_data", (args.category,))
    data = open_dataset(data_root, args.category)
    train_idx, _ = split_validation(data.train, TrainConfig())
    samples = [data.train[i] for i in train_idx]
    runs = []
    for preset in args.presets.split(","):
        runs.append(measure(preset, samples, args, torch))
        print(json.dumps({k: runs[-1][k] for k in ("preset", "median_epoch", "speedup_cpu")}), flush=True)
    result = {
        "command": command_line("train_cache.py", argv),
        "category": data.category,
        "train_images": len(samples),
        "batch_size": args.batch_size,
        "epochs_per_mode": args.epochs,
        "runs": runs,
        "machine": machine(torch_threads=torch.get_num_threads(), torch=torch.__version__),
    }
    return write_result(result, args.out, markdown)


def markdown(r: dict) -> str:
    lines = [
        "# Training epoch time with and without the backbone-feature cache",
        "",
        f"Command: `{r['command'].strip()}`",
        "",
        f"{r['train_images']} training images of the demo category {r['category']}, batch {r['batch_size']}, "
        f"{r['epochs_per_mode']} timed epochs per mode, cached and uncached epochs alternated so that other load hits "
        "both alike. CPU seconds are the process's user+system time, far less sensitive to other processes than wall "
        "time on this shared machine; the CPU ratio is the figure to quote.",
        "",
        "| preset | backbone (weights) | channels | input | cached epoch: wall s / CPU s | --no-cache epoch: wall s / CPU s "
        "| speed-up wall | **speed-up CPU** | cache fill once: CPU s, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        m, fill = run["median_epoch"], run["cache_fill"]
        lines.append(
            f"| {run['preset']} | {run['backbone']} ({run['weights']}) | {run['channels']} | "
            f"{run['input_size'][0]}x{run['input_size'][1]} | {m['cached']['wall_s']:.1f} / {m['cached']['cpu_s']:.1f} | "
            f"{m['uncached']['wall_s']:.1f} / {m['uncached']['cpu_s']:.1f} | {run['speedup_wall']:.2f}x | "
            f"**{run['speedup_cpu']:.2f}x** | {fill['cpu_s']:.1f}, {fill['mib']:.1f} |"
        )
    mach = r["machine"]
    busy = (
        "other jobs were running"
        if mach["loadavg_1m_at_end"] > mach["torch_threads"] + 0.5
        else "about this run's own threads: a quiet machine"
    )
    lines += [
        "",
        f"Machine: {mach['cpus']} CPUs, {mach['torch_threads']} torch threads, load average "
        f"{mach['loadavg_1m_at_end']:.1f} at the end ({busy}), torch {mach['torch']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
