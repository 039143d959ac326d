"""How the transformer's accuracy grows with optimizer steps on the demo data, for a few training settings.

Answers "why does the default lite0 model fall short": the frozen backbone's features are cached once (the trainer's own
train/features.py cache_features, on the trainer's own training split), then each setting trains a fresh transformer from the same seed
on them and evaluates image and pixel AUROC of the test split every --eval-every steps, with the training-set mean
squared error of the reconstruction beside the error of two references that need no training (per-position mean and
global mean of the training features: a reconstruction that cannot beat the per-position mean has not learned yet).

    python benchmarks/train_budget.py                                  # brick, the settings below, one after another
    python benchmarks/train_budget.py --settings bs16:16:1e-4:0,bs4:4:1e-4:1 --steps 600 --parallel 2   # equal steps

A setting is NAME:BATCH:LR:STANDARDIZE[:STEPS] (STANDARDIZE 1 = the trainer's feature standardization, 0 = the
earlier output bias at the mean feature; STEPS overrides --steps, e.g. to give every setting the same epochs). Every setting uses AdamW (betas 0.9/0.999, weight decay 1e-4), gradient clip 0.1 and the lr
x0.1 after 80% of --steps, as adtr-train does. --parallel N runs N settings at once with 1 thread each.

Writes benchmarks/results/train_budget.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, write_result

HERE = Path(__file__).resolve().parent
# Session 1's defaults and this session's, at the same 30 epochs of the 72 training images (150 and 600 steps).
DEFAULT_SETTINGS = "bs16:16:1e-4:0:150,bs4-std:4:1e-4:1:600"


def features(data_root: Path, category: str, cache: Path):
    """(train features, test features, labels, masks) of the lite0 preset, cached in `cache`."""
    import numpy as np
    import torch

    from adtr_deploy.data.datasets import open_dataset
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.preprocess import load_mask
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import cache_features
    from adtr_deploy.train.trainer import split_validation

    model = ADTR(get_preset("lite0"))
    data = open_dataset(data_root, category)
    if cache.is_file():
        f_train, f_test = torch.load(cache, weights_only=True)
    else:
        cfg = TrainConfig(progress=False)
        train_idx, _ = split_validation(data.train, cfg)
        cpu = torch.device("cpu")
        f_train = cache_features(model, [data.train[i] for i in train_idx], cfg, cpu, progress=False)
        f_test = cache_features(model, data.test, cfg, cpu, progress=False)
        torch.save((f_train, f_test), cache)
    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s.mask, model.cfg.input_size) for s in data.test])
    return model, f_train, f_test, labels, masks


def run_setting(args, setting: str) -> list[dict]:
    import torch

    from adtr_deploy.metrics import image_auroc, pixel_auroc
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import init_feature_standardization

    name, batch, lr, standardize, *rest = setting.split(":")
    batch, lr, standardize = int(batch), float(lr), standardize == "1"
    steps = int(rest[0]) if rest else args.steps
    torch.manual_seed(0)
    model, f_train, f_test, labels, masks = features(Path(args.data), args.category, Path(args.work) / "features.pt")
    if standardize:  # adtr-train's own initialisation
        init_feature_standardization(model, f_train, None, TrainConfig(progress=False), torch.device("cpu"))
    else:  # the earlier initialisation: output bias at the mean training feature
        with torch.no_grad():
            model.transformer.output_proj.bias.copy_(f_train.mean(dim=(0, 2, 3)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4)
    drop = int(round(0.8 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s >= drop else 1.0)
    gen = torch.Generator().manual_seed(0)

    def evaluate(step: int, loss: float, seconds: float) -> dict:
        model.eval()
        with torch.no_grad():
            outs = [model.anomaly_outputs(f, model.reconstruct(f)) for f in f_test.split(16)]
            rec = torch.cat([model.reconstruct(f) for f in f_train.split(16)])
        model.train()
        amap = torch.cat([o[0] for o in outs]).numpy()[:, 0]
        score = torch.cat([o[1] for o in outs]).numpy()
        row = {
            "setting": name,
            "step": step,
            "epochs": round(step * batch / len(f_train), 2),
            "train_loss": round(loss, 4),
            "train_mse": round(float(((rec - f_train) ** 2).mean()), 4),
            "image_auroc": round(image_auroc(score, labels), 4),
            "pixel_auroc": round(pixel_auroc(amap, masks), 4),
            "train_seconds": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        return row

    rows, step, train_s, loss = [], 0, 0.0, float("nan")
    model.train()
    while step < steps:
        for idx in torch.randperm(len(f_train), generator=gen).split(batch):
            t0 = time.perf_counter()
            f = f_train[idx].float()
            out = torch.nn.functional.mse_loss(model.reconstruct(f), f)
            opt.zero_grad()
            out.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            opt.step()
            sched.step()
            train_s += time.perf_counter() - t0
            step, loss = step + 1, out.item()
            if step % args.eval_every == 0 or step == steps:
                rows.append(evaluate(step, loss, train_s))
            if step >= steps:
                break
    return rows


def references(args) -> dict:

    _, f_train, _, _, _ = features(Path(args.data), args.category, Path(args.work) / "features.pt")
    pos_mean = f_train.mean(0, keepdim=True)
    glob_mean = f_train.mean((0, 2, 3), keepdim=True)
    return {
        "per_position_mean": float(((f_train - pos_mean) ** 2).mean()),
        "global_mean": float(((f_train - glob_mean) ** 2).mean()),
        "train_images": int(f_train.shape[0]),
    }


def markdown(r: dict) -> str:
    ref = r["train_mse_references"]
    lines = [
        f"# Accuracy against optimizer steps: lite0 on the demo data, {r['category']}",
        "",
        f"Reproduce: `{r['command']}`",
        "",
        f"{ref['train_images']} training images (the trainer's split); training-set MSE of references that need no "
        f"training: per-position mean {ref['per_position_mean']:.3f}, global mean {ref['global_mean']:.3f}.",
        "Setting = name:batch:lr:standardize[:steps]. lr x0.1 after 80% of the steps. train s = time in optimizer steps "
        "only.",
        "",
        "| setting | step | epochs | train MSE | image AUROC | pixel AUROC | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['setting']} | {row['step']} | {row['epochs']} | {row['train_mse']:.3f} | "
            f"{100 * row['image_auroc']:.1f} | {100 * row['pixel_auroc']:.1f} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "adtr_demo_data"), help="demo data folder")
    ap.add_argument("--category", default="brick")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=1, help="settings run at once (1 thread each when > 1)")
    ap.add_argument("--work", default=None, help="feature cache folder (default: a temp folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "train_budget.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting, print its rows
    args = ap.parse_args(argv)
    args.work = args.work or str(Path(tempfile.gettempdir()) / f"adtr_train_budget_{args.category}")
    Path(args.work).mkdir(parents=True, exist_ok=True)

    if args.one:
        if args.parallel > 1:
            import torch

            torch.set_num_threads(1)
        run_setting(args, args.one)
        return {}

    from adtr_deploy.data.demo import write_demo_dataset

    args.data = str(write_demo_dataset(args.data, (args.category,)))
    refs = references(args)  # also fills the feature cache once, before any setting runs
    settings = [s for s in args.settings.split(",") if s]
    rows: list[dict] = []
    base = [sys.executable, __file__, "--data", args.data, "--category", args.category, "--steps", str(args.steps)]
    base += ["--eval-every", str(args.eval_every), "--parallel", str(args.parallel), "--work", args.work]
    for i in range(0, len(settings), args.parallel):
        group = settings[i : i + args.parallel]
        procs = [subprocess.Popen([*base, "--one", s], stdout=subprocess.PIPE, text=True) for s in group]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"a setting failed (exit {p.returncode})")
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result = {
        "command": command_line("train_budget.py", argv),
        "category": args.category,
        "steps": args.steps,
        "train_mse_references": refs,
        "rows": rows,
        "machine": machine(),
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
