"""Low precision on the CPU: FP32, FP16, INT8 (static per calibration method, dynamic) against the PyTorch eager model.

    python benchmarks/lowprec.py --data DEMO --run brick=RUN_DIR [--run grass=RUN_DIR ...] [--levers brick] [--also-threads 1]

For each trained run (an adtr-train folder on the demo data, `adtr data demo` + `adtr-train`), in ONE process:
1. export every variant with adtr-export's own export_checkpoint (TorchScript-based exporter unless --exporter dynamo),
2. verify it against the PyTorch FP32 reference on the export's verification images (test images not used to
   calibrate): map correlation, score error, decision agreement,
3. evaluate the exported model itself on the test split with adtr-eval's code (image and pixel AUROC) and count how
   many test decisions agree with the FP32 eager model at the calibrated threshold,
4. time all of them and the eager model interleaved (adtr_deploy.bench.timing): batch 1 (latency) and batch 8
   (throughput), ONNX Runtime with --threads intra-op threads, torch with the same number; --also-threads repeats the
   timing at other thread counts (on a shared, oversubscribed machine multi-threaded PyTorch suffers most),
5. profile the INT8 models per operator type (ONNX Runtime's profiler, after its graph fusions) and list the kernels
   the optimized graphs hold (are Conv/MatMul really integer kernels?).
Writes benchmarks/results/lowprec.json and lowprec.md (or --out). Exported models go to --work (outside the repository).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# name -> export_checkpoint keyword arguments (besides format "onnx"); the main table.
VARIANTS: dict[str, dict] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8 minmax": {"precision": "int8", "calib_method": "minmax"},
    "int8 entropy": {"precision": "int8", "calib_method": "entropy"},
    "int8 percentile": {"precision": "int8", "calib_method": "percentile"},
    "int8-dynamic": {"precision": "int8-dynamic"},
}
# --levers: variations of static INT8 (minmax; default scope: the transformer's MatMuls) tried for accuracy and speed.
LEVERS: dict[str, dict] = {
    "int8 minmax, all layers": {"precision": "int8", "quant_scope": "all"},
    "int8 minmax, all layers, quantized outputs": {"precision": "int8", "quant_scope": "all", "quantize_outputs": True},
    "int8 minmax backbone only": {"precision": "int8", "quant_scope": "backbone"},
    "int8 minmax, quantized outputs": {"precision": "int8", "quantize_outputs": True},
    "int8 minmax per-tensor": {"precision": "int8", "per_channel": False},
    "int8 minmax reduce-range": {"precision": "int8", "reduce_range": True},
    "int8 minmax, output projection fp32": {"precision": "int8", "fp32_head": True},
    "int8 minmax, output projection int8": {"precision": "int8", "fp32_head": False},
    "int8 percentile, output projection fp32": {"precision": "int8", "calib_method": "percentile", "fp32_head": True},
}
EAGER = "pytorch eager (fp32)"
# ONNX Runtime's integer CPU kernels after its Q/DQ fusions (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...)
INTEGER_KERNELS = ("QLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export_variants(run: Path, work: Path, variants: dict[str, dict], dynamo: bool) -> dict[str, dict]:
    from adtr_deploy.export import export_checkpoint

    out = {}
    for name, kwargs in variants.items():
        folder = work / name.replace(" ", "_").replace(",", "")
        start = time.perf_counter()
        result = export_checkpoint(run, "onnx", folder, verify=False, dynamo=dynamo, **kwargs)
        seconds = time.perf_counter() - start
        size = result.path.stat().st_size / 1e6
        details = result.spec.extra.get("onnx", {}).get(kwargs["precision"])
        out[name] = {"path": str(result.path), "export_s": seconds, "size_mb": size, "precision": kwargs["precision"]}
        out[name]["quantization"] = details if kwargs["precision"].startswith("int8") else None
        log(f"exported {name}: {result.path} ({size:.1f} MB, {seconds:.0f} s)")
    return out


def verify_variants(model, ckpt: dict, exported: dict[str, dict]) -> dict[str, dict]:
    """verify_artifact on each, with the images the export itself would use (never the calibration images)."""
    from adtr_deploy.export.images import calibration_files, verification_images
    from adtr_deploy.export.verify import verify_artifact

    calib, _ = calibration_files(ckpt.get("info") or {}, None)
    images, source = verification_images(model.cfg.input_size, checkpoint=ckpt, avoid=tuple(str(f) for f in calib))
    out = {}
    for name, row in exported.items():
        v = verify_artifact(model, row["path"], images, row["precision"], source=source)
        out[name] = {
            "images": v["images"],
            "image_source": source,
            "map_correlation": v["map"]["correlation"],
            "min_image_map_correlation": v["map"]["min_image_correlation"],
            "map_max_rel": v["map"]["max_rel"],
            "score_max_rel_to_score": v["score"]["max_rel_to_score"],
            "score_mean_rel_to_score": v["score"]["mean_rel_to_score"],
            "decision_agreement": v["decision_agreement"],
            "decisions": v["decisions"],
            "passed": v["passed"],
            "reason": v["reason"],
        }
        log(f"verified {name}: map correlation {v['map']['correlation']:.5f}, passed {v['passed']}")
    return out


def evaluate_variants(run: Path, data: Path, category: str, exported: dict[str, dict]) -> dict[str, dict]:
    """adtr-eval's evaluation of the eager checkpoint and of every exported model; decision agreement with eager."""
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.model.checkpoint import calibration_of, read_checkpoint
    from adtr_deploy.train.evaluate import evaluate_runner, open_runner

    threshold = calibration_of(read_checkpoint(run)).threshold
    dataset = open_dataset(data, category)
    out, ref_scores = {}, None
    for name, path in [(EAGER, run), *((n, Path(r["path"])) for n, r in exported.items())]:
        metrics, scores = evaluate_runner(open_runner(path), dataset, batch_size=8)
        if ref_scores is None:
            ref_scores = scores
        agree = float(np.mean((scores > threshold) == (ref_scores > threshold)))
        out[name] = {
            "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"],
            "pro": metrics.get("pro"),
            "test_images": metrics["num_images"],
            "decision_agreement_with_eager": agree,
            "score_mean_rel_diff_vs_eager": float(np.mean(np.abs(scores - ref_scores) / np.abs(ref_scores))),
        }
        log(f"evaluated {name}: image AUROC {metrics['image_auroc']:.4f}, pixel AUROC {metrics['pixel_auroc']:.4f}")
    return out


