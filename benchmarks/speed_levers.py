"""FP32 ONNX Runtime on the CPU: what each speed lever gives, against a fixed reference export, in ONE interleaved run.

    python benchmarks/speed_levers.py --checkpoint RUN_DIR --reference MAIN_EXPORT/model.onnx [--pt2 EXPORT/model.pt2]

`--reference` is the ONNX model that the code before this work exported from the same checkpoint (the fixed reference,
e.g. `git worktree add /tmp/ref <commit>` then `PYTHONPATH=/tmp/ref adtr-export --model RUN_DIR --out REF`). The script
exports the variants itself (into --work, outside the repository):

- graph levers: today's graph through onnxruntime.transformers' optimizer (what it fuses in our graph is recorded);
  the fused inference rewrite of the transformer (adtr_deploy/export/fuse.py: fused QKV, all decoder K/V in one
  product, scale and standardization folded) without and with the input-independent first decoder step precomputed;
  that plus the transformers optimizer; ONNX Runtime's own ORT_ENABLE_ALL graph saved to a file and loaded with
  optimizations off;
- session levers on the fused graph: thread spinning ON (every other row has it off, as the runtime does by
  default; the reference is also timed with it on), spinning only while a run is in flight
  (session.force_spinning_stop), 1 intra-op thread instead of --threads, denormals as zero, IO binding;
- optionally the .pt2 package (AOTInductor) of the same checkpoint;
- optionally other exports (`--also LABEL=PATH`, e.g. the default preset's FP32 and INT8 exports), each with spinning
  off and on and as 2 streams, so their ratios to the fixed reference (and INT8 to FP32) come from the same run.

All are timed interleaved in blocks (adtr_deploy.bench.timing, the method adtr-bench uses) at each batch size, on real
images, and compared with the PyTorch FP32 reference on the same batch (max |diff| over the map range). Wall-clock
ratios are throughput ratios; CPU-time ratios (process CPU time per call) are less sensitive to other processes'
load and are reported beside them. Writes benchmarks/results/speed_levers.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from adtr_deploy.bench.studies import command_line, machine, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def session(
    path: Path,
    threads: int,
    *,
    spin: bool = False,
    level: str = "ORT_ENABLE_ALL",
    save: Path | None = None,
    denormal_as_zero: bool = False,
    spin_stop: bool = False,
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if spin_stop:  # spin while a run is in flight, block between runs (no CPU burnt between camera frames)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if denormal_as_zero:  # flush-to-zero: denormal floats can cost x100 per op on x86
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ops_of(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common())


def transformer_optimized(src: Path, dst: Path, heads: int, hidden: int) -> dict:
    """onnxruntime.transformers' BERT-family fusions (opt_level 0: its own fusions only); returns what it fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def build_variants(args, work: Path, model, spec) -> tuple[dict[str, Path], dict]:
    """name -> ONNX file of each graph variant, and what was recorded while making them (--reuse: from --work)."""
    import json

    record = work / "variants.json"
    if args.reuse and record.is_file():
        saved = json.loads(record.read_text())
        return {k: Path(v) for k, v in saved["files"].items()}, saved["notes"]
    files, notes = _build_variants(args, work, model, spec)
    record.write_text(json.dumps({"files": {k: str(v) for k, v in files.items()}, "notes": notes}, indent=1))
    return files, notes


