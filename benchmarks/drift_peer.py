"""The same drift, the same protocol, a peer's detector beside ours (issue 31): is a category's failure ours or the data's?

The issue compares the default with a PatchCore-style nearest-neighbour detector that "stayed quiet" under the shifts on
textures outside the repo. This script runs such a detector on the demo categories under exactly the protocol of
benchmarks/drift.py's deployed table, so where the default misses the goal one can see whether a peer does better:

- `patchcore`: PatchCore's recipe on the deployed model's own frozen backbone (the same stages, 3x3 zero-padded local
  aggregation, area pooling to the 14 x 14 token grid), ImageNet normalization only (no input standardization, as
  PatchCore has none); each test token's distance to the nearest token of a memory bank of every token of the training
  images adtr-train trained on (all of them: 72 images x 196 tokens, no coreset needed at this size); the map
  upsampled, blurred and pooled to an image score exactly as the model scores its own error (`ADTR.map_and_score`).
- `patchcore+norm`: the same with our per-image input standardization in front (the deployed model's reference
  statistics): what lever (a) does for a peer.
- `adtr`: the deployed model itself, through the same PyTorch path (the ONNX runtime figures are drift.py's).

Every detector gets its threshold from the same eight calibration images adtr-train held out, by the same rule
(`calibration.calibrate`: max(mean + 3 std, max) of the good scores, lifted 15 % of the way to the 10th percentile of
synthetic defects drawn on those images), and every test image is shifted at the file's resolution before the resize,
as in drift.py. Reported per shift: false alarms, recall, image and pixel AUROC; the goal check is drift.py's.

    python benchmarks/drift_peer.py --runs RUNS/deployed --data DEMO --categories brick,grass,gravel,moon,stars,tissue \\
        --out benchmarks/results/drift_peer.json

RUNS/<category> are adtr-train run folders (checkpoint.pt with its calibration images). Test split: report it only
for a chosen setting (here: the deployed default and a fixed peer recipe; nothing is selected on it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from drift import GOAL_SHIFTS, SHIFTS, cpu_flags, goal_check, load_split  # noqa: E402

from adtr_deploy.bench.machine import machine_info  # noqa: E402
from adtr_deploy.bench.studies import command_line, machine, write_result  # noqa: E402
from adtr_deploy.calibration import calibrate  # noqa: E402
from adtr_deploy.data.mvtec import list_mvtec  # noqa: E402
from adtr_deploy.data.shifts import apply_shift  # noqa: E402
from adtr_deploy.metrics import image_auroc, pixel_auroc  # noqa: E402
from adtr_deploy.preprocess import prepare, read_image  # noqa: E402

DETECTORS = ("adtr", "patchcore", "patchcore+norm")
MARGIN = 0.15


def _features(model, images: list[np.ndarray], standardize: bool, batch: int = 16):
    """uint8 (H, W, 3) images at the model's size -> (N, C, h, w) features, with or without the input standardization."""
    import torch

    ref = model.input_ref_mean
    if not standardize:
        model.input_ref_mean = None  # forward_features skips the standardization when there is no reference
    try:
        with torch.no_grad():
            return torch.cat(
                [
                    model.forward_features(torch.from_numpy(np.stack(images[i : i + batch])))
                    for i in range(0, len(images), batch)
                ]
            )
    finally:
        model.input_ref_mean = ref


class Detector:
    """One detector's per-token scores for uint8 images at the model's size, scored by the model's own map_and_score."""

    def __init__(self, kind: str, model, train_images: list[np.ndarray]):
        self.kind, self.model = kind, model
        self.train_features = None  # the memory bank: every token of every training image
        if kind != "adtr":
            self.train_features = _features(model, train_images, standardize=kind == "patchcore+norm")

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from adtr_deploy.bench.studies import nearest_training_distance, score_tokens

        if self.kind == "adtr":
            with torch.no_grad():
                out = [self.model(torch.from_numpy(np.stack(images[i : i + 16]))) for i in range(0, len(images), 16)]
            return torch.cat([m for m, _ in out])[:, 0].numpy(), torch.cat([s for _, s in out]).numpy()
        f = _features(self.model, images, standardize=self.kind == "patchcore+norm")
        return score_tokens(self.model, nearest_training_distance(self.train_features, f))


def measure(run: Path, data: Path, category: str, shifts: list[str], detectors: list[str]) -> list[dict]:
    from adtr_deploy.data.validation import synthetic_defects
    from adtr_deploy.model.checkpoint import model_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(run / "checkpoint.pt")
    model = model_from_checkpoint(ckpt).eval()
    size = tuple(model.cfg.input_size)
    calib_paths = [str(Path(p).resolve()) for p in ckpt["info"]["calibration_images"]]
    held_out = set(calib_paths)
    train = [s for s in list_mvtec(data, category, "train") if str(Path(s.path).resolve()) not in held_out]
    train_images = [prepare(read_image(s.path), size) for s in train]
    calib = [prepare(read_image(p), size) for p in calib_paths]
    defects = synthetic_defects(calib, seed=0)
    split = load_split(data, category, size)
    good, bad = split.labels == 0, split.labels == 1
    rows = []
    for kind in detectors:
        det = Detector(kind, model, train_images)
        _, good_scores = det(calib)
        _, defect_scores = det(list(defects))
        threshold = calibrate(good_scores, defect_scores=defect_scores, margin=MARGIN).threshold
        for shift in shifts:
            shifted = [prepare(im, size) for im in apply_shift(shift, split.images)]
            maps, scores = det(shifted)
            flagged = scores > threshold
            rows.append(
                {
                    "category": category,
                    "setting": kind,
                    "score": f"margin={MARGIN:g}",
                    "split": "test",
                    "shift": shift,
                    "threshold": float(threshold),
                    "train_images": len(train_images),
                    "calibration_images": len(calib),
                    "false_alarms": float(flagged[good].mean()),
                    "recall": float(flagged[bad].mean()),
                    "image_auroc": float(image_auroc(scores, split.labels)),
                    "pixel_auroc": float(pixel_auroc(maps[:, None], split.masks[:, None])),
                    "good_score_median": float(np.median(scores[good])),
                }
            )
        print(f"{category} {kind}: done", flush=True)
    return rows