def time_variants(run: Path, exported: dict[str, dict], batches: dict, threads: int, plan) -> dict[str, dict]:
    """All variants and the eager model, interleaved per batch size (adtr-bench's timer and runners)."""
    import torch

    from adtr_deploy.bench import runners as R
    from adtr_deploy.bench.timing import measure_interleaved, summarize

    torch.set_num_threads(threads)
    eager = R.reference_runners(run, "cpu")[0][0]
    backends = {name: R.backend_runners("onnxruntime-cpu", Path(r["path"]), threads)[0] for name, r in exported.items()}
    out: dict[str, dict] = {}
    for bs, batch in batches.items():
        calls = {EAGER: eager.bind(batch), **{n: r.bind(batch) for n, r in backends.items()}}
        log(f"timing batch {bs}: {len(calls)} runners interleaved")
        samples = measure_interleaved(calls, plan)
        for name, s in samples.items():
            out.setdefault(name, {})[str(bs)] = summarize(s, bs)
    return out


def profile_int8(exported: dict[str, dict], batch: np.ndarray, threads: int, folder: Path) -> dict[str, dict]:
    """Per-op-type time (ORT profiler) and the op types of the graph ONNX Runtime actually runs after its fusions."""
    import onnx
    import onnxruntime as ort

    from adtr_deploy.bench.profile import profile_onnxruntime

    out = {}
    for name, row in exported.items():
        if not row["precision"].startswith("int8") and name != "fp32":
            continue
        prof = profile_onnxruntime(Path(row["path"]), batch, threads, folder / name.replace(" ", "_"), runs=3)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # the optimized graph is hardware-specific: fine, it is only inspected here
        so.optimized_model_filepath = str(folder / f"{name.replace(' ', '_')}.optimized.onnx")
        ort.InferenceSession(row["path"], so, providers=["CPUExecutionProvider"])
        kernels = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        prof.pop("trace", None)
        out[name] = {**prof, "optimized_graph_ops": dict(kernels.most_common())}
        top = ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in prof["by_op"][:5])
        log(f"profiled {name}: {prof['model_run_ms']:.0f} ms per batch of {len(batch)}; {top}")
    return out


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _vs_fp32(timing: dict, name: str, bs: str) -> str:
    """Throughput ratio to the ONNX fp32 variant at batch 1 and `bs`, where both were timed."""
    if "fp32" not in timing or name not in timing:
        return "-"
    r1 = timing[name]["1"]["throughput_ips"] / timing["fp32"]["1"]["throughput_ips"]
    rb = timing[name][bs]["throughput_ips"] / timing["fp32"][bs]["throughput_ips"]
    return f"{r1:.2f}x / {rb:.2f}x"


