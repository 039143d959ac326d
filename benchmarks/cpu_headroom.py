"""How much FP32 speed is left on this CPU for the transformer, and what a fused attention kernel would give.

    python benchmarks/cpu_headroom.py [--model EXPORT/model.onnx] [--threads 2]

Three measurements, each in one process with interleaved blocks (adtr_deploy.bench.timing):

1. The dense FP32 matrix-multiply peak of this machine (the 1024x1024 product adtr-bench also measures), and ONNX
   Runtime's products at the transformer's own shapes (196 tokens, the feed-forward blocks' 256 -> 1024 -> 256, 2/3 of
   the transformer's product FLOPs; 8 products chained so per-call overhead does not count) in FP32, spinning off and
   on, and quantized as our INT8 exports are (static QDQ, per-channel weights) and with dynamic activation scales:
   GFLOP/s, fraction of the peak, INT8 against FP32.
2. The attention core (softmax(q k^T) v over 8 heads, no projections) as our exported graph writes it with standard
   ONNX ops (Reshape/Transpose/MatMul/Softmax) against ONNX Runtime's fused contrib kernel
   `com.microsoft.MultiHeadAttention`, 12 blocks in a chain (the default model has 4 encoder self-attentions and
   4 + 4 decoder self/cross-attentions), batch 1 and 8, thread spinning off and on; max |diff| between the two.
3. With --model: ONNX Runtime's per-operator profile of that export (batch 1 and 8), so the shares above can be read
   against the whole model.

Writes benchmarks/results/cpu_headroom.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from adtr_deploy.bench.studies import command_line, machine, write_result

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS, D_MODEL, HEADS, FFN, BLOCKS = 196, 256, 8, 1024, 12


def _session(model_bytes: bytes, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, inits=()) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return model.SerializeToString()


def ffn_chain(layers: int = 4) -> bytes:
    """x (B, 196, 256) through `layers` feed-forward blocks' two products (256 -> 1024 -> 256, weights constant as in
    the exported model; no bias or activation, so only the products are timed): 2 * layers MatMuls per run."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, (k, n) in enumerate(((D_MODEL, FFN), (FFN, D_MODEL))):
            w = f"w{i}_{j}"
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"y{i}_{j}"]))
            x = f"y{i}_{j}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", TOKENS, D_MODEL]) for n in ("x", x)]
    return _model(nodes, io[:1], io[1:], inits)


def attention_graph(kind: str) -> bytes:
    """BLOCKS chained attention cores on x (B, 196, 256) as q = k = v: 'standard' ops or the 'contrib' kernel."""
    from onnx import TensorProto, helper, numpy_helper

    dh = D_MODEL // HEADS
    inits = [
        numpy_helper.from_array(np.array([0, 0, HEADS, dh], np.int64), "heads"),
        numpy_helper.from_array(np.array([0, 0, D_MODEL], np.int64), "merged"),
    ]
    nodes, x = [], "x"
    for i in range(BLOCKS):
        if kind == "contrib":  # scale 1: our exports fold the 1/sqrt(dh) into the query weights
            nodes.append(
                helper.make_node(
                    "MultiHeadAttention", [x, x, x], [f"o{i}"], domain="com.microsoft", num_heads=HEADS, scale=1.0
                )
            )
        else:  # what torch's exporter writes for softmax(q @ k.transpose(-2, -1)) @ v over heads
            for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
                nodes.append(helper.make_node("Reshape", [x, "heads"], [f"{name}r{i}"]))
                nodes.append(helper.make_node("Transpose", [f"{name}r{i}"], [f"{name}t{i}"], perm=perm))
            nodes += [
                helper.make_node("MatMul", [f"qt{i}", f"kt{i}"], [f"s{i}"]),
                helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
                helper.make_node("MatMul", [f"p{i}", f"vt{i}"], [f"c{i}"]),
                helper.make_node("Transpose", [f"c{i}"], [f"ct{i}"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [f"ct{i}", "merged"], [f"o{i}"]),
            ]
        x = f"o{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", TOKENS, D_MODEL]) for n in ("x", x)]
    return _model(nodes, io[:1], io[1:], inits if kind != "contrib" else [])


def time_calls(calls: dict, seconds: float) -> dict[str, float]:
    """name -> median seconds per call, interleaved blocks."""
    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved

    samples = measure_interleaved(calls, TimingPlan(warmup=3, min_iters=10, min_seconds=seconds, block_seconds=0.3))
    return {k: float(np.median(v)) for k, v in samples.items()}


