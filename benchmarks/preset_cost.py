"""What each model preset costs in ONNX Runtime on this CPU, measured side by side in one process.

Every preset is exported with the project's own ONNX exporter (the same fused graph `adtr-export --format onnx` writes; the
transformer's weights do not change its cost, so fresh weights are used) and timed with adtr-bench's interleaved blocks
(`bench.timing.measure_interleaved`: alternating blocks, spinning off), at batch 1 and 8. The table reports wall-clock
and process CPU milliseconds per image and both as ratios to the previous default (`lite0-classic`); CPU time does not
grow while other processes hold the cores, so it is the steadier figure on a shared machine.

    python benchmarks/preset_cost.py --presets lite0-classic,lite0 --threads 2
    python benchmarks/preset_cost.py --presets lite0,lite0+d_model=128+dim_feedforward=512 --out results/transformer_size_cost.json

Writes benchmarks/results/preset_cost.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from adtr_deploy.bench.studies import command_line, machine, write_result

HERE = Path(__file__).resolve().parent


def parse_preset(text: str) -> tuple[str, dict]:
    """PRESET or PRESET+key=value+... with integer model overrides, e.g. lite0+d_model=128+dim_feedforward=512."""
    name, *extra = text.split("+")
    return name, {k: int(v) for k, v in (item.split("=", 1) for item in extra)}


def session(preset: str, overrides: dict, threads: int):
    import onnxruntime as ort
    import torch

    from adtr_deploy.export.fuse import fuse_model
    from adtr_deploy.export.onnx import torch_to_onnx
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.spec import ModelSpec

    torch.manual_seed(0)
    model = ADTR(get_preset(preset, **overrides)).eval()
    fused, _ = fuse_model(model)  # what adtr-export writes by default
    proto = torch_to_onnx(fused, ModelSpec(input_size=model.cfg.input_size, preset=preset))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, model.cfg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="lite0-classic,lite0")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="minimum timed seconds per preset and batch size")
    ap.add_argument("--out", default=str(HERE / "results" / "preset_cost.json"))
    args = ap.parse_args(argv)

    import numpy as np

    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved

    presets = [p for p in args.presets.split(",") if p]
    sessions = {p: session(*parse_preset(p), args.threads) for p in presets}
    result = {"command": command_line("preset_cost.py", argv), "threads": args.threads, "rows": []}
    rng = np.random.default_rng(0)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        calls = {}
        for p, (sess, cfg) in sessions.items():
            x = rng.integers(0, 256, (bs, *cfg.input_size, 3), dtype=np.uint8)
            calls[p] = lambda sess=sess, x=x: sess.run(None, {"image": x})
        cpu: dict[str, list[float]] = {}
        wall = measure_interleaved(calls, TimingPlan(min_iters=10, min_seconds=args.seconds), cpu)
        base = presets[0]
        ref_wall, ref_cpu = statistics.median(wall[base]), statistics.median(cpu[base])
        for p in presets:
            w, c = statistics.median(wall[p]), statistics.median(cpu[p])
            result["rows"].append(
                {
                    "preset": p,
                    "batch": bs,
                    "wall_ms_per_image": round(1000 * w / bs, 2),
                    "cpu_ms_per_image": round(1000 * c / bs, 2),
                    "wall_ratio": round(w / ref_wall, 3),
                    "cpu_ratio": round(c / ref_cpu, 3),
                    "calls": len(wall[p]),
                }
            )
    result["machine"] = machine()
    return write_result(result, args.out, markdown)


def markdown(r: dict) -> str:
    lines = [
        "# ONNX Runtime cost per preset (CPU, one process, interleaved)",
        "",
        f"Reproduce: `{r['command']}` ({r['threads']} threads, {r['machine']['cpus']} CPUs, load "
        f"{r['machine']['loadavg_1m_at_end']:.1f} at the end). Ratios are to the first preset in the same run.",
        "",
        "| preset | batch | wall ms/image | CPU ms/image | wall ratio | CPU ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['preset']} | {row['batch']} | {row['wall_ms_per_image']} | {row['cpu_ms_per_image']} "
            f"| {row['wall_ratio']:.2f} | {row['cpu_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