def summary(report: dict) -> list[str]:
    """One table over all categories: mean accuracy per model, speed from the (first) timed category."""
    cats = report["categories"]
    if len(cats) < 2:
        return []
    timed = next((c for c, r in cats.items() if r["timing"]), None)
    names = [
        EAGER,
        *(n for n in next(iter(cats.values()))["exported"] if all(n in r["evaluation"] for r in cats.values())),
    ]
    bs = str(report["throughput_batch"])

    def mean(name: str, key: str) -> float:
        return float(np.mean([r["evaluation"][name][key] for r in cats.values()]))

    lines = [
        f"## Summary: mean over {', '.join(cats)}" + (f"; speed measured on {timed}" if timed else ""),
        "",
        "| model | image AUROC | pixel AUROC | decisions = eager (test) | p50 ms (batch 1) "
        f"| img/s (batch {bs}) | speed-up vs eager | vs ONNX fp32 (batch 1 / {bs}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        img, pix = mean(name, "image_auroc"), mean(name, "pixel_auroc")
        d_img = "" if name == EAGER else f" ({100 * (img - mean(EAGER, 'image_auroc')):+.1f})"
        d_pix = "" if name == EAGER else f" ({100 * (pix - mean(EAGER, 'pixel_auroc')):+.1f})"
        speed = "- | - | - | -"
        if timed:
            t, base = cats[timed]["timing"][name], cats[timed]["timing"][EAGER][bs]["throughput_ips"]
            speed = f"{t['1']['p50_ms']:.0f} | {t[bs]['throughput_ips']:.2f} | {t[bs]['throughput_ips'] / base:.2f}x"
            speed += f" | {_vs_fp32(cats[timed]['timing'], name, bs)}"
        lines.append(
            f"| {name} | {img:.4f}{d_img} | {pix:.4f}{d_pix} "
            f"| {100 * mean(name, 'decision_agreement_with_eager'):.1f}% | {speed} |"
        )
    return [*lines, ""]


def markdown(report: dict) -> str:
    lines = [
        "# Low precision: accuracy and speed of each exported precision (CPU)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine'].get('cpu', '?')}, {report['threads']} threads; load average at start/end "
        f"{report['load_average_start']} / {report['load_average_end']}; {report['versions']}",
        "",
    ]
    lines += summary(report)
    for cat, res in report["categories"].items():
        ev, ver, tm = res["evaluation"], res["verification"], res["timing"]
        eager_ips = tm[EAGER][str(report["throughput_batch"])]["throughput_ips"] if tm else None
        ref = ev[EAGER]
        lines += [
            f"## {cat}",
            "",
            f"Run: `{res['run']}`; test split: {ref['test_images']} images; verification: {res['verification_source']}.",
            "",
            "| model | image AUROC | pixel AUROC | decisions = eager (test) | map corr. vs FP32 | score err. max "
            "| min map corr. per image "
            f"| p50 ms (batch 1) | img/s (batch {report['throughput_batch']}) | speed-up vs eager | vs ONNX fp32 "
            "(batch 1 / 8) | size MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in [EAGER, *res["exported"]]:
            e, t = ev[name], tm.get(name)
            v = ver.get(name, {})
            dauroc = "" if name == EAGER else f" ({100 * (e['image_auroc'] - ref['image_auroc']):+.1f})"
            dpix = "" if name == EAGER else f" ({100 * (e['pixel_auroc'] - ref['pixel_auroc']):+.1f})"
            size = res["exported"].get(name, {}).get("size_mb")
            if t:
                ips = t[str(report["throughput_batch"])]["throughput_ips"]
                speed = f"{t['1']['p50_ms']:.0f} | {ips:.2f} | {ips / eager_ips:.2f}x"
                speed += f" | {_vs_fp32(tm, name, str(report['throughput_batch']))}"
            else:
                speed = "- | - | - | -"
            lines.append(
                f"| {name} | {e['image_auroc']:.4f}{dauroc} | {e['pixel_auroc']:.4f}{dpix} "
                f"| {100 * e['decision_agreement_with_eager']:.1f}% | {_fmt(v.get('map_correlation'), '.5f', '1')} "
                f"| {_fmt(v.get('score_max_rel_to_score'), '.2%', '0')} "
                f"| {_fmt(v.get('min_image_map_correlation'), '.5f', '1')} "
                f"| {speed} | {_fmt(size, '.1f', '')} |"
            )
        for n, other in res.get("timing_at_threads", {}).items():
            base = other[EAGER][str(report["throughput_batch"])]["throughput_ips"]
            lines += [
                "",
                f"The same models timed with {n} thread(s) (interleaved again):",
                "",
                f"| model | p50 ms (batch 1) | img/s (batch {report['throughput_batch']}) | speed-up vs eager |",
                "|---|---|---|---|",
            ]
            for name, t in other.items():
                ips = t[str(report["throughput_batch"])]["throughput_ips"]
                lines.append(f"| {name} | {t['1']['p50_ms']:.0f} | {ips:.2f} | {ips / base:.2f}x |")
        lines += ["", "Verification (the export's check, bounds from PRECISIONS):", ""]
        for name, v in ver.items():
            lines.append(f"- {name}: {'PASS' if v['passed'] else 'FAIL'} ({v['reason']})")
        if res["profiles"]:
            lines += ["", "Where the time goes (ONNX Runtime profiler, batch 8, kernel time per op type):", ""]
        for name, p in res["profiles"].items():
            top = ", ".join(f"{r['op']} {r['ms_per_run']:.0f} ms ({100 * r['share']:.0f}%)" for r in p["by_op"][:8])
            integer = {k: v for k, v in p["optimized_graph_ops"].items() if k.startswith(INTEGER_KERNELS)}
            qdq = {k: v for k, v in p["optimized_graph_ops"].items() if k in ("QuantizeLinear", "DequantizeLinear")}
            lines.append(f"- {name}: {p['model_run_ms']:.0f} ms/batch; {top}; integer kernels {integer}; left {qdq}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the demo data root (adtr data demo --out DATA)")
    ap.add_argument("--run", action="append", required=True, metavar="CATEGORY=RUN_DIR", help="a trained run")
    ap.add_argument(
        "--levers",
        nargs="*",
        default=None,
        metavar="CATEGORY",
        help="also the INT8 variations (LEVERS): all runs, or these",
    )
    ap.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--also-threads", type=int, nargs="*", default=[], help="repeat the timing at these thread counts")
    ap.add_argument(
        "--time",
        nargs="*",
        default=None,
        metavar="CATEGORY",
        help="time and profile only these runs (default: all); speed does not depend on which category a model learned",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        default=None,
        metavar="NAME",
        help="export only these VARIANTS/LEVERS names (e.g. fp32 'int8 minmax' int8-dynamic); default: all VARIANTS",
    )
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--min-iters", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adtr-lowprec")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from adtr_deploy.bench.machine import load_average, machine_info
    from adtr_deploy.bench.runners import default_threads
    from adtr_deploy.bench.timing import TimingPlan
    from adtr_deploy.export.exporter import versions
    from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint
    from adtr_deploy.preprocess import load_image

    threads = args.threads or default_threads()
    plan = TimingPlan(warmup=2, min_iters=args.min_iters, min_seconds=args.min_seconds)
    report: dict = {
        "command": "python benchmarks/lowprec.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "versions": {k: v for k, v in versions().items() if k in ("torch", "onnx", "onnxruntime")},
        "threads": threads,
        "throughput_batch": 8,
        "load_average_start": load_average(),
        "categories": {},
    }
    for item in args.run:
        category, run = item.split("=", 1)
        run = Path(run)
        log(f"{category}: {run}")
        ckpt = read_checkpoint(run)
        model = model_from_checkpoint(ckpt).eval()
        work = args.work / category
        levers = args.levers is not None and (not args.levers or category in args.levers)
        variants = {**VARIANTS, **(LEVERS if levers else {})}
        if args.variants:
            variants = {n: v for n, v in {**VARIANTS, **LEVERS}.items() if n in args.variants}
        exported = export_variants(run, work, variants, args.exporter == "dynamo")
        verification = verify_variants(model, ckpt, exported)
        evaluation = evaluate_variants(run, args.data, category, exported)
        tests = sorted((args.data / category / "test").rglob("*.png"))
        pick = [tests[i] for i in np.linspace(0, len(tests) - 1, 8).round().astype(int)]
        batch8 = np.stack([load_image(p, model.cfg.input_size) for p in pick])
        timing, timing_at, profiles = {}, {}, {}
        if args.time is None or category in args.time:
            timing = time_variants(run, exported, {1: batch8[:1], 8: batch8}, threads, plan)
            timing_at = {
                str(n): time_variants(run, exported, {1: batch8[:1], 8: batch8}, n, plan) for n in args.also_threads
            }
            profiles = profile_int8(exported, batch8, threads, work / "profiles")
        report["categories"][category] = {
            "run": str(run),
            "verification_source": next(iter(verification.values()))["image_source"],
            "exported": exported,
            "verification": verification,
            "evaluation": evaluation,
            "timing": timing,
            "timing_at_threads": timing_at,
            "profiles": profiles,
        }
    report["load_average_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowprec.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "lowprec.md").write_text(markdown(report) + "\n")
    log(f"wrote {args.out / 'lowprec.json'} and {args.out / 'lowprec.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
