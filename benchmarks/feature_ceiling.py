"""What the frozen backbone's features can separate at all: a training-free detector over input size, stages and resizing.

ADTR's transformer can only score what its input features tell apart. This script measures that ceiling with the
nearest-neighbour detector (the distance of each test token to the nearest training token of the same category, the
PatchCore/SPADE idea), scored with ADTR's own map upsampling and image score (max of the 16x16 average-pooled map). No
training is involved, so each setting costs one feature pass. Settings vary what the issue asks about:

- input size (the stride-16 grid grows with it: 224 -> 14x14, 320 -> 20x20, 448 -> 28x28),
- which backbone stages are concatenated,
- how finer stages reach the stride-16 grid: `bilinear` (align_corners=True, the paper's and adtr-train's; it samples the
  finer maps) or `area` (average pooling over each grid cell; a diagnostic, not what the model does).

    python benchmarks/feature_ceiling.py --categories grass
    python benchmarks/feature_ceiling.py --categories brick,grass,gravel --settings 224:12345:bilinear,448:12345:bilinear

A setting is SIZE:STAGES:RESIZE. Uses the training split adtr-train uses (its held-out calibration images excluded).
Writes benchmarks/results/feature_ceiling.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import command_line, machine, nearest_training_distance, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_SETTINGS = (
    "224:12345:bilinear,224:123:bilinear,224:234:bilinear,224:12345:area,320:12345:bilinear,448:12345:bilinear"
)


def features(model, samples, size: int, resize: str):
    """(N, C, h, w) backbone features on the stride-16 grid, finer stages brought there by `resize`."""
    import torch
    import torch.nn.functional as F

    from adtr_deploy.data.datasets import image_loader

    grid = model.cfg.grid
    out = []
    with torch.no_grad():
        for batch in image_loader(samples, (size, size), batch_size=16):
            if resize == "bilinear":  # exactly what the model computes
                out.append(model.forward_features(batch["image"]))
                continue
            x = batch["image"].permute(0, 3, 1, 2).float() * model.pixel_scale + model.pixel_shift
            maps = []
            for f in model.backbone.forward_stages(x, model.cfg.stages):
                if f.shape[-1] > grid[1]:
                    maps.append(F.adaptive_avg_pool2d(f, grid))
                else:
                    maps.append(F.interpolate(f, size=grid, mode="bilinear", align_corners=True))
            out.append(torch.cat(maps, dim=1))
    return torch.cat(out)


def ceiling(data, setting: str) -> dict:
    import numpy as np
    import torch.nn.functional as F

    from adtr_deploy.metrics import image_auroc, pixel_auroc
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.preprocess import load_mask
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.trainer import split_validation

    size_s, stages_s, resize = setting.split(":")
    size, stages = int(size_s), tuple(int(c) for c in stages_s)
    if resize not in ("bilinear", "area"):
        raise SystemExit(f"resize {resize!r} is not bilinear or area")
    t0 = time.perf_counter()
    model = ADTR(get_preset("lite0", input_size=(size, size), stages=stages))
    train_idx, _ = split_validation(data.train, TrainConfig(progress=False))
    f_train = features(model, [data.train[i] for i in train_idx], size, resize)
    f_test = features(model, data.test, size, resize)
    dist = nearest_training_distance(f_train, f_test)
    c, h, w = f_train.shape[1:]
    amap = F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=True)
    score = F.avg_pool2d(amap, model.cfg.score_pool, stride=1).amax(dim=(1, 2, 3)).numpy()
    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s.mask, (size, size)) for s in data.test])
    per_defect = {}
    for defect in sorted({s.defect for s in data.test if s.label}):
        sel = np.array([not s.label or s.defect == defect for s in data.test])
        per_defect[defect] = round(image_auroc(score[sel], labels[sel]), 4)
    return {
        "setting": setting,
        "input_size": size,
        "stages": list(stages),
        "resize": resize,
        "channels": c,
        "grid": [h, w],
        "image_auroc": round(image_auroc(score, labels), 4),
        "pixel_auroc": round(pixel_auroc(amap.numpy()[:, 0], masks), 4),
        "per_defect": per_defect,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(r: dict) -> str:
    lines = [
        "# Feature ceiling: nearest-training-token detector on lite0 features (no training)",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        "Setting = input size : stages : how finer stages reach the stride-16 grid (`bilinear` is what ADTR uses).",
        "",
    ]
    for cat, rows in r["categories"].items():
        defects = list(rows[0]["per_defect"])
        lines += [
            f"## {cat}",
            "",
            "| setting | grid | channels | image AUROC | pixel AUROC | " + " | ".join(defects) + " |",
            "|---|---|---|---|---|" + "---|" * len(defects),
        ]
        for row in rows:
            lines.append(
                f"| {row['setting']} | {row['grid'][0]}x{row['grid'][1]} | {row['channels']} "
                f"| {100 * row['image_auroc']:.1f} | {100 * row['pixel_auroc']:.1f} | "
                + " | ".join(f"{100 * row['per_defect'][d]:.1f}" for d in defects)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "adtr_demo_data"), help="demo data folder")
    ap.add_argument("--categories", default="grass")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--out", default=str(HERE / "results" / "feature_ceiling.json"))
    args = ap.parse_args(argv)

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.data.demo import write_demo_dataset

    categories = [c for c in args.categories.split(",") if c]
    root = write_demo_dataset(args.data, tuple(categories))
    result = {
        "command": command_line("feature_ceiling.py", argv),
        "categories": {},
        "machine": machine(),
    }
    for cat in categories:
        data = open_dataset(root, cat)
        result["categories"][cat] = []
        for setting in (s for s in args.settings.split(",") if s):
            row = ceiling(data, setting)
            print(json.dumps({"category": cat, **row}), flush=True)
            result["categories"][cat].append(row)
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
