"""Which levers make ADTR good on irregular textures: one table of variants against the nearest-neighbour reference.

Each variant is an ADTR model (the transformer with the auxiliary query reconstructs the frozen backbone's multi-scale
features; the reconstruction error is the map) that differs from today's default in one or more levers: the token grid
(feature stride), input size, how finer stages reach the grid (area averaging vs bilinear sampling), which stages, local
neighbourhood aggregation of the features, map smoothing, the backbone, the transformer's size, optimizer steps. For every
variant and category the script reports image / pixel AUROC, PRO and per-defect image AUROC of

- the trained transformer, trained by adtr-train's own epoch (adtr_deploy/train/loop.py `run_epoch` with the
  trainer's optimizer: AdamW, the lr-drop scheduler, grad clipping, AMP on CUDA; cached features and per-channel
  standardization; the training split without adtr-train's held-out calibration images), and
- the training-free nearest-neighbour detector on the very same features (each test token's distance to the nearest
  training token, the PatchCore/SPADE idea), scored with the same upsampling, smoothing and image score: the reference
  column the transformer should reach.

    python benchmarks/quality_levers.py --data /tmp/demo --validation --categories grass --variants default,area,s8
    python benchmarks/quality_levers.py --data /tmp/demo --categories grass --variants area   # the chosen one, on test

--validation scores on the validation split of adtr_deploy/data/validation.py (held-out TRAINING good images with
synthetic defects; the models train on the rest), where levers are chosen (docs/train.md, "Protocol"); without it the
real test split is scored: report that only for the chosen setting. Result tables recorded before 2026-12-03 were
made on the test split, with an in-script epoch loop (no scheduler object, no AMP).

Writes benchmarks/results/quality_levers.json and .md (or --out); with --append, rows are added to an existing result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from adtr_deploy.bench.studies import command_line, machine, nearest_training_distance, pct, score_tokens, write_result

HERE = Path(__file__).resolve().parent

# name -> (model overrides on the lite0-classic preset, training overrides). "default" is the model adtr-train trained
# before this study (lite0-classic: 14x14 tokens, stages 1-5 bilinear, no aggregation, no smoothing, 30 epochs);
# "area-1234" is today's default lite0.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "blur4": ({"blur_sigma": 4.0}, {}),
    "area": ({"resize": "area"}, {}),
    "area-agg3": ({"resize": "area", "aggregate": 3}, {}),
    "area-agg3-blur4": ({"resize": "area", "aggregate": 3, "blur_sigma": 4.0}, {}),
    "area-123": ({"resize": "area", "stages": (1, 2, 3)}, {}),
    "area-1234": ({"resize": "area", "stages": (1, 2, 3, 4)}, {}),
    # today's default lite0: area-1234 with the Mahalanobis reconstruction error (results/scoring_levers.md)
    "lite0": ({"resize": "area", "stages": (1, 2, 3, 4), "error_metric": "mahalanobis"}, {}),
    # lite0 with 3x3 zero-padded local averaging and border standardization of the error (the default since then)
    "lite0-agg3z-ring3": (
        {
            "resize": "area",
            "stages": (1, 2, 3, 4),
            "error_metric": "mahalanobis",
            "aggregate": 3,
            "aggregate_padding": "zeros",
            "border_rings": 3,
        },
        {},
    ),
    "s8": ({"feature_stride": 8}, {}),
    "s8-area": ({"feature_stride": 8, "resize": "area"}, {}),
    "s8-area-agg3-blur4": ({"feature_stride": 8, "resize": "area", "aggregate": 3, "blur_sigma": 4.0}, {}),
    "s8-34-agg3-blur4": (
        {"feature_stride": 8, "resize": "area", "aggregate": 3, "blur_sigma": 4.0, "stages": (3, 4)},
        {},
    ),
    "s8-area-agg3-blur4-234": (
        {"feature_stride": 8, "resize": "area", "aggregate": 3, "blur_sigma": 4.0, "stages": (2, 3, 4)},
        {},
    ),
}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """NAME from VARIANTS, or NAME+key=value+... adding overrides (e.g. s8-area+epochs=60+d_model=128)."""
    name, *extra = text.split("+")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    model_over, train_over = dict(VARIANTS[name][0]), dict(VARIANTS[name][1])
    for item in extra:
        key, _, value = item.partition("=")
        if key in ("epochs", "lr", "batch_size"):
            train_over[key] = float(value) if key == "lr" else int(value)
        elif key == "stages":
            model_over[key] = tuple(int(c) for c in value)
        elif key == "input_size":
            model_over[key] = (int(value), int(value))
        elif key == "backbone":
            model_over[key] = value
        elif key in ("resize", "error_metric", "aggregate_padding"):
            model_over[key] = value
        elif key in ("blur_sigma", "dropout", "error_shrink"):
            model_over[key] = float(value)
        else:
            model_over[key] = int(value)
    return text, model_over, train_over


def _features(model, samples):
    import torch

    from adtr_deploy.data.datasets import image_loader

    with torch.no_grad():
        return torch.cat(
            [model.forward_features(b["image"]) for b in image_loader(samples, model.cfg.input_size, batch_size=16)]
        )


def _metrics(samples, amap, score, masks) -> dict:
    import numpy as np

    from adtr_deploy.metrics import image_auroc, pixel_auroc, pro_score

    labels = np.array([s.label for s in samples])
    per_defect = {}
    for defect in sorted({s.defect for s in samples if s.label}):
        sel = np.array([not s.label or s.defect == defect for s in samples])
        dsel = np.array([s.defect == defect for s in samples])
        per_defect[defect] = {
            "image_auroc": round(image_auroc(score[sel], labels[sel]), 4),
            # pixel AUROC over the good images plus this defect's images
            "pixel_auroc": round(pixel_auroc(amap[sel], masks[sel]), 4) if dsel.any() else None,
        }
    return {
        "image_auroc": round(image_auroc(score, labels), 4),
        "pixel_auroc": round(pixel_auroc(amap, masks), 4),
        "pro": round(pro_score(amap[:, None], masks[:, None]), 4),
        "per_defect": per_defect,
    }


def train_transformer(model, f_train, train_over: dict, seed: int = 0) -> dict:
    """Train the transformer on cached features with adtr-train's own code (feature standardization, the trainer's
    optimizer, train/loop.py's epoch); returns timing and the final loss."""
    import torch

    from adtr_deploy.train import distributed
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import TrainingSet, init_feature_standardization
    from adtr_deploy.train.loop import run_epoch
    from adtr_deploy.train.losses import loss_for
    from adtr_deploy.train.trainer import _optimizer

    cfg = TrainConfig(progress=False, **train_over)
    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    init_feature_standardization(model, f_train, None, cfg, cpu)
    optim, _ = _optimizer(model, cfg, cpu, None, Path("."))
    # the cache supplies every batch; the sample list only gives the epoch its length
    data = TrainingSet([None] * len(f_train), [], f_train)
    t0 = time.perf_counter()
    records = [
        run_epoch(epoch, model, data, optim, loss_for(cfg), None, cfg, cpu, distributed.world())
        for epoch in range(1, cfg.epochs + 1)
    ]
    model.eval()
    return {
        "epochs": cfg.epochs,
        "steps": cfg.epochs * -(-len(f_train) // cfg.batch_size),
        "train_minutes": round((time.perf_counter() - t0) / 60, 2),
        "final_loss": round(records[-1]["loss"], 4),
    }


def run_variant(data, text: str, feature_cache: dict, skip_train: bool = False, save: Path | None = None) -> dict:
    import numpy as np
    import torch

    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.preprocess import load_mask
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import TrainingSet, fit_error_metric
    from adtr_deploy.train.trainer import split_validation

    name, model_over, train_over = parse_variant(text)
    torch.manual_seed(0)
    model = ADTR(get_preset("lite0-classic", **model_over)).eval()
    cfg = model.cfg
    key = (
        cfg.backbone,
        cfg.input_size,
        cfg.stages,
        cfg.feature_stride,
        cfg.resize,
        cfg.aggregate,
        cfg.aggregate_padding,
    )
    t0 = time.perf_counter()
    if key not in feature_cache:
        train_idx, _ = split_validation(data.train, TrainConfig(progress=False))
        feature_cache[key] = (_features(model, [data.train[i] for i in train_idx]), _features(model, data.test))
    f_train, f_test = feature_cache[key]
    masks = np.stack([load_mask(s.mask, cfg.input_size) for s in data.test]).astype(bool)
    knn_map, knn_score = score_tokens(model, nearest_training_distance(f_train, f_test))
    row = {
        "variant": name,
        "grid": list(cfg.grid),
        "channels": int(f_train.shape[1]),
        "knn": _metrics(data.test, knn_map, knn_score, masks),
        "feature_seconds": round(time.perf_counter() - t0, 1),
    }
    if skip_train:
        return row
    row["train"] = train_transformer(model, f_train, train_over)
    fit_error_metric(model, TrainingSet([], [], f_train), TrainConfig(progress=False), torch.device("cpu"))
    if save is not None:  # the trained transformer, for post-hoc scoring studies
        save.mkdir(parents=True, exist_ok=True)
        state = {"config": cfg.to_dict(), "train": train_over, "transformer": model.transformer.state_dict()}
        torch.save(state, save / f"{data.category}__{name}.pt")
    with torch.no_grad():
        err = torch.cat([model.token_errors(f, model.reconstruct(f)) for f in f_test.split(8)])
    amap, score = score_tokens(model, err)
    row["adtr"] = _metrics(data.test, amap, score, masks)
    try:
        row["gflop_per_image"] = round(_gflops(model), 2)
    except Exception as exc:  # a figure for the table, never worth losing the trained row over
        print(f"FLOP count failed: {exc}", flush=True)
    return row


def _gflops(model) -> float:
    """Counted forward FLOPs of one image (torch's FlopCounter): the runtime cost that scales with the variant."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *model.cfg.input_size, 3), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:  # not under no_grad: its hooks need autograd
        model(x)
    return counter.get_total_flops() / 1e9


def markdown(r: dict) -> str:
    lines = [
        "# Detection-quality levers: the trained transformer beside the nearest-neighbour detector on the same features",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        "Each cell: ADTR (trained transformer) / kNN (nearest training token on the same features). Image AUROC, pixel",
        "AUROC, PRO (FPR <= 0.3) in %, then per-defect image AUROC (ADTR). `train min` = transformer training on the",
        f"cached features ({r['machine']['cpus']} CPUs, load {r['machine']['loadavg_1m_at_end']:.1f} at the end).",
        "The `lite0` variants (today's default) score the transformer with the Mahalanobis error, the others with the",
        "paper's L2 error (the same trained weights scored both ways: scoring_levers.md).",
        "",
    ]
    for cat, rows in r["categories"].items():
        defects = list(rows[0]["knn"]["per_defect"])
        lines += [
            f"## {cat}",
            "",
            "| variant | grid | GFLOP | steps | train min | image | pixel | PRO | " + " | ".join(defects) + " |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(defects),
        ]
        for row in rows:
            a, k = row.get("adtr"), row["knn"]
            t = row.get("train", {})

            def cell(key: str, a=a, k=k) -> str:
                return f"{pct(a[key]) if a else '-'} / {pct(k[key])}"

            lines.append(
                f"| {row['variant']} | {row['grid'][0]}x{row['grid'][1]} | {row.get('gflop_per_image', '-')} "
                f"| {t.get('steps', '-')} | {t.get('train_minutes', '-')} "
                f"| {cell('image_auroc')} | {cell('pixel_auroc')} | {cell('pro')} | "
                + " | ".join(
                    f"{pct(a['per_defect'][d]['image_auroc']) if a else '-'} / {pct(k['per_defect'][d]['image_auroc'])}"
                    for d in defects
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "adtr_demo_data"), help="data folder")
    ap.add_argument("--set", choices=("demo", "eval"), default="demo", help="which built-in set to write into --data")
    ap.add_argument("--categories", default="")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--knn-only", action="store_true", help="only the nearest-neighbour reference (no training)")
    ap.add_argument(
        "--validation", action="store_true", help="score the validation split (choose levers here), not the test split"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "quality_levers.json"))
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out")
    ap.add_argument("--save", default="", help="folder to keep each trained transformer in (for scoring studies)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (two 1-thread runs use 2 cores best)")
    args = ap.parse_args(argv)

    import torch

    from adtr_deploy.data import demo
    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.data.demo_synth import DEMO_CATEGORIES, EVAL_CATEGORIES

    torch.set_num_threads(max(1, args.threads))
    default_cats = DEMO_CATEGORIES if args.set == "demo" else EVAL_CATEGORIES
    categories = [c for c in args.categories.split(",") if c] or list(default_cats)
    root = demo.write_demo_dataset(args.data, tuple(categories))
    if args.validation:  # held-out training images with synthetic defects; the test split is never read
        from adtr_deploy.data.validation import write_validation_root

        root = write_validation_root(root, categories, Path(args.data).with_name(Path(args.data).name + "-validation"))
    out = Path(args.out)
    result = {"command": command_line("quality_levers.py", argv), "categories": {}}
    if args.append and out.exists():
        result = json.loads(out.read_text())
        result["command"] += " ; " + command_line("quality_levers.py", argv)
    for cat in categories:
        data = open_dataset(root, cat)
        cache: dict = {}
        rows = result["categories"].setdefault(cat, [])
        for variant in (v for v in args.variants.split(",") if v):
            row = run_variant(data, variant, cache, args.knn_only, Path(args.save) if args.save else None)
            print(json.dumps({"category": cat, **row}), flush=True)
            rows[:] = [r for r in rows if r["variant"] != row["variant"]] + [row]
            result["machine"] = machine()
            write_result(result, out, markdown)  # after every row: a long run keeps what it measured
    return result


if __name__ == "__main__":
    main()