def _build_variants(args, work: Path, model, spec) -> tuple[dict[str, Path], dict]:
    import json

    import onnx

    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.export.fuse import fuse_model
    from adtr_deploy.export.onnx import torch_to_onnx

    cfg = model.cfg
    notes: dict = {}
    files = {"reference": Path(args.reference)}
    fused = work / "fused" / "model.onnx"
    if not (args.reuse and fused.is_file()):  # --reuse: the exports of an interrupted run (minutes each) stay
        log("exporting the fused model with adtr-export (verified)")
        export_checkpoint(args.checkpoint, "onnx", work / "fused", batch_max=64)
    files["fused"] = fused
    verification = json.loads((work / "fused" / "verification.json").read_text())
    notes["fused_verification"] = {k: verification[k] for k in ("passed", "images", "tolerance")}
    notes["fused_verification"]["map_max_rel"] = verification["map"]["max_rel"]
    if not (args.reuse and (work / "fused_noprecompute.onnx").is_file()):
        log("exporting the fused model without the precomputed first decoder step")
        module, _ = fuse_model(model, precompute_first=False)
        onnx.save(torch_to_onnx(module, spec), str(work / "fused_noprecompute.onnx"))
    files["fused, first decoder step per image"] = work / "fused_noprecompute.onnx"
    log("onnxruntime.transformers optimizer on the reference and the fused graph")
    notes["transformer_optimizer_fused_ops"] = {
        "reference": transformer_optimized(files["reference"], work / "ref_trf.onnx", cfg.nhead, cfg.d_model),
        "fused": transformer_optimized(files["fused"], work / "fused_trf.onnx", cfg.nhead, cfg.d_model),
    }
    files["reference + transformers optimizer"] = work / "ref_trf.onnx"
    files["fused + transformers optimizer"] = work / "fused_trf.onnx"
    t0 = time.perf_counter()
    session(files["fused"], args.threads, save=work / "fused_ort_optimized.onnx")
    notes["session_seconds_fused"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    session(work / "fused_ort_optimized.onnx", args.threads, level="ORT_DISABLE_ALL")
    notes["session_seconds_saved_optimized"] = round(time.perf_counter() - t0, 2)
    files["fused, ORT-optimized graph saved"] = work / "fused_ort_optimized.onnx"
    notes["ops"] = {name: ops_of(path) for name, path in files.items()}
    return files, notes


def make_calls(args, files: dict[str, Path], batch: np.ndarray) -> dict:
    """name -> zero-argument callable returning (map, score) for the batch."""
    import onnxruntime as ort

    calls = {}

    def plain(sess):
        return lambda: sess.run(["anomaly_map", "score"], {"image": batch})

    for name, path in files.items():
        level = "ORT_DISABLE_ALL" if "saved" in name else "ORT_ENABLE_ALL"
        calls[name] = plain(session(path, args.threads, level=level))
    fused = files["fused"]
    calls["fused, spinning on (ORT's default)"] = plain(session(fused, args.threads, spin=True))
    calls["reference, spinning on (ORT's default)"] = plain(session(files["reference"], args.threads, spin=True))
    calls["fused, spinning during runs only (force_spinning_stop)"] = plain(
        session(fused, args.threads, spin=True, spin_stop=True)
    )
    calls["fused, 1 intra-op thread"] = plain(session(fused, 1))
    calls["fused, denormals as zero"] = plain(session(fused, args.threads, denormal_as_zero=True))
    sess = session(fused, args.threads)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(batch))
    n, (h, w) = len(batch), batch.shape[1:3]
    outs = [np.empty((n, 1, h, w), np.float32), np.empty((n,), np.float32)]
    for name, arr in zip(("anomaly_map", "score"), outs):
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(arr))

    def bound():
        sess.run_with_iobinding(binding)
        return outs

    calls["fused, IO binding"] = bound
    # Inference streams (adtr-run --streams 2): the batch split over 2 sessions with 1 thread each. At batch 1 the call
    # takes 2 frames, one per stream (2 frames in flight): its throughput is per image, its latency is per 2 frames.
    from adtr_deploy.runtime.backends import OnnxRuntimeBackend

    streamed = OnnxRuntimeBackend(fused, threads=args.threads, streams=2)
    frames = np.ascontiguousarray(np.resize(batch, (max(2, len(batch)), *batch.shape[1:])))
    label = "fused, 2 streams x 1 thread" + (" (2 frames in flight, 1 per stream)" if len(batch) == 1 else "")
    calls[label] = lambda: streamed.run(frames)
    for label, path in args.also:  # other exports (another preset, INT8): the same input, their own model
        calls[label] = plain(session(Path(path), args.threads))
        calls[label + ", spinning on"] = plain(session(Path(path), args.threads, spin=True))
        other = OnnxRuntimeBackend(path, threads=args.threads, streams=2)
        other_label = label + ", 2 streams x 1 thread" + (" (2 frames in flight)" if len(batch) == 1 else "")
        calls[other_label] = lambda other=other: other.run(frames)
    if args.pt2:
        import torch

        from adtr_deploy.runtime.pt2 import Pt2Backend

        torch.set_num_threads(args.threads)
        backend = Pt2Backend(args.pt2)
        calls["pt2 (AOTInductor)"] = lambda: backend.run(batch)
    return calls


