"""How the trained transformer's reconstruction error becomes a map and a score: post-hoc levers on saved models.

quality_levers.py --save DIR keeps each trained transformer; this script reloads them and scores the same residuals
(feature minus reconstruction, per token) in several ways, beside the nearest-neighbour reference on the same features:

- raw:        L2 norm of the residual in the backbone's units (the paper's; what the model did before)
- std:        L2 norm of the residual divided per channel by the training features' std (every channel counts alike)
- whiten:     L2 norm of the residual divided per channel by its RMS on the training images (the error each channel
              typically makes on good data): a channel the transformer cannot reconstruct well on good images no
              longer drowns the channels it reconstructs closely
- whiten-val: the same with the RMS from the held-out calibration images (never trained on)
- center:     whiten, with the residual's per-channel mean on the training images subtracted first
- mahaS:       the model's error_metric "mahalanobis" (ADTR.token_errors): the residual's norm under its mean and full
              channel covariance on the training images, S times the mean variance added to the diagonal (error_shrink;
              0.001 without S, the default): correlated channels count once
- featmahaS:  reference without the transformer: the same Mahalanobis norm of the features themselves
- ...+poolK:  image score = max of the map average-pooled with a K x K window (default: the config's score_pool)
- ...+blurS:  Gaussian smoothing of the map with sigma S pixels
- ...+edgeK:  image score over the map without its outer K token rings (a diagnostic: are good images' maxima at
              the border?); the pixel map is unchanged
- ...+ring / +pos: each token's error standardized by the mean and std of the training images' errors at the same
              distance to the border (ring: outer rings 0, 1, 2 and the interior) or the same position (pos)

    python benchmarks/scoring_levers.py --data /tmp/demo --models /tmp/q13/models --out benchmarks/results/scoring_levers.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    command_line,
    gaussian_distance,
    machine,
    nearest_training_distance,
    standardize_by_ring,
    write_result,
)
from quality_levers import _features, _metrics, _pct

HERE = Path(__file__).resolve().parent


def _residuals(model, feats):
    import torch

    with torch.no_grad():
        return torch.cat([f - model.reconstruct(f) for f in feats.split(8)])


def _standardize(err, err_train, by: str):
    """Token errors standardized by the training images' errors at the same ring or position."""
    if by == "pos":
        return (err - err_train.mean(dim=0)) / (err_train.std(dim=0) + 1e-6)
    return standardize_by_ring(err, err_train)


def _score(model, err, blur: float, pool: int, edge: int = 0):
    """(N, 1, h, w) token errors -> map (N, H, W) and image score, as ADTR.map_and_score with blur/pool overridden."""
    import torch.nn.functional as F

    from adtr_deploy.model.adtr import gaussian_kernel

    amap = F.interpolate(err, size=model.cfg.input_size, mode="bilinear", align_corners=True)
    if blur > 0:
        k = gaussian_kernel(blur)
        pad = k.shape[-1] // 2
        amap = F.conv2d(F.pad(amap, (pad, pad, pad, pad), mode="replicate"), k)
    pooled = F.avg_pool2d(amap, pool, stride=1)
    if edge:
        cut = edge * model.cfg.input_size[0] // err.shape[-2]
        pooled = pooled[..., cut:-cut, cut:-cut]
    score = pooled.amax(dim=(1, 2, 3))
    return amap[:, 0].numpy(), score.numpy()


