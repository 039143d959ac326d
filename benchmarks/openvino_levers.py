"""Issue 27's two open levers, measured in one process: NNCF post-training INT8, and anomalib's PaDiM-ResNet18 beside lite0.

    python benchmarks/openvino_levers.py --export-dir /tmp/ov27/work2/brick --data /tmp/drift_runs/demo \
        --eval-data /tmp/drift_runs/val --val /tmp/drift_runs/val/brick/test/good \
        --category brick --work /tmp/ov27/levers --out benchmarks/results/openvino_levers.json

--export-dir is openvino_cpu.py's work folder of one category (onnx-fp32/ and openvino-int8/ in it: the FP32 ONNX and
our Q/DQ INT8 IR of the same checkpoint). In one run:
1. NNCF 3.4 `nncf.quantize` of the FP32 model read by OpenVINO (NNCF_VARIANTS: presets performance and mixed, the
   transformer model type, MatMul only), calibrated on the good
   TRAINING images of DATA/CATEGORY/train/good (never test images), with the anomaly-map tail ignored (the L2 error's
   Sub/Pow, the ReduceSum and everything after it: what our INT8 keeps float). The settings are fixed beforehand; the
   only check on images before the test split is the per-image map correlation with FP32 on VAL good images (--val).
2. PaDiM-ResNet18 as anomalib builds it (padim_graph.py): torchvision resnet18, random init (a speed comparison: the
   cost is the same as with trained weights), layer1-3 at 224 px, 100 random channels, per-position Mahalanobis,
   upsampled map, Gaussian blur (sigma 4), score = max; exported to ONNX, and NNCF INT8 of its backbone.
3. Accuracy of every lite0 path on EVAL_DATA/CATEGORY/test (image / pixel AUROC, delta vs ONNX Runtime FP32): the
   validation split, as docs/lowprec.md reports the other paths.
4. Timing: every candidate at batch 1 and 8, `--threads` threads, blocks interleaved over `--rounds` rounds, median.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def map_tail_names(onnx_path: Path) -> list[str]:
    """The anomaly-map tail of our ONNX graph: the ReduceSum of the L2 error, all after it, and the Pow/Sub feeding it."""
    import onnx

    from adtr_deploy.export.fp16 import downstream
    from adtr_deploy.export.quant_graph import consumers_of

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consumers = consumers_of(graph)
    producer = {o: n for n in graph.node for o in n.output}
    starts = [n for n in graph.node if n.op_type == "ReduceSum"]
    tail = set(downstream(starts, consumers))
    for node in starts:
        p = producer.get(node.input[0])
        while p is not None and p.op_type in ("Pow", "Sub"):
            tail.add(p.name)
            p = producer.get(p.input[0]) if p.op_type == "Pow" else None
    return sorted(tail)


# NNCF settings tried on lite0: name -> (preset, model type, OpenVINO op types left float besides the map tail)
NNCF_VARIANTS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "performance": ("performance", None, ()),
    "mixed": ("mixed", None, ()),
    "performance, transformer model type": ("performance", "transformer", ()),
    "performance, transformer model type, MatMul only (convs float, as our INT8)": (
        "performance",
        "transformer",
        ("Convolution", "GroupConvolution"),
    ),
}


def nncf_int8(ov, model_path: Path, images: np.ndarray, variant: tuple, ignored: list[str], out: Path) -> dict:
    import nncf

    from adtr_deploy.runtime.openvino import SPEC_RT_KEY, embedded_spec

    core = ov.Core()
    model = core.read_model(str(model_path))
    spec = embedded_spec(model)
    names = {op.get_friendly_name() for op in model.get_ops()}
    preset, model_type, float_types = variant
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    t0 = time.time()
    quantized = nncf.quantize(
        model,
        nncf.Dataset([images[i : i + 1] for i in range(len(images))]),
        preset=getattr(nncf.QuantizationPreset, preset.upper()),
        subset_size=len(images),
        ignored_scope=nncf.IgnoredScope(
            names=[n for n in ignored if n in names], types=list(float_types), validate=False
        ),
        **kwargs,
    )
    if spec is not None:
        quantized.set_rt_info(spec, SPEC_RT_KEY)
    quantized.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return {
        "preset": preset,
        "model_type": model_type or "default",
        "float_op_types": list(float_types),
        "fake_quantize_ops": fq,
        "ignored": len(ignored),
        "quantize_s": round(time.time() - t0, 1),
    }


class Candidate:
    """One compiled model: run(batch) -> outputs; ONNX Runtime or OpenVINO, `threads` threads, one stream."""

    def __init__(self, label: str, path: Path, runtime: str, threads: int, hint: str = "f32"):
        self.label, self.path, self.runtime, self.hint = label, str(path), runtime, hint
        if runtime == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
        else:
            import openvino as ov

            core = ov.Core()
            config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": hint}
            self.compiled = core.compile_model(core.read_model(self.path), "CPU", config)
            self.request = self.compiled.create_infer_request()
            self.ran_in = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.runtime == "onnxruntime":
            return self.session.run(None, {self.input: batch})
        result = self.request.infer([batch])
        return [np.asarray(result[o]) for o in self.compiled.outputs]


def map_correlation(a: Candidate, b: Candidate, images: np.ndarray) -> float:
    """The worst per-image Pearson correlation of the anomaly maps of a and b."""
    worst = 1.0
    for img in images:
        ma, mb = a.run(img[None])[0].ravel(), b.run(img[None])[0].ravel()
        worst = min(worst, float(np.corrcoef(ma, mb)[0, 1]))
    return worst


def time_all(cands: list[Candidate], pools: dict[int, np.ndarray], rounds: int, block_s: float) -> dict:
    """ms per image, median over `rounds` interleaved blocks of at least block_s seconds each."""
    samples: dict[tuple[str, int], list[float]] = {(c.label, b): [] for c in cands for b in pools}
    for c in cands:
        for pool in pools.values():
            c.run(pool)
            c.run(pool)  # warm-up
    for r in range(rounds):
        for b, pool in pools.items():
            for c in cands:
                n, t0 = 0, time.perf_counter()
                while True:
                    c.run(pool)
                    n += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= block_s and n >= 3:
                        break
                samples[(c.label, b)].append(1000 * elapsed / (n * b))
        log(f"round {r + 1}/{rounds} done")
    return {f"{label}|{b}": {"ms_per_image": float(np.median(v)), "blocks": v} for (label, b), v in samples.items()}


class Runner:
    """evaluate_runner's interface over a Candidate."""

    def __init__(self, cand: Candidate, size: tuple[int, int]):
        self.cand, self.name, self.input_size, self.tiling = cand, cand.label, size, None

    def run(self, batch) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.cand.run(np.ascontiguousarray(np.asarray(batch)))[:2]
        return np.asarray(amap, dtype=np.float32), np.asarray(score, dtype=np.float32).reshape(-1)