def time_batch(args, files, batch, reference_out) -> list[dict]:
    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize

    calls = make_calls(args, files, batch)
    if args.variants:  # a focused run: the reference and the variants named
        calls = {k: v for k, v in calls.items() if k == "reference" or k in args.variants}
    ref_map, ref_score = reference_out
    span = float(ref_map.max() - ref_map.min())
    parity, images = {}, {}  # images per call: the batch, or 2 frames for a streams call at batch 1
    others = {name for name in calls for label, _ in args.also if name.startswith(label)}
    for name, call in calls.items():
        amap, score = call()
        images[name] = len(score)
        if name in others:  # another model: its parity is its own export's verification (notes)
            parity[name] = float("nan")
            continue
        amap, score = amap[: len(batch)], score[: len(batch)]
        parity[name] = float(max(np.abs(amap - ref_map).max(), np.abs(score - ref_score).max()) / span)
    plan = TimingPlan(warmup=3, min_iters=args.min_iters, min_seconds=args.min_seconds)
    cpu: dict[str, list[float]] = {}
    load_before = os.getloadavg()[0]
    samples = measure_interleaved(calls, plan, cpu)
    rows = []
    base = summarize(samples["reference"], len(batch))
    base_cpu = float(np.median(cpu["reference"]))
    for name in calls:
        st = summarize(samples[name], images[name])
        cpu_ms = float(np.median(cpu[name])) * 1e3
        rows.append({
            "variant": name,
            "batch": len(batch),
            "images_per_call": images[name],
            "p50_ms": st["p50_ms"],
            "ips": st["throughput_ips"],
            "speedup": st["throughput_ips"] / base["throughput_ips"],
            "cpu_ms_p50": cpu_ms,
            "speedup_cpu_time": (base_cpu * 1e3 / len(batch)) / (cpu_ms / images[name]),  # per image
            "n": st["count"],
            "parity_max_rel": parity[name],
            "load_1m_before": load_before,
            "load_1m_after": os.getloadavg()[0],
        })  # fmt: skip
        log(f"  bs {len(batch)} {name:<40} p50 {st['p50_ms']:8.1f} ms  x{rows[-1]['speedup']:.2f} wall  "
            f"x{rows[-1]['speedup_cpu_time']:.2f} cpu  parity {parity[name]:.1e}")  # fmt: skip
    return rows


def time_batch_rounds(args, files, images: np.ndarray, bs: int, model) -> list[dict]:
    """Every variant at one batch size, args.rounds times; one combined row each."""
    import torch

    batch = np.ascontiguousarray(np.resize(images, (bs, *images.shape[1:])))
    with torch.no_grad():
        ref = tuple(t.numpy() for t in model(torch.from_numpy(batch)))
    rounds = []
    for i in range(args.rounds):
        log(f"batch {bs}: timing the variants interleaved (round {i + 1} of {args.rounds})")
        rounds.append(time_batch(args, files, batch, ref))
    return combine_rounds(rounds)


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per variant from repeated interleaved runs: the median of each figure, and the speed-up's range."""
    combined = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        row = dict(first)
        for key in ("p50_ms", "ips", "speedup", "cpu_ms_p50", "speedup_cpu_time"):
            row[key] = float(np.median([r[key] for r in same]))
        row["n"] = sum(r["n"] for r in same)
        row["rounds"] = len(same)
        row["speedup_range"] = [min(r["speedup"] for r in same), max(r["speedup"] for r in same)]
        row["load_1m_before"] = min(r["load_1m_before"] for r in same)
        row["load_1m_after"] = max(r["load_1m_after"] for r in same)
        combined.append(row)
    return combined


def also_exports(items: list[str]) -> list[tuple[str, str]]:
    """--also LABEL=PATH -> [(label, model.onnx)], checked before minutes of exporting."""
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--also {item!r}: give LABEL=PATH/model.onnx of an existing export")
        out.append((label.strip(), path))
    return out


def also_notes(also: list[tuple[str, str]]) -> dict:
    """Each extra export's own verification against its PyTorch model (verification.json beside it)."""
    import json

    notes = {}
    for label, path in also:
        ver = Path(path).with_name("verification.json")
        spec = Path(path).with_name("model.json")
        entry = {"path": path}
        if spec.is_file():
            meta = json.loads(spec.read_text())
            entry.update(preset=meta.get("preset"), precision=meta.get("precision"))
        if ver.is_file():
            v = json.loads(ver.read_text())
            entry.update(verification_passed=v.get("passed"), verification_images=v.get("images"))
        notes[label] = entry
    return notes


def _parity(value: float) -> str:
    return "own export's (below)" if value != value else f"{value:.1e}"  # NaN: another model


