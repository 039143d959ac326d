"""Which part of lite0 must stay float32 for OpenVINO's BF16 to pass verification, and what keeping it there costs.

    python benchmarks/openvino_bf16_scope.py --ir EXPORTS/openvino-bf16-unverified/model.xml \
        --reference EXPORTS/onnx-fp32/model.onnx --images VAL/brick/test --work /tmp/bf16scope \
        --out benchmarks/results/openvino_bf16_scope.json

OpenVINO 2026's CPU plugin runs a node in its original precision under INFERENCE_PRECISION_HINT bf16 when the node
carries the `DisablePrecisionConversion` runtime attribute (value "dynamic:f16": ov::disable_conversion(node, f16),
which the plugin's Node reads as keep-original-precision). Python cannot create that attribute (a string put into a
node's rt_info is only a string: the scratch test of session 9 that set "disable_fp16_compression" changed nothing for
that reason), but the IR reader builds it from the layer's <rt_info>: this script writes a copy of the IR with the
attribute on every layer of one group (backbone, transformer, ...), compiles it at bf16, and reports per variant:
how many runtime nodes really ran f32/bf16, the verification rule of the bf16 precision (export/formats.py PRECISIONS:
per-image map correlation with the FP32 ONNX through OpenVINO f32 >= 0.99 for images the FP32 model flags, >= 0.95
for the others, scores within 5 %) on the good images and the first 12 defects of --images, and the batch-1 time
(ms/img, median of `--rounds` blocks, variants interleaved) against OpenVINO f32 of the same IR.

The groups are found by layer name, so --ir must come from the TorchScript-based exporter (`openvino_cpu.py
--exporter torchscript`), whose layers are named by module path (/_blocks.3/..., /transformer/encoder.0/...); the
dynamo exporter's names (node_Conv_936) carry no module, and a group that matches no layer is reported with 0 marked.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEEP = '<attribute name="DisablePrecisionConversion" version="0" value="dynamic:f16" />'
LAYER = re.compile(r'\s*<layer id="\d+" name="([^"]*)" type="([^"]*)"')


def backbone(name: str, kind: str) -> bool:
    return name.startswith(("/_blocks", "/_conv_stem"))


def transformer(name: str, kind: str) -> bool:
    return name.startswith("/transformer")


def early_blocks(name: str, kind: str) -> bool:  # the stride-2..8 stages, at 112 and 56 px
    match = re.match(r"/_blocks\.(\d+)/", name)
    return name.startswith("/_conv_stem") or bool(match and int(match.group(1)) <= 5)


# variant -> the layers kept float32 (name, IR type) -> bool
VARIANTS: dict[str, Callable[[str, str], bool]] = {
    "none (plain bf16)": lambda n, t: False,
    "all layers": lambda n, t: True,
    "backbone": backbone,
    "backbone stages 1-2 (stem and blocks 0-5)": early_blocks,
    "backbone depthwise convolutions": lambda n, t: backbone(n, t) and t == "GroupConvolution",
    "transformer": transformer,
    "all but the transformer": lambda n, t: not transformer(n, t),
    "all but the attention": lambda n, t: "/attn/" not in n,
}


def marked_ir(src: Path, dst: Path, keep: Callable[[str, str], bool]) -> int:
    """A copy of the IR at `src` with the keep-float32 attribute on every layer `keep` selects; returns how many."""
    out, count, pending = [], 0, False
    for line in src.read_text().split("\n"):
        match = LAYER.match(line)
        if match:
            pending = keep(match.group(1), match.group(2)) and not line.rstrip().endswith("/>")
            out.append(line)
            continue
        stripped = line.strip()
        if pending and stripped in ("<rt_info>", "<input>", "<output>"):
            if stripped == "<rt_info>":
                out += [line, "\t\t\t\t" + KEEP]
            else:
                out += ["\t\t\t<rt_info>", "\t\t\t\t" + KEEP, "\t\t\t</rt_info>", line]
            count, pending = count + 1, False
            continue
        out.append(line)
    dst.write_text("\n".join(out))
    shutil.copy(src.with_suffix(".bin"), dst.with_suffix(".bin"))
    return count


def runtime_precisions(compiled) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, prec = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind in ("Convolution", "FullyConnected", "MatMul", "Eltwise", "MVN", "Subgraph"):
            counts.setdefault(kind, {}).setdefault(prec, 0)
            counts[kind][prec] += 1
    return counts


def outputs(compiled, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    request, maps, scores = compiled.create_infer_request(), [], []
    for i in range(0, len(images), 4):
        result = request.infer({0: images[i : i + 4]})
        maps.append(np.array(result[compiled.outputs[0]]))
        scores.append(np.array(result[compiled.outputs[1]]).reshape(-1))
    return np.concatenate(maps), np.concatenate(scores)


def block_ms(compiled, image: np.ndarray, seconds: float) -> float:
    request, n, t0 = compiled.create_infer_request(), 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        request.infer({0: image})
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


def markdown(report: dict) -> str:
    lines = ["# OpenVINO BF16: which layers must stay float32 (issue 27)", "", f"Command: `{report['command']}`", ""]
    lines += [
        f"CPU: {report['cpu']['model']}; flags: {', '.join(report['cpu']['flags'])}; OpenVINO {report['openvino']}."
    ]
    lines += ["", f"Images: {report['images']}; flagged by FP32 (threshold {report['threshold']:.3f}): "]
    lines[-1] += f"{report['flagged']}. Bounds: flagged >= 0.99, unflagged >= 0.95, scores within 5 %."
    lines += [
        "",
        "| layers kept float32 (IR layers marked) | runtime nodes f32 / bf16 | worst flagged | worst unflagged | ",
    ]
    lines[-1] += "worst score | verification | batch 1 ms/img (vs OpenVINO f32) |"
    lines.append("|---|---|---|---|---|---|---|")
    f32 = report["f32_ms"]
    for name, r in report["variants"].items():
        f, b = sum(v.get("f32", 0) for v in r["runtime"].values()), sum(v.get("bf16", 0) for v in r["runtime"].values())
        lines.append(
            f"| {name} ({r['marked']}) | {f} / {b} | {r['worst_flagged']:.4f} | {r['worst_unflagged']:.4f} | "
            f"{100 * r['worst_score_rel']:.1f} % | {'passes' if r['passes'] else 'fails'} | {r['ms']:.1f} "
            f"({f32 / r['ms']:.2f}x) |"
        )
    lines += ["", f"OpenVINO f32 of the same IR: {f32:.1f} ms/img."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    from adtr_deploy.bench.studies import command_line, write_result
    from adtr_deploy.preprocess import IMAGE_SUFFIXES, load_image
    from adtr_deploy.runtime.cpu import cpu_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ir", type=Path, required=True, help="an OpenVINO IR of the model (model.xml)")
    ap.add_argument("--reference", type=Path, required=True, help="the FP32 ONNX export of the same checkpoint")
    ap.add_argument("--images", type=Path, required=True, help="a validation split: good/ and defect folders")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-seconds", type=float, default=1.5)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS / "openvino_bf16_scope.json")
    args = ap.parse_args(argv)
    spec = json.loads(args.reference.with_name("model.json").read_text())
    size, threshold = tuple(spec["input_size"]), float(spec["calibration"]["threshold"])

    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    good = files(args.images / "good")
    defects = [p for d in sorted(args.images.iterdir()) if d.is_dir() and d.name != "good" for p in files(d)][:12]
    images = np.stack([load_image(p, size) for p in good + defects])
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": "1"}
    reference = core.compile_model(
        core.read_model(str(args.reference)), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}
    )
    ref_maps, ref_scores = outputs(reference, images)
    flagged = ref_scores > threshold
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"command": command_line("openvino_bf16_scope.py", argv), "cpu": cpu_info(), "openvino": ov.__version__}
    report.update(images=f"{len(good)} good, {len(defects)} defects", threshold=threshold, flagged=int(flagged.sum()))
    compiled = {
        "f32": core.compile_model(core.read_model(str(args.ir)), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
    }
    report["variants"] = {}
    for i, name in enumerate(args.variants.split(",")):
        path = args.work / f"variant{i}.xml"
        marked = marked_ir(args.ir, path, VARIANTS[name])
        model = core.compile_model(core.read_model(str(path)), "CPU", {**config, "INFERENCE_PRECISION_HINT": "bf16"})
        maps, scores = outputs(model, images)
        corr = np.array([np.corrcoef(maps[j].ravel(), ref_maps[j].ravel())[0, 1] for j in range(len(images))])
        rel = float(np.max(np.abs(scores - ref_scores) / np.abs(ref_scores)))
        worst_f = float(corr[flagged].min()) if flagged.any() else 1.0
        worst_u = float(corr[~flagged].min()) if (~flagged).any() else 1.0
        report["variants"][name] = {
            "marked": marked,
            "runtime": runtime_precisions(model),
            "worst_flagged": worst_f,
            "worst_unflagged": worst_u,
            "worst_score_rel": rel,
            "passes": worst_f >= 0.99 and worst_u >= 0.95 and rel <= 0.05,
        }
        compiled[name] = model
        print(f"{name}: flagged {worst_f:.4f}, unflagged {worst_u:.4f}, score {rel:.3f}", flush=True)
    samples: dict[str, list[float]] = {k: [] for k in compiled}
    for _ in range(args.rounds):
        for k, model in compiled.items():
            samples[k].append(block_ms(model, images[:1], args.block_seconds))
    report["f32_ms"] = float(np.median(samples["f32"]))
    for name in report["variants"]:
        report["variants"][name]["ms"] = float(np.median(samples[name]))
    write_result(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