def run_model(data, path: Path, scorings: list[str]) -> dict:
    import numpy as np
    import torch

    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import ADTRConfig
    from adtr_deploy.preprocess import load_mask
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.trainer import split_validation

    state = torch.load(path, map_location="cpu")
    cfg = ADTRConfig.from_dict({**state["config"], "error_metric": "mahalanobis"})  # buffers for the maha rows
    torch.manual_seed(0)
    model = ADTR(cfg).eval()
    model.transformer.load_state_dict(state["transformer"])
    train_idx, val_idx = split_validation(data.train, TrainConfig(progress=False))
    t0 = time.perf_counter()
    f_train = _features(model, [data.train[i] for i in train_idx])
    f_val = _features(model, [data.train[i] for i in val_idx])
    f_test = _features(model, data.test)
    masks = np.stack([load_mask(s.mask, cfg.input_size) for s in data.test]).astype(bool)
    r_train, r_val, r_test = _residuals(model, f_train), _residuals(model, f_val), _residuals(model, f_test)
    scales = {
        "raw": torch.ones(f_train.shape[1]),
        "std": model.transformer.feature_std,
        "whiten": r_train.pow(2).mean(dim=(0, 2, 3)).sqrt(),
        "whiten-val": r_val.pow(2).mean(dim=(0, 2, 3)).sqrt(),
    }

    flat = r_train.permute(0, 2, 3, 1).reshape(-1, r_train.shape[1]).double()
    residual_stats = flat.mean(dim=0), torch.cov(flat.T, correction=0)  # as train/features.py fit_error_metric
    knn = nearest_training_distance(f_train, f_test)
    row = {"model": path.stem, "feature_seconds": round(time.perf_counter() - t0, 1), "scorings": {}}
    row["knn"] = _metrics(data.test, *_score(model, knn, cfg.blur_sigma, cfg.score_pool), masks)
    for text in scorings:
        base, *mods = text.split("+")
        blur, pool, edge, standardize = cfg.blur_sigma, cfg.score_pool, 0, None
        for m in mods:
            if m.startswith("pool"):
                pool = int(m[4:])
            elif m.startswith("blur"):
                blur = float(m[4:])
            elif m.startswith("edge"):
                edge = int(m[4:])
            elif m in ("ring", "pos"):
                standardize = m
            else:
                raise SystemExit(f"unknown scoring modifier {m!r} in {text!r}")
        if base.startswith("maha"):  # the model's own code: ADTR.set_error_statistics + token_errors
            model.set_error_statistics(*residual_stats, shrink=float(base[4:] or 0.001))
            err = model.token_errors(r_test, torch.zeros_like(r_test))
        elif base.startswith("featmaha"):  # no transformer: the features' own Gaussian (PaDiM without positions)
            err = gaussian_distance(f_train, f_test, float(base[8:] or 0.001))
        elif base == "center":
            z = (r_test - residual_stats[0].float().view(1, -1, 1, 1)) / scales["whiten"].view(1, -1, 1, 1)
            err = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        else:
            err = torch.linalg.vector_norm(r_test / scales[base].view(1, -1, 1, 1), dim=1, keepdim=True)
        if standardize:
            if not base.startswith("maha"):
                raise SystemExit(f"+{standardize} is defined for the maha scorings only, not {text!r}")
            err_train = model.token_errors(r_train, torch.zeros_like(r_train))  # under the same statistics
            err = _standardize(err, err_train, standardize)
        row["scorings"][text] = _metrics(data.test, *_score(model, err, blur, pool, edge), masks)
    return row


def markdown(r: dict) -> str:
    lines = [
        "# Scoring levers: one trained transformer's residuals scored several ways, beside the kNN reference",
        "",
        f"Reproduce: `{r['command']}`, on the transformers that",
        "`python benchmarks/quality_levers.py --threads 1 --data DATA --variants area-1234 --save MODELS` trained and",
        "saved (add `--set eval` for the second set; the training rows are in quality_levers.md / quality_levers_eval.md).",
        "The `maha` row is the default model's error (ADTR.token_errors with error_shrink 0.001).",
        "",
        "Each cell: image AUROC / pixel AUROC / PRO in %; then per-defect image AUROC. kNN = nearest training token on the",
        "same features, scored with the model's own map settings.",
        "",
    ]
    for cat, rows in r["categories"].items():
        for row in rows:
            defects = list(row["knn"]["per_defect"])
            lines += [
                f"## {cat}: {row['model']}",
                "",
                "| scoring | image | pixel | PRO | " + " | ".join(defects) + " |",
                "|---|---|---|---|" + "---|" * len(defects),
            ]
            for name, m in [*row["scorings"].items(), ("kNN reference", row["knn"])]:
                lines.append(
                    f"| {name} | {_pct(m['image_auroc'])} | {_pct(m['pixel_auroc'])} | {_pct(m['pro'])} | "
                    + " | ".join(_pct(m["per_defect"][d]["image_auroc"]) for d in defects)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data folder holding the categories the models were trained on")
    ap.add_argument(
        "--models", required=True, help="folder of CATEGORY__VARIANT.pt files from quality_levers.py --save"
    )
    ap.add_argument("--match", default="", help="only model files whose name contains this")
    ap.add_argument(
        "--scorings",
        default="raw,raw+blur4,std,whiten,whiten-val,center,whiten+pool8,whiten+pool32,maha0.0001,maha,maha0.01,maha0.1,"
        "maha+blur4,maha+pool32,featmaha",
        help="comma-separated scorings (see the module docstring); maha is the default model's",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "scoring_levers.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from adtr_deploy.data.datasets import open_dataset

    torch.set_num_threads(max(1, args.threads))
    result = {"command": command_line("scoring_levers.py", argv), "categories": {}}
    scorings = [s for s in args.scorings.split(",") if s]
    for path in sorted(Path(args.models).glob("*.pt")):
        if args.match not in path.name:
            continue
        cat = path.stem.split("__")[0]
        row = run_model(open_dataset(args.data, cat), path, scorings)
        result["categories"].setdefault(cat, []).append(row)
        result["machine"] = machine()
        write_result(result, args.out, markdown)
    return result


if __name__ == "__main__":
    main()