def markdown(result: dict) -> str:
    lines = [
        "# FP32 ONNX Runtime speed levers (CPU)",
        "",
        f"Reproduce: `{result['command']}`",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}; onnxruntime "
        f"{result['versions']['onnxruntime']}, torch {result['versions']['torch']}; {result['threads']} intra-op "
        f"threads. Load average (1 min) during the timings: {result['load_range'][0]:.1f} .. "
        f"{result['load_range'][1]:.1f} (the machine is shared; ratios come from interleaved blocks in one process).",
        "",
        "Every row runs with ONNX Runtime's intra-op thread spinning OFF (the runtime's default) except the rows "
        "that say otherwise. Speed-up = throughput / the reference's in the same run (wall clock); CPU-time speed-up = reference CPU ms per "
        "image / the variant's (process CPU time, all threads: less sensitive to other processes, but it counts "
        "spin-waiting). Parity = max |diff| of map and score vs the PyTorch FP32 model on the same batch, over the "
        "reference map range (verification bound for FP32: 1e-4). p50 ms is per call; the streams row at batch 1 "
        "takes 2 frames per call (one per stream), so its p50 is each frame's latency and its img/s counts both.",
        "",
        *(
            [
                f"**{result['background_load']} busy-looping processes ran beside the timings** (other work that "
                "wants the cores).",
                "",
            ]
            if result.get("background_load")
            else []
        ),
        *(
            [
                f"Each figure is the median over {result['rounds']} rounds of the whole interleaved timing; the "
                "range column gives the lowest and highest speed-up of the rounds.",
                "",
            ]
            if result.get("rounds", 1) > 1
            else []
        ),
        "| variant | batch | p50 ms | img/s | speed-up | range | CPU ms p50 | CPU-time speed-up | parity | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lo, hi = r.get("speedup_range", [r["speedup"], r["speedup"]])
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.1f} | {r['ips']:.2f} | **{r['speedup']:.2f}x** | "
            f"{lo:.2f}-{hi:.2f} | {r['cpu_ms_p50']:.1f} | {r['speedup_cpu_time']:.2f}x | "
            f"{_parity(r['parity_max_rel'])} | {r['n']} |"
        )
    notes = result["notes"]
    lines += [
        "",
        f"What onnxruntime.transformers fuses: {notes['transformer_optimizer_fused_ops']} (no Attention / "
        "MultiHeadAttention: its attention patterns expect BERT-style masks and shared Q/K/V inputs).",
        f"Session creation: fused graph {notes['session_seconds_fused']} s, saved ORT-optimized graph "
        f"{notes['session_seconds_saved_optimized']} s.",
        f"Verification of the fused export (adtr-export, FP32 bound 1e-4): {notes['fused_verification']}.",
        *(
            [f"Other exports timed in the same blocks (speed-up against this run's reference): {notes['also']}."]
            if notes.get("also")
            else []
        ),
        "",
        "Op counts: " + "; ".join(f"{k}: {sum(v.values())} nodes" for k, v in notes["ops"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="trained run folder or checkpoint.pt")
    parser.add_argument("--reference", required=True, help="model.onnx exported by the code before this work")
    parser.add_argument("--pt2", default=None, help="model.pt2 of the same checkpoint, timed too")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another export timed in the same blocks, with and without spinning (e.g. the default preset, an INT8 "
        "export); repeatable; its parity is its own verification.json",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="run N busy-looping processes during the timings (a box whose cores other work wants too)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the interleaved timing; rows give medians and the range"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="time only the reference and these variants (their names as in the table; a focused, longer run)",
    )
    parser.add_argument("--images", default=None, help="glob of real images (default: the checkpoint's test images)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--work", default="/tmp/speed_levers")
    parser.add_argument("--reuse", action="store_true", help="reuse the variants a previous run exported into --work")
    parser.add_argument("--out", default=str(RESULTS / "speed_levers.json"))
    args = parser.parse_args(argv)
    args.also = also_exports(args.also)

    import onnxruntime
    import torch

    from adtr_deploy.export.images import verification_images as collect_images
    from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint
    from adtr_deploy.spec import ModelSpec

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    spec = ModelSpec(input_size=tuple(model.cfg.input_size), preset="custom")
    files, notes = build_variants(args, work, model, spec)
    notes["also"] = also_notes(args.also)
    images, source = collect_images(model.cfg.input_size, verify_images=args.images, checkpoint=ckpt)
    rows = []
    burners = [  # other work on the box: each a process that wants a whole core
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.background_load)
    ]
    try:
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            rows += time_batch_rounds(args, files, images, bs, model)
    finally:
        for p in burners:
            p.kill()
    loads = [r["load_1m_before"] for r in rows] + [r["load_1m_after"] for r in rows]

    result = {
        "command": command_line("speed_levers.py", argv),
        "machine": machine(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "threads": args.threads,
        "rounds": args.rounds,
        "background_load": args.background_load,
        "images": source,
        "load_range": [min(loads), max(loads)],
        "rows": rows,
        "notes": notes,
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