def markdown(report: dict) -> str:
    lines = ["# OpenVINO levers: NNCF INT8 and PaDiM-ResNet18 (issue 27)", "", f"Command: `{report['command']}`", ""]
    lines += [f"CPU: {report['cpu']['model']}; flags: {', '.join(report['cpu']['flags'])}; threads {report['threads']}"]
    lines[-1] += ", one stream; one process, blocks interleaved, median of the rounds."
    lines += [
        "",
        "## Speed",
        "",
        "| model, runtime, precision | batch 1 ms/img (vs ORT FP32) | batch 8 ms/img (vs ORT FP32) |",
    ]
    lines += ["|---|---|---|"]
    t = report["timing"]
    for label in report["candidates"]:
        base = "lite0 ORT FP32"
        cells = [
            f"{t[f'{label}|{b}']['ms_per_image']:.1f} ({t[f'{base}|{b}']['ms_per_image'] / t[f'{label}|{b}']['ms_per_image']:.2f}x)"
            for b in (1, 8)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## lite0 accuracy on {report['category']} {report['eval_split']} (image / pixel AUROC, delta vs ORT FP32 in points)",
        "",
    ]
    lines += ["| path | AUROC | worst per-image map correlation with OV FP32 on val good images |", "|---|---|---|"]
    for label, a in report["accuracy"].items():
        lines.append(
            f"| {label} | {100 * a['image_auroc']:.1f} / {100 * a['pixel_auroc']:.2f} "
            f"({a['image_delta_points']:+.2f} / {a['pixel_delta_points']:+.2f}) | {a.get('val_map_corr', '')} |"
        )
    lines += ["", "## NNCF runs", ""] + [f"- {k}: {v}" for k, v in report["nncf"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import openvino as ov
    from padim_graph import export_padim, tail_names

    from adtr_deploy.bench.studies import command_line, write_result
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.export.images import files_from, load_calibration_batch
    from adtr_deploy.runtime.cpu import cpu_info
    from adtr_deploy.train.evaluate import evaluate_runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-dir", type=Path, required=True, help="openvino_cpu.py's work folder of the category")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout root: CATEGORY/train/good, CATEGORY/test")
    ap.add_argument(
        "--eval-data", type=Path, help="MVTec-layout root whose CATEGORY/test is evaluated (default --data)"
    )
    ap.add_argument("--category", default="brick")
    ap.add_argument("--val", type=Path, required=True, help="a folder of VAL good images (not train, not test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--skip-lite0-nncf",
        action="store_true",
        help="leave out the four NNCF settings of lite0 (measured, none passed): PaDiM beside lite0's own paths only",
    )
    ap.add_argument("--block-seconds", type=float, default=1.0)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS / "openvino_levers.json")
    args = ap.parse_args(argv)
    size = (224, 224)
    fp32_onnx = args.export_dir / "onnx-fp32" / "model.onnx"
    train = load_calibration_batch(files_from(args.data / args.category / "train" / "good"), size)
    val = load_calibration_batch(files_from(args.val), size)
    report = {"command": command_line("openvino_levers.py", argv), "cpu": cpu_info(), "threads": args.threads}
    report["eval_split"] = str((args.eval_data or args.data) / args.category / "test")
    report.update(category=args.category, calibration_images=len(train), val_images=len(val), nncf={})
    tail = map_tail_names(fp32_onnx)
    variants = {} if args.skip_lite0_nncf else NNCF_VARIANTS
    for i, (name, variant) in enumerate(variants.items()):
        report["nncf"][f"lite0 {name}"] = nncf_int8(ov, fp32_onnx, train, variant, tail, args.work / f"nncf-{i}")
        log(f"lite0 nncf {name}: {report['nncf'][f'lite0 {name}']}")
    padim = export_padim(args.work / "padim" / "model.onnx")
    report["nncf"]["padim performance"] = nncf_int8(
        ov, padim, train, NNCF_VARIANTS["performance"], tail_names(padim), args.work / "padim-nncf"
    )
    log(f"padim nncf: {report['nncf']['padim performance']}")
    w, th = args.work, args.threads
    cands = [
        Candidate("lite0 ORT FP32", fp32_onnx, "onnxruntime", th),
        Candidate("lite0 OV FP32", fp32_onnx, "openvino", th),
        Candidate("lite0 OV BF16 (refused by verification on brick)", fp32_onnx, "openvino", th, "bf16"),
        Candidate("lite0 OV INT8, our Q/DQ", args.export_dir / "openvino-int8" / "model.xml", "openvino", th),
        *(
            Candidate(f"lite0 OV INT8, NNCF {name}", w / f"nncf-{i}" / "model.xml", "openvino", th)
            for i, name in enumerate(variants)
        ),
        Candidate("PaDiM-R18 ORT FP32", padim, "onnxruntime", th),
        Candidate("PaDiM-R18 OV FP32", padim, "openvino", th),
        Candidate("PaDiM-R18 OV BF16", padim, "openvino", th, "bf16"),
        Candidate("PaDiM-R18 OV INT8, NNCF performance (backbone)", w / "padim-nncf" / "model.xml", "openvino", th),
    ]
    report["candidates"] = [c.label for c in cands]
    report["ran_in"] = {c.label: getattr(c, "ran_in", "onnxruntime f32") for c in cands}
    dataset = open_dataset(args.eval_data or args.data, args.category)
    report["accuracy"] = {}
    for c in cands[: 4 + len(variants)]:
        metrics, _ = evaluate_runner(Runner(c, size), dataset, batch_size=8)
        row = {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "num_images")}
        row["val_map_corr"] = round(map_correlation(c, cands[1], val), 4)
        report["accuracy"][c.label] = row
        log(f"{c.label}: {row}")
    base = report["accuracy"]["lite0 ORT FP32"]
    for row in report["accuracy"].values():
        row["image_delta_points"] = 100 * (row["image_auroc"] - base["image_auroc"])
        row["pixel_delta_points"] = 100 * (row["pixel_auroc"] - base["pixel_auroc"])
    write_result({**report, "timing": {}}, args.out, lambda r: "")
    pools = {1: val[:1].copy(), 8: np.ascontiguousarray(np.resize(val, (8, *val.shape[1:])))}
    report["timing"] = time_all(cands, pools, args.rounds, args.block_seconds)
    write_result(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
