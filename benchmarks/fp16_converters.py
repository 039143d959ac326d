"""FP16 ONNX: our converter (adtr_deploy/export/fp16.py) against ONNX Runtime's own (onnxruntime.transformers.float16).

    python benchmarks/fp16_converters.py --checkpoint RUN_DIR [--out benchmarks/results/fp16_converters.json]

Both convert the same exported (fused) FP32 graph and keep the SAME nodes in FP32 (ONNX Runtime's converter gets our
`fp32_node_names` as its node_block_list, plus its own default op block list), so what differs is only how each
converter does the job: where it puts the Casts, which tensors it rounds, whether the result is a valid graph. Both are
compared with the PyTorch FP32 model on the checkpoint's verification images (max |diff| over the map range, map
correlation, decisions), and their Cast counts, sizes and CPU timings are recorded. On this CPU ONNX Runtime runs FP16
nodes without CPU kernels in FP32 behind casts, so the timing says what the casts cost here, not what a GPU gains.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import command_line, machine, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def ort_float16(model, block: set[str]):
    """onnxruntime.transformers.float16 with our FP32 node set as its node_block_list; uint8 in, float32 out kept."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=sorted(block),
        disable_shape_infer=False,
    )


def evaluate(path: Path, images: np.ndarray, ref: tuple[np.ndarray, np.ndarray], threshold: float) -> dict:
    import onnxruntime as ort

    from adtr_deploy.export.verify import _pearson

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    amap, score = sess.run(["anomaly_map", "score"], {"image": images})
    span = float(ref[0].max() - ref[0].min())
    return {
        "map_max_rel": float(np.abs(amap - ref[0]).max() / span),
        "score_max_rel": float(np.abs(score - ref[1]).max() / span),
        "map_correlation": _pearson(amap, ref[0]),
        "min_image_map_correlation": min(_pearson(a, b) or 1.0 for a, b in zip(amap, ref[0])),
        "decisions_agree": float(np.mean((score > threshold) == (ref[1] > threshold))),
    }


def markdown(result: dict) -> str:
    lines = [
        "# FP16 ONNX: our converter vs ONNX Runtime's float16 converter (same FP32 node set)",
        "",
        f"Reproduce: `{result['command']}`",
        "",
        f"Images: {result['images']}; load average {result['machine']['loadavg_1m_at_end']:.1f} (shared 2-core CPU).",
        "",
        "| converter | valid (onnx.checker, strict shapes) | Casts | FP32 nodes | size MB | map max diff / range | "
        "map corr. (min per image) | decisions agree | CPU p50 ms, batch 8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["converters"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['valid']} | {r['casts']} | {r['fp32_nodes']} | {r['size_mb']:.1f} | {r['map_max_rel']:.1e} "
            f"| {r['map_correlation']:.6f} ({r['min_image_map_correlation']:.6f}) | {100 * r['decisions_agree']:.0f}% "
            f"| {r.get('p50_ms', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--work", default="/tmp/fp16_converters")
    parser.add_argument("--out", default=str(RESULTS / "fp16_converters.json"))
    args = parser.parse_args(argv)

    import onnx
    import torch

    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize
    from adtr_deploy.export.formats import ExportOptions
    from adtr_deploy.export.fp16 import FLOAT16, convert_to_fp16, fp32_node_names
    from adtr_deploy.export.images import verification_images as collect_images
    from adtr_deploy.export.onnx import fused_for_export, torch_to_onnx
    from adtr_deploy.export.quant_graph import name_nodes
    from adtr_deploy.model.checkpoint import calibration_of, model_from_checkpoint, read_checkpoint
    from adtr_deploy.spec import ModelSpec

    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    module, _, _ = fused_for_export(model, ExportOptions())
    fp32 = torch_to_onnx(module, ModelSpec(input_size=tuple(model.cfg.input_size), preset="custom"))
    name_nodes(fp32)
    block = fp32_node_names(fp32)
    images, source = collect_images(model.cfg.input_size, checkpoint=ckpt)
    images = np.ascontiguousarray(images[:8])
    with torch.no_grad():
        ref = tuple(t.numpy() for t in model(torch.from_numpy(images)))
    threshold = calibration_of(ckpt).threshold
    converters = {"ours (export/fp16.py)": lambda m: convert_to_fp16(m)[0], "onnxruntime.transformers.float16": None}
    converters["onnxruntime.transformers.float16"] = lambda m: ort_float16(m, block)
    out, calls = {}, {}
    for name, convert in converters.items():
        copy = onnx.ModelProto()
        copy.CopyFrom(fp32)
        path = work / (name.split(" ")[0].replace(".", "_") + ".onnx")
        try:
            t0 = time.perf_counter()
            converted = convert(copy)
            seconds = time.perf_counter() - t0
            onnx.save(converted, str(path))
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        valid = True
        try:
            onnx.checker.check_model(str(path), full_check=True)
            onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
        except Exception as exc:
            valid = f"no: {str(exc).splitlines()[0][:120]}"
        ops = Counter(n.op_type for n in converted.graph.node)
        halves = {t.name for t in converted.graph.initializer if t.data_type == FLOAT16}
        out[name] = {
            "valid": valid,
            "casts": ops.get("Cast", 0),
            "fp32_nodes": len(block),
            "fp16_initializers": len(halves),
            "size_mb": path.stat().st_size / 1e6,
            "convert_seconds": round(seconds, 1),
            **evaluate(path, images, ref, threshold),
        }
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        calls[name] = lambda s=sess: s.run(None, {"image": images})
    samples = measure_interleaved(calls, TimingPlan(warmup=1, min_iters=5, min_seconds=3))
    for name, s in samples.items():
        out[name]["p50_ms"] = summarize(s, len(images))["p50_ms"]
    result = {
        "command": command_line("fp16_converters.py", argv),
        "machine": machine(),
        "images": f"{len(images)} ({source})",
        "converters": out,
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
