"""The tiled score window (issue 28): the image score of a tiled model is the maximum of its stitched map average-pooled
with an N x N window (`--tile ...,score_pool=N`, default the model's own 16). A 5-pixel pinhole fills a tenth of a
16 x 16 window, so small defects score low: is a smaller window better? Chosen on a VALIDATION split, then the test
split is read once, for the chosen window only.

The model: a tiled run of benchmarks/tiling.py (`--tile native`, or any other scale, in --work, exported to ONNX), scored with ONNX Runtime
(CPU) through the runtime's own tiling (adtr_deploy/tiling.py run_tiled). The window is applied to the stitched map
after the model, so every window is measured on the same maps (one pass per image).

- Calibration, per window: the run's held-out calibration images (checkpoint info `calibration_images`) and the
  synthetic defects adtr-train draws on them (data/validation.synthetic_defects, the run's seed), through
  calibration.calibrate with the run's threshold margin: what adtr-train would have stored with that window.
- Validation split: images the model never saw, made as the large demo makes its training images (the photograph's
  training columns, data/demo_large.make_large_sample with seed --val-seed, which no training or test image uses):
  --val-good good images and --val-per-defect images of each of the demo's small defects (scratch, pinhole, stain,
  3-24 px, data/demo_large.DEFECTS) drawn on further such images, with exact masks; no test-column pixel.
- Per window: image AUROC per defect size band (each band's defects against all good validation images), and at the
  window's calibrated threshold the good images flagged (false alarms) and the defects found.
- The choice, fixed before measuring: the window with the highest mean of the three bands' image AUROC among those
  whose validation false alarms do not exceed window 16's; within 0.5 points, the larger window.
- Test: the test split of the large demo set, scored once with the chosen window (its pixel metrics do not depend on
  the window: benchmarks/results/tiling.md).

    python benchmarks/tiling_score_window.py --work /tmp/adtr-tiling --category brick \
        --out benchmarks/results/tiling_score_window.json

Writes OUT (JSON) and OUT with .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adtr_deploy.bench.studies import command_line, machine, pct, write_result
from adtr_deploy.calibration import calibrate
from adtr_deploy.data.demo_large import DEFECTS, SIZE_BANDS, SIZES_NAME, make_large_sample, mask_size
from adtr_deploy.data.layout import open_dataset
from adtr_deploy.data.validation import synthetic_defects
from adtr_deploy.metrics import image_auroc
from adtr_deploy.preprocess import read_image
from adtr_deploy.runtime import Inferencer
from adtr_deploy.tiling import TILE_BATCH, from_spec, pooled_max, run_tiled

WINDOWS = (16, 8, 4, 2, 1)
TIE = 0.005  # AUROC within half a point: the larger window (a smoother score)


class Scorer:
    """Raw stitched maps of the exported tiled model; scores for every window from one map."""

    def __init__(self, model: Path, windows: tuple[int, ...]):
        self.inf = Inferencer(model)
        self.tiling = from_spec(self.inf.spec)
        self.windows = windows
        self.batch = min(TILE_BATCH, self.inf.backend.max_batch or TILE_BATCH)
        self.seconds = 0.0

    def scores(self, image: np.ndarray) -> dict[int, float]:
        t0 = time.perf_counter()
        amap, _ = run_tiled(self.inf.backend.run, image, self.tiling, self.batch)
        out = {n: pooled_max(amap, n) for n in self.windows}
        self.seconds += time.perf_counter() - t0
        return out


def by_window(rows: list[dict[int, float]], windows) -> dict[int, np.ndarray]:
    return {n: np.asarray([r[n] for r in rows], dtype=np.float64) for n in windows}


def calibrations(scorer: Scorer, run_dir: Path) -> dict[int, dict]:
    from adtr_deploy.model.checkpoint import read_checkpoint

    info = read_checkpoint(run_dir / "checkpoint.pt")["info"]
    images = [read_image(p) for p in info["calibration_images"]]
    good = by_window([scorer.scores(im) for im in images], scorer.windows)
    defects = by_window([scorer.scores(im) for im in synthetic_defects(images, info["train"]["seed"])], scorer.windows)
    margin = float(info["train"]["threshold_margin"])
    out = {}
    for n in scorer.windows:
        cal = calibrate(good[n], None, defect_scores=defects[n], margin=margin)
        out[n] = {"threshold": cal.threshold, "good_max": cal.score_max, "method": cal.method}
    return out | {"images": len(images), "synthetic_defects": len(images) * 3, "margin": margin}


def validation_images(category: str, seed: int, n_good: int, n_defect: int):
    """(image, label, defect size px) of the validation split: training columns, seed `seed`."""
    for i in range(n_good):
        yield make_large_sample(category, "train", i, seed=seed)[0], 0, 0
    for kind in DEFECTS:
        for i in range(n_defect):
            image, mask = make_large_sample(category, kind, i, seed=seed, columns="train")
            yield image, 1, mask_size(mask)


def split_test_images(data: Path, category: str):
    ds = open_dataset(data, category)
    sizes = json.loads((data / category / SIZES_NAME).read_text())
    for s in ds.test:
        yield read_image(s.path), int(s.label), sizes.get(Path(s.path).relative_to(data / category).as_posix(), 0)


def band_table(scores: np.ndarray, labels: np.ndarray, sizes: np.ndarray, threshold: float) -> dict:
    good = labels == 0
    row = {"false_alarms": int((scores[good] > threshold).sum()), "good_images": int(good.sum())}
    for lo, hi, band in ((1, 10**9, "all"), *SIZE_BANDS):
        sel = good | ((labels == 1) & (sizes >= max(lo, 1)) & (sizes < hi))
        n = int((labels[sel] == 1).sum())
        found = int((scores[sel & (labels == 1)] > threshold).sum())
        auroc = image_auroc(scores[sel], labels[sel]) if n else None
        row[band] = {"defects": n, "image_auroc": auroc, "found": found}
    return row


def choose(val: dict[int, dict]) -> int:
    def mean_band(n: int) -> float:
        return float(np.mean([a for _, _, b in SIZE_BANDS if (a := val[n][b]["image_auroc"]) is not None]))

    allowed = [n for n in val if val[n]["false_alarms"] <= val[16]["false_alarms"]] if 16 in val else list(val)
    best = max(mean_band(n) for n in allowed)
    return max(n for n in allowed if mean_band(n) >= best - TIE)


def markdown(r: dict) -> str:
    bands = ["all", *[b for _, _, b in SIZE_BANDS]]
    v = r["validation"]
    lines = [
        f"# The tiled score window, chosen on validation ({r['category']}, issue 28)",
        "",
        f"`{r['command']}`",
        "",
        f"Model: {r['model']} (`--tile {r.get('tiling', {}).get('scale', 1):g}`, lite0). Validation: {v['good_images']} good and {v['defects']} "
        f"defective images (scratch, pinhole, stain) made from the photograph's training columns with seed "
        f"{r['val_seed']}, never seen in training. Thresholds: each window calibrated on the run's "
        f"{r['calibration']['images']} calibration images and their {r['calibration']['synthetic_defects']} synthetic "
        f"defects (margin {r['calibration']['margin']:g}). Image AUROC % per band (defects found / in the band at the "
        "threshold); false alarms: good images above the threshold.",
        "",
        "| split | window | " + " | ".join(bands) + " | false alarms | threshold |",
        "|---|---|" + "---|" * len(bands) + "---|---|",
    ]

    def row(split: str, n: int, t: dict, threshold: float) -> str:
        cells = " | ".join(f"{pct(t[b]['image_auroc'])} ({t[b]['found']}/{t[b]['defects']})" for b in bands)
        return f"| {split} | {n} | {cells} | {t['false_alarms']}/{t['good_images']} | {threshold:.3f} |"

    for n, t in v["windows"].items():
        lines.append(row("validation", n, t, r["calibration"]["windows"][n]["threshold"]))
    c = r["chosen"]
    if "test" in r:
        lines.append(row("**test**", c, r["test"], r["calibration"]["windows"][c]["threshold"]))
    lines += [
        "",
        f"Chosen on validation: window {c} (rule: highest mean of the three bands' image AUROC among the windows with "
        "no more validation false alarms than 16; within 0.5 points the larger window). "
        + (
            f"The test split was scored once, with window {c} only. "
            if "test" in r
            else "The test split was not read. "
        )
        + f"Scoring: {r['seconds_per_image']:.2f} s per 1024-pixel image (ONNX Runtime CPU, every window from one "
        "stitched map).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/adtr-tiling"), help="benchmarks/tiling.py's --work")
    p.add_argument("--category", default="brick")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tiling_score_window.json"))
    p.add_argument("--windows", default=",".join(map(str, WINDOWS)))
    p.add_argument("--val-seed", type=int, default=1, help="the validation images' seed (the demo set uses 0)")
    p.add_argument("--val-good", type=int, default=16)
    p.add_argument("--val-per-defect", type=int, default=12)
    p.add_argument("--no-test", action="store_true", help="validation only (a smoke run must not read the test split)")
    args = p.parse_args(argv)
    windows = tuple(int(w) for w in args.windows.split(","))
    run_dir = args.work / "runs" / f"{args.category}-tiled"
    scorer = Scorer(run_dir / "export" / "model.onnx", windows)
    result = {"command": command_line("tiling_score_window.py", argv), "category": args.category}
    result |= {"model": str(run_dir), "val_seed": args.val_seed, "windows": list(windows)}
    result["tiling"] = scorer.tiling.to_dict()
    result["calibration"] = cal = calibrations(scorer, run_dir)
    cal["windows"] = {n: cal.pop(n) for n in windows}

    def measure(images, ns) -> tuple[dict, int]:
        rows, labels, sizes = [], [], []
        for image, label, size in images:
            s = scorer.scores(image)
            rows.append({n: s[n] for n in ns})
            labels.append(label)
            sizes.append(size)
        scores, lab, sz = by_window(rows, ns), np.asarray(labels), np.asarray(sizes)
        return {n: band_table(scores[n], lab, sz, cal["windows"][n]["threshold"]) for n in ns}, len(rows)

    val, count = measure(validation_images(args.category, args.val_seed, args.val_good, args.val_per_defect), windows)
    result["validation"] = {"good_images": args.val_good, "defects": 3 * args.val_per_defect, "windows": val}
    result["chosen"] = chosen = choose(val)
    n_test = 0
    if not args.no_test:
        test, n_test = measure(split_test_images(args.work / "data", args.category), (chosen,))
        result["test"] = test[chosen]
    result["seconds_per_image"] = scorer.seconds / (count + n_test + 4 * cal["images"])
    result["machine"] = machine(windows=list(windows))
    scorer.inf.close()
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
