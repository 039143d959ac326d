"""The GPU check: eager vs TorchScript vs .pt2 on CUDA, FP32 and FP16, batch 1/8/32, parity; AMP training steps.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check [--device cuda] [--dry-run]

Run by benchmarks/gpu_check.sh (which adds adtr-bench's GPU rows). Needs CUDA PyTorch only: no TensorRT, no
onnxruntime-gpu, no network. Models are made on the fly: lite0 with the backbone weights that ship on PyPI and a
transformer trained for a few AMP epochs on the built-in demo data (`adtr data demo`), so nothing large is copied.

`--device cpu --dry-run` runs every step of the script on the CPU with the tiny preset, batch sizes 1 and 2 and short
timings: it proves the script's Python end to end, it measures nothing about GPUs.

Each cell is (format, precision, batch): median latency of interleaved blocks (adtr_deploy.bench.timing), images/s,
and parity with the FP32 eager model on the same real images (max |diff| of map and score over the map range; FP16
rows also give the map correlation). FP16 is torch.autocast(float16) around the model (eager), traced under it
(TorchScript), or exported under it (.pt2); LayerNorm, softmax and reductions stay FP32 by autocast's own rules.
A cell that fails records its error and the check goes on. Writes gpu_check.json and gpu_check.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        env.update(
            cuda=torch.version.cuda,
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def make_data(out: Path, dry: bool) -> Path:
    from adtr_deploy.data.demo import write_demo_dataset

    root = out / "demo"
    if not (root / "brick").is_dir():  # the dry run: a smaller set, same layout
        sizes = {"num_train": 16, "num_test_good": 4, "num_per_defect": 2} if dry else {}
        write_demo_dataset(root, categories=("brick",), **sizes)
    return root


def train_checkpoint(data: Path, out: Path, device: str, dry: bool, amp: bool, epochs: int) -> tuple[Path, dict]:
    """A few epochs of adtr-train's own trainer; returns (checkpoint, the epoch log)."""
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.train.trainer import TrainConfig, train

    preset = "tiny" if dry else "lite0"
    cfg = TrainConfig(epochs=epochs, device=device, amp=amp, progress=False)
    run = out / f"run_{preset}_{'amp' if amp else 'fp32'}"
    ckpt = train(get_preset(preset), cfg, open_dataset(data, "brick"), run, evaluate=not dry)
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    epochs_log = [r for r in records if "images_per_s" in r]
    return ckpt, {
        "preset": preset,
        "amp": amp,
        "epochs": epochs_log,
        "loss_finite": all(np.isfinite(r.get("loss", 0.0)) for r in epochs_log),
        "images_per_s_last": epochs_log[-1]["images_per_s"] if epochs_log else None,
    }


def load_images(data: Path, size: tuple[int, int], n: int) -> np.ndarray:
    from adtr_deploy.preprocess import load_image

    files = sorted((data / "brick" / "test").rglob("*.png"))
    idx = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    imgs = np.stack([load_image(files[i], size) for i in idx])
    return np.resize(imgs, (n, *imgs.shape[1:]))


