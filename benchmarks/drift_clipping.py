"""Why brighter light still moves a standardized model's scores on a pale texture (issue 31): clipping, measured.

The model's per-image input standardization (`input_norm="image"`) undoes any per-channel gain and offset of the
light exactly, except where a brighter light pushes texture past 255. This study separates the two on a trained run
and a line's good parts (never the test split: e.g. `adtr data demo --seed 1` test/good, other parts of the same line):
each image is scored unshifted and after the same gain in four ways,

- `float, no clip`: the gain applied in float, nothing clipped or rounded (what the standardization undoes exactly);
- `float, rounded`: the same rounded to whole levels but not clipped;
- `float, clip 255`: the gain clipped at 255 but not rounded;
- `uint8 (as a camera)`: the drift benchmark's shift (benchmarks/drift.py), clipped and rounded,

and the mean score change is reported in calibration sigmas (model.json `calibration.score_std`) with the share of
pixel values at 255 (adtr_deploy.preprocess.saturated_fraction, what the runtime's drift monitor shows).

Two model-side remedies are previewed on the same trained model (preview only: the model was trained without them,
so only the change between unshifted and shifted is meaningful, not the level):
- `clamp`: every standardized image clamped at 255 / (1 + HEADROOM) in reference units, so that a gain of up to
  1 + HEADROOM clips nothing the clamp has not already flattened;
- `robust`: the image's statistics taken as its per-channel median and median - 10th percentile (untouched by a
  clipped top fifth), mapped onto the training images' average of the same.

    python benchmarks/drift_clipping.py --run RUNS/lite0/tissue --line LINE --category tissue

Writes OUT (JSON) and OUT with .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from adtr_deploy.bench.studies import machine, write_result
from adtr_deploy.data.shifts import apply_shift
from adtr_deploy.preprocess import read_image, resize, saturated_fraction

HEADROOM = 0.2
GAINS = {"bright+15": 1.15, "bright+20": 1.2, "bright-15": 0.85}
WAYS = ("float, no clip", "float, rounded", "float, clip 255", "uint8 (as a camera)")
VARIANTS = ("as trained", "clamp", "robust", "robust + clamp")


def shifted(images: np.ndarray, shift: str, way: str) -> np.ndarray:
    x = images.astype(np.float32) * GAINS[shift]
    if way == "float, no clip":
        return x
    if way == "float, rounded":
        return np.round(x)
    if way == "float, clip 255":
        return np.minimum(x, 255.0)
    return apply_shift(shift, images).astype(np.float32)


def scorer(run: Path, train_images: np.ndarray):
    """score(images float (N, H, W, 3), variant) with the run's model; the variants replace its input standardization."""
    import torch

    from adtr_deploy.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run / "checkpoint.pt")
    model.eval()
    if model.input_ref_mean is None:
        raise SystemExit(f"{run} was trained without input standardization (input_norm 'image'); nothing to study")
    standardize = model.standardize_input

    def robust_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        median = torch.quantile(flat, 0.5, dim=2)[..., None, None]
        return median, median - torch.quantile(flat, 0.1, dim=2)[..., None, None]

    ref = [v.mean(0, keepdim=True) for v in robust_stats(torch.from_numpy(train_images).float().permute(0, 3, 1, 2))]
    variant = {"name": VARIANTS[0]}

    def replaced(x: torch.Tensor) -> torch.Tensor:
        name = variant["name"]
        if name.startswith("robust"):
            median, spread = robust_stats(x)
            z = (x - median) * (ref[1] / torch.maximum(spread, 0.1 * ref[1])) + ref[0]
        else:
            z = standardize(x)
        return torch.minimum(z, torch.tensor(255.0 / (1 + HEADROOM))) if name.endswith("clamp") else z

    model.standardize_input = replaced

    def score(images: np.ndarray, name: str) -> np.ndarray:
        variant["name"] = name
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))[1].numpy()

    return model, score


def markdown(result: dict) -> str:
    lines = [
        "# Clipping, not the light: what a gain does to a standardized model's good scores (benchmarks/drift_clipping.py)",
        "",
        f"Reproduce: `{result['command']}`",
        "",
        f"{result['frames']} good parts of the line (never the test split), run {result['run']}; mean score change "
        f"against the unshifted parts in calibration sigmas (score_std {result['score_std']:.4g}); the share of pixel "
        f"values at 255: unshifted {100 * result['saturated']['none']:.2f} %. {result['seconds']:.0f} s, "
        f"{result['machine']['cpus']} CPUs.",
        "",
        "| shift | how | values at or past 255 | " + " | ".join(VARIANTS) + " |",
        "|---|---|---|" + "---|" * len(VARIANTS),
    ]
    for r in result["rows"]:
        cells = " | ".join(f"{r['shift_sigmas'][v]:+.2f}" for v in VARIANTS)
        lines.append(f"| {r['shift']} | {r['way']} | {100 * r['saturated']:.2f} % | {cells} |")
    lines += [
        "",
        "`as trained` is the model as deployed; `clamp`, `robust` and `robust + clamp` are previews on the same trained "
        "model (only the change from unshifted to shifted means something, not the level).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a training run folder (checkpoint.pt, export_onnx/)")
    parser.add_argument("--line", type=Path, required=True, help="LINE/<category>/test/good: a line's good parts")
    parser.add_argument("--category", required=True)
    parser.add_argument("--train", type=Path, help="the run's training root (ROOT/<category>/train/good), for robust")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_clipping.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    from adtr_deploy.model.checkpoint import read_checkpoint

    ckpt = read_checkpoint(args.run / "checkpoint.pt")
    size = tuple(ckpt["config"]["input_size"])
    line = np.stack([resize(read_image(p), size) for p in sorted((args.line / args.category / "test/good").glob("*"))])
    train_root = args.train or Path(ckpt["info"]["data"]["root"])
    train = np.stack(
        [resize(read_image(p), size) for p in sorted((train_root / args.category / "train/good").glob("*"))[:40]]
    )
    score_std = float(json.loads((args.run / "export_onnx" / "model.json").read_text())["calibration"]["score_std"])
    _, score = scorer(args.run, train)
    base = {v: score(line, v) for v in VARIANTS}
    rows = []
    for shift in GAINS:
        for way in WAYS:
            images = shifted(line, shift, way)
            rows.append(
                {
                    "shift": shift,
                    "way": way,
                    "saturated": float(np.mean(images >= 254.5)),  # values at or past 255, clipped there or not
                    "shift_sigmas": {v: float(np.mean(score(images, v) - base[v]) / score_std) for v in VARIANTS},
                }
            )
    result = {
        "command": "python benchmarks/drift_clipping.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "run": str(args.run),
        "frames": len(line),
        "score_std": score_std,
        "headroom": HEADROOM,
        "saturated": {"none": float(np.mean([saturated_fraction(i, stride=1) for i in line]))},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