def int8_graphs(fp32: bytes, batch: int) -> dict[str, bytes]:
    """The chain quantized as our INT8 exports are (QDQ, per-channel int8 weights, u8 activations with static scales
    calibrated on random tokens: the speed does not depend on the values) and with dynamic activation scales."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Tokens(CalibrationDataReader):
        def __init__(self):
            self.left = [{"x": np.random.default_rng(i).standard_normal((batch, TOKENS, D_MODEL)).astype(np.float32)}
                         for i in range(4)]  # fmt: skip

        def get_next(self):
            return self.left.pop() if self.left else None

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(fp32)
        static, dynamic = Path(tmp) / "static.onnx", Path(tmp) / "dynamic.onnx"
        quantize_static(str(src), str(static), Tokens(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        quantize_dynamic(str(src), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
        out["INT8 static QDQ (as our exports)"] = static.read_bytes()
        out["INT8 dynamic activations"] = dynamic.read_bytes()
    return out


def gemm_rows(threads: int, seconds: float, peak: float) -> list[dict]:
    """The feed-forward products (2/3 of the transformer's product FLOPs) in FP32 and INT8: GFLOP/s and of the peak."""
    layers = 4
    fp32 = ffn_chain(layers)
    flops_per_image = layers * 2 * (2 * TOKENS * D_MODEL * FFN)
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(1).standard_normal((batch, TOKENS, D_MODEL)).astype(np.float32)
        variants = [(f"FP32, spinning {'on' if spin else 'off'}", fp32, spin) for spin in (False, True)]
        variants += [(f"{label}, spinning off", model, False) for label, model in int8_graphs(fp32, batch).items()]
        calls = {}
        for name, model, spin in variants:
            sess = _session(model, threads, spin)
            calls[name] = lambda s=sess, x=x: s.run(None, {"x": x})
        times = time_calls(calls, seconds)
        for name, sec in times.items():
            gflops = batch * flops_per_image / sec / 1e9
            rows.append({
                "product": f"{2 * layers} FFN products, {name}",
                "batch": batch,
                "ms": sec * 1e3,
                "gflops": gflops,
                "of_peak": gflops / peak,
                "speedup_vs_fp32": times["FP32, spinning off"] / sec,
            })  # fmt: skip
    return rows


def attention_rows(threads: int, seconds: float) -> list[dict]:
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(2).standard_normal((batch, TOKENS, D_MODEL)).astype(np.float32) * 0.5
        calls, outs = {}, {}
        for kind in ("standard", "contrib"):
            for spin in (False, True):
                sess = _session(attention_graph(kind), threads, spin)
                name = f"{kind}, spinning {'on' if spin else 'off'}"
                calls[name] = lambda s=sess, x=x: s.run(None, {"x": x})
                outs[kind] = sess.run(None, {"x": x})[0]
        diff = float(np.abs(outs["standard"] - outs["contrib"]).max() / np.abs(outs["standard"]).max())
        times = time_calls(calls, seconds)
        for name, sec in times.items():
            twin = times[name.replace("contrib", "standard")]
            rows.append({
                "variant": name,
                "batch": batch,
                "ms": sec * 1e3,
                "ms_per_block": sec * 1e3 / BLOCKS,
                "speedup_vs_standard": twin / sec,
                "max_rel_diff": diff,
            })  # fmt: skip
    return rows


def profile_rows(model: Path, threads: int, out_dir: Path) -> list[dict]:
    from adtr_deploy.bench.profile import profile_onnxruntime

    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(3).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
        prof = profile_onnxruntime(model, x, threads, out_dir, runs=5)
        for op in prof["by_op"]:
            rows.append({"batch": batch, "op": op["op"], "ms_per_run": op["ms_per_run"], "share": op["share"]})
    return rows


def markdown(r: dict) -> str:
    peak = r["peak"]
    lines = [
        "# FP32 headroom on this CPU: the products' distance from the peak, and a fused attention kernel",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}; {r['threads']} threads; load average "
        f"{r['load'][0]:.1f} at start, {r['load'][1]:.1f} at end. Dense FP32 matmul peak (1024x1024, best of numpy "
        f"and torch, measured here): **{peak:.0f} GFLOP/s**.",
        "",
        "## ONNX Runtime's products at the transformer's shapes (196 tokens, 256 -> 1024 -> 256), FP32 and INT8",
        "",
        "| products | batch | ms | GFLOP/s (INT8: same FLOP count) | of the FP32 peak | vs FP32 spinning off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for g in r["gemm"]:
        lines.append(
            f"| {g['product']} | {g['batch']} | {g['ms']:.3f} | {g['gflops']:.0f} | {100 * g['of_peak']:.0f}% | "
            f"{g['speedup_vs_fp32']:.2f}x |"
        )
    lines += [
        "",
        f"## Attention core, {BLOCKS} blocks chained (8 heads, 196 tokens, d 256): standard ops vs com.microsoft.MultiHeadAttention",
        "",
        "| variant | batch | ms | ms per block | speed-up vs standard ops (same spinning) | max rel. diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in r["attention"]:
        lines.append(
            f"| {a['variant']} | {a['batch']} | {a['ms']:.2f} | {a['ms_per_block']:.3f} | "
            f"{a['speedup_vs_standard']:.2f}x | {a['max_rel_diff']:.1e} |"
        )
    if r["profile"]:
        lines += ["", f"## Where the time goes in {r['model']} (ONNX Runtime profiler, spinning on)", ""]
        lines += ["| batch | op | ms per run | share |", "|---:|---|---:|---:|"]
        lines += [
            f"| {p['batch']} | {p['op']} | {p['ms_per_run']:.2f} | {100 * p['share']:.1f}% |" for p in r["profile"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="an exported model.onnx to profile by operator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per variant")
    parser.add_argument("--out", default=str(RESULTS / "cpu_headroom.json"))
    args = parser.parse_args(argv)

    from adtr_deploy.bench.timing import matmul_peak

    load0 = os.getloadavg()[0]
    peak = matmul_peak(2.0, threads=args.threads)["peak_gflops"]
    result = {
        "command": command_line("cpu_headroom.py", argv),
        "machine": machine(),
        "threads": args.threads,
        "peak": peak,
        "gemm": gemm_rows(args.threads, args.seconds, peak),
        "attention": attention_rows(args.threads, args.seconds),
        "model": args.model,
        "profile": profile_rows(Path(args.model), args.threads, Path(args.out).parent / "cpu_headroom_profiles")
        if args.model
        else [],
    }
    result["load"] = [load0, os.getloadavg()[0]]
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