def build_modules(ckpt: Path, device: str, out: Path, batch_max: int) -> dict:
    """(format, precision) -> a callable torch module on `device` taking uint8 (N, H, W, 3)."""
    import torch

    from adtr_deploy.export.fuse import fuse_model
    from adtr_deploy.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    model = model.to(device).eval()
    h, w = model.cfg.input_size
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, device=device)
    autocast = device.startswith("cuda")
    mods: dict = {}

    def amp_ctx():
        return torch.autocast("cuda", dtype=torch.float16) if autocast else torch.autocast("cpu", dtype=torch.bfloat16)

    class Amp(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with amp_ctx():
                return self.inner(x)

    fused, _ = fuse_model(model)
    for prec in ("fp32", "fp16"):
        wrap = (lambda m: m) if prec == "fp32" else Amp
        mods[("eager", prec)] = wrap(model)
        mods[("eager fused", prec)] = wrap(fused)
        with torch.no_grad(), contextlib.suppress(Exception):  # a failed trace is recorded below as missing
            mods[("torchscript", prec)] = torch.jit.trace(wrap(model).eval(), (example,), check_trace=False)
        try:
            path = out / f"model_{prec}.pt2"
            t0 = time.perf_counter()
            with torch.no_grad():
                batch = torch.export.Dim("batch", min=1, max=batch_max)
                program = torch.export.export(wrap(fused).eval(), (example,), dynamic_shapes=({0: batch},))
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            mods[("pt2", prec)] = torch._inductor.aoti_load_package(str(path))
            log(f"pt2 {prec} compiled in {time.perf_counter() - t0:.0f} s")
        except Exception as exc:
            mods[("pt2", prec)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return {"model": model, "mods": mods}


def time_cells(built: dict, images: np.ndarray, device: str, batch_sizes: list[int], seconds: float) -> list[dict]:
    import torch

    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize
    from adtr_deploy.export.verify import _pearson

    model, mods = built["model"], built["mods"]
    rows = []
    for bs in batch_sizes:
        x = torch.from_numpy(np.ascontiguousarray(images[:bs])).to(device)
        with torch.no_grad():
            ref_map, ref_score = (t.float().cpu().numpy() for t in model(x))
        span = float(ref_map.max() - ref_map.min()) or 1.0
        calls, parity = {}, {}
        for (fmt, prec), mod in mods.items():
            name = f"{fmt} {prec}"
            if isinstance(mod, str):
                rows.append({"cell": name, "batch": bs, "error": mod})
                continue

            def call(mod=mod, x=x):
                with torch.inference_mode():
                    out = mod(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return out

            try:
                amap, score = (t.float().cpu().numpy() for t in call())
            except Exception as exc:
                rows.append({"cell": name, "batch": bs, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            diff = max(np.abs(amap - ref_map).max(), np.abs(score - ref_score).max())
            parity[name] = {"max_rel": float(diff / span), "map_correlation": _pearson(amap, ref_map)}
            calls[name] = call
        log(f"batch {bs}: timing {len(calls)} cells interleaved")
        samples = measure_interleaved(calls, TimingPlan(warmup=3, min_iters=5, min_seconds=seconds))
        base = summarize(samples["eager fp32"], bs)["throughput_ips"] if "eager fp32" in samples else None
        for name, s in samples.items():
            st = summarize(s, bs)
            rows.append({
                "cell": name,
                "batch": bs,
                "p50_ms": st["p50_ms"],
                "ips": st["throughput_ips"],
                "vs_eager_fp32": st["throughput_ips"] / base if base else None,
                **parity[name],
                "n": st["count"],
            })  # fmt: skip
            log(f"  {name:<22} bs {bs:<3} p50 {st['p50_ms']:8.2f} ms  parity {parity[name]['max_rel']:.1e}")
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# GPU check"
        + (" (DRY RUN on the CPU: proves the script, measures nothing about GPUs)" if result["dry_run"] else ""),
        "",
        f"`{result['command']}`",
        "",
        f"Environment: {json.dumps(env)}",
        "",
        "| cell | batch | p50 ms | img/s | vs eager fp32 | parity (max diff / map range) | map correlation | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["inference"]:
        if "error" in r:
            lines.append(f"| {r['cell']} | {r['batch']} | failed: {r['error']} | | | | | |")
            continue
        corr = r.get("map_correlation")
        lines.append(
            f"| {r['cell']} | {r['batch']} | {r['p50_ms']:.2f} | {r['ips']:.1f} | {r['vs_eager_fp32'] or 0:.2f}x | "
            f"{r['max_rel']:.1e} | {'n/a' if corr is None else f'{corr:.5f}'} | {r['n']} |"
        )
    lines += ["", "## Training steps (adtr-train's trainer on the demo's brick)", ""]
    for t in result["training"]:
        if "error" in t:
            lines.append(f"- amp={t['amp']}: failed: {t['error']}")
            continue
        lines.append(
            f"- {t['preset']}, amp={t['amp']}: {len(t['epochs'])} epochs, last {t['images_per_s_last']} images/s, "
            f"losses {[round(e['loss'], 4) for e in t['epochs']]} (finite: {t['loss_finite']})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, batch 1 and 2, short timings")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per cell and batch")
    args = parser.parse_args(argv)
    import torch

    from adtr_deploy.fileio import atomic_write_text, write_json_atomic

    device = "cuda:0" if args.device == "cuda" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU; run it on the GPU machine, or use --device cpu --dry-run")
    dry = args.dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    data = make_data(work, dry)
    training = []
    ckpt = None
    for amp in (True, False):  # AMP (the trainer's CUDA default) and FP32 training steps, same data and seed
        log(f"training steps, amp={amp}")
        try:
            path, record = train_checkpoint(data, work, device.split(":")[0], dry, amp, epochs=1 if dry else 3)
            training.append(record)
            ckpt = ckpt or path
        except Exception as exc:
            training.append({"amp": amp, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            traceback.print_exc()
    if ckpt is None:
        sys.exit("gpu_check: training failed, so there is no model to time (see the errors above)")
    batch_sizes = [1, 2] if dry else [1, 8, 32]
    built = build_modules(ckpt, device, work, max(batch_sizes))
    images = load_images(data, built["model"].cfg.input_size, max(batch_sizes))
    seconds = args.seconds if args.seconds is not None else (0.5 if dry else 3.0)
    result = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dry_run": dry,
        "environment": environment(device),
        "loadavg_1m_at_end": None,
        "training": training,
        "inference": time_cells(built, images, device, batch_sizes, seconds),
        "checkpoint": str(ckpt),
    }
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    write_json_atomic(result, out / "gpu_check.json")
    atomic_write_text(out / "gpu_check.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