def summary(rows: list[dict], goal: dict) -> list[dict]:
    """Per (category, detector): unshifted figures, the worst goal shift, the goal verdict."""
    out = []
    for key in dict.fromkeys((r["category"], r["setting"]) for r in rows):
        sel = [r for r in rows if (r["category"], r["setting"]) == key]
        base = next(r for r in sel if r["shift"] == "none")
        goals = [r for r in sel if r["shift"] in GOAL_SHIFTS]
        entry = goal[f"{key[1]}/margin={MARGIN:g}/test/{key[0]}"]
        out.append(
            {
                "category": key[0],
                "detector": key[1],
                "image_auroc": base["image_auroc"],
                "pixel_auroc": base["pixel_auroc"],
                "false_alarms": base["false_alarms"],
                "recall": base["recall"],
                "worst_goal_false_alarms": max(r["false_alarms"] for r in goals),
                "worst_goal_auroc_drop": max(base["image_auroc"] - r["image_auroc"] for r in goals),
                "worst_goal_recall_drop": max(base["recall"] - r["recall"] for r in goals),
                "goal_met": entry["met"],
                "missed": entry["missed"],
                "other": {
                    s: next((r["false_alarms"] for r in sel if r["shift"] == s), None)
                    for s in ("bright+20", "bright-20", "defocus-1.2", "noise-5")
                },
            }
        )
    return out


def markdown(result: dict) -> str:
    p = lambda v: f"{100 * v:.0f} %"  # noqa: E731
    lines = [
        "# Drift: the default beside a PatchCore-style peer, one protocol (benchmarks/drift_peer.py)",
        "",
        f"Reproduce: `{result['command']}`",
        "",
        f"Machine: {result['machine'].get('cpu', '?')}; CPU flags of note: {', '.join(result['cpu_flags']) or '-'}. "
        f"{result['seconds']:.0f} s. Test split (20 good, 40 defective per category), every image shifted at the "
        f"file's resolution; each detector's threshold from the same calibration images by the same rule (margin "
        f"{MARGIN:g}). `adtr` is the deployed default through PyTorch; `patchcore` a PatchCore-style nearest-neighbour "
        "detector on the same frozen backbone features (no input standardization); `patchcore+norm` the same behind "
        "our per-image input standardization.",
        "",
        "| category | detector | unshifted image / pixel AUROC | unshifted false alarms / recall | worst goal-shift "
        "false alarms | worst image AUROC drop | worst recall drop | goal met | false alarms at +20 / -20 %, defocus, "
        "noise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        o = s["other"]
        lines.append(
            f"| {s['category']} | {s['detector']} | {100 * s['image_auroc']:.1f} / {100 * s['pixel_auroc']:.1f} | "
            f"{p(s['false_alarms'])} / {p(s['recall'])} | {p(s['worst_goal_false_alarms'])} | "
            f"{100 * s['worst_goal_auroc_drop']:.1f} | {100 * s['worst_goal_recall_drop']:.0f} | "
            + ("**yes**" if s["goal_met"] else "no (" + ", ".join(s["missed"]) + ")")
            + " | "
            + ", ".join("-" if v is None else p(v) for v in o.values())
            + " |"
        )
    lines += ["", "## Every shift", ""]
    cats = list(dict.fromkeys(r["category"] for r in result["rows"]))
    for cat in cats:
        sel = [r for r in result["rows"] if r["category"] == cat]
        dets = list(dict.fromkeys(r["setting"] for r in sel))
        lines += [f"### {cat}", "", "| shift | " + " | ".join(dets) + " |", "|---|" + "---|" * len(dets)]
        for shift in dict.fromkeys(r["shift"] for r in sel):
            cells = []
            for d in dets:
                r = next(r for r in sel if r["setting"] == d and r["shift"] == shift)
                cells.append(
                    f"{p(r['false_alarms'])} / {p(r['recall'])}, {100 * r['image_auroc']:.1f}, {100 * r['pixel_auroc']:.1f}"
                )
            star = " (goal)" if shift in GOAL_SHIFTS else ""
            lines.append(f"| {SHIFTS[shift][0]}{star} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="RUNS: RUNS/<category> are adtr-train run folders")
    parser.add_argument("--data", required=True, help="the dataset root the runs were trained on (its test split)")
    parser.add_argument("--categories", default="brick,grass,gravel,moon,stars,tissue")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--shifts", default=",".join(SHIFTS))
    parser.add_argument("--out", default=str(HERE / "results" / "drift_peer.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for cat in args.categories.split(","):
        rows += measure(Path(args.runs) / cat, Path(args.data), cat, args.shifts.split(","), args.detectors.split(","))
    goal = goal_check(rows)
    result = {
        "command": command_line("drift_peer.py", argv),
        "machine": machine(**machine_info()),
        "cpu_flags": cpu_flags(),
        "seconds": time.perf_counter() - start,
        "summary": summary(rows, goal),
        "goal": goal,
        "rows": rows,
    }
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
