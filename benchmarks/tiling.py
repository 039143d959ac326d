"""Large images, small defects (issue 28): resize-to-input vs tiled at native resolution, side by side in one run.

For each category of the large-image demo set (`adtr data demo --large`: 1024-pixel images, one defect of 3-24 px per
defective image, exact masks), two models are trained with adtr-train on the same good images: `resized` (every image
resized to the 224-pixel input, as adtr-train does by default) and `tiled` (`--tile native`: 224-pixel tiles of the
images at native resolution, overlap 0.25). Both are exported to ONNX (adtr-export, FP32) and every test image goes
through the runtime (`adtr_deploy.runtime.Inferencer`, ONNX Runtime on the CPU), the two models one after the other on
the same decoded image. Maps are compared with the masks at the images' full resolution (the resized model's map
upsampled bilinearly, the tiled model's stitched at native resolution). Metrics per defect size band (the longer side of
the mask's bounding box: < 8, 8-16, > 16 px; each band's images against all good test images): image AUROC, pixel
AUROC, PRO (FPR up to 0.3). Cost: the runtime's milliseconds per image and per megapixel on the test images, and for
one test image brought to 0.25, 1, 2 and 4 megapixels (is the tiled cost linear in the pixel count?).

No setting was chosen on the test split: the tiling is the default (native, overlap 0.25) and the epochs are fixed in
advance (short runs on a shared 2-core machine; see the JSON's `train`).

    python benchmarks/tiling.py --categories brick --work /tmp/adtr-tiling --out benchmarks/results/tiling.json

Writes OUT (JSON) and OUT with .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.bench.studies import command_line, machine, pct, write_result
from adtr_deploy.data.demo_large import SIZE_BANDS, SIZES_NAME, write_large_dataset
from adtr_deploy.data.layout import open_dataset
from adtr_deploy.metrics import image_auroc, pixel_auroc, pro_score
from adtr_deploy.preprocess import load_mask, read_image
from adtr_deploy.runtime import Inferencer

MODELS = ("resized", "tiled")
SCALE_SIDES = (512, 1024, 1448, 2048)  # 0.25, 1, 2, 4 megapixels
BIN = Path(sys.executable).parent  # adtr-train and adtr-export of this environment


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def train_and_export(data: Path, category: str, work: Path, name: str, args) -> tuple[Path, dict]:
    run_dir = work / "runs" / f"{category}-{name}"
    epochs = args.epochs_resized if name == "resized" else args.epochs_tiled
    cmd = [str(BIN / "adtr-train"), "--data", str(data), "--category", category, "--preset", args.preset]
    cmd += ["--out", str(run_dir), "--epochs", str(epochs), "--no-eval", "--quiet", "--overwrite"]
    if name == "tiled":
        cmd += ["--tile", args.tile]
    seconds = run(cmd)
    export = run_dir / "export"
    exp_cmd = [str(BIN / "adtr-export"), "--model", str(run_dir), "--format", "onnx"]
    seconds_export = run([*exp_cmd, "--out", str(export), "--no-verify", "--exporter", "torchscript"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    ckpt_info = {"epochs": epochs, "train_seconds": round(seconds, 1), "export_seconds": round(seconds_export, 1)}
    ckpt_info["final_loss"] = log[-1]["loss"]
    return export / "model.onnx", ckpt_info


def band_metrics(scores, labels, maps, masks, sizes, band) -> dict:
    sel = [i for i, (lab, s) in enumerate(zip(labels, sizes, strict=True)) if lab == 0 or band[0] <= s < band[1]]
    lab = np.asarray([labels[i] for i in sel])
    if lab.sum() == 0:
        return {"images": 0}
    m = np.stack([maps[i] for i in sel])
    g = np.stack([masks[i] for i in sel])
    return {
        "images": int(lab.sum()),
        "image_auroc": image_auroc(np.asarray([scores[i] for i in sel]), lab),
        "pixel_auroc": pixel_auroc(m, g),
        "pro": pro_score(m, g, 0.3),
    }


def evaluate(data: Path, category: str, models: dict[str, Path]) -> dict:
    ds = open_dataset(data, category)
    sizes_by_rel = json.loads((data / category / SIZES_NAME).read_text())
    infs = {name: Inferencer(path) for name, path in models.items()}
    scores = {n: [] for n in infs}
    maps = {n: [] for n in infs}
    ms = {n: [] for n in infs}
    masks, labels, sizes, pixels = [], [], [], []
    for k, s in enumerate(ds.test):
        image = read_image(s.path)
        h, w = image.shape[:2]
        order = list(infs) if k % 2 == 0 else list(infs)[::-1]  # alternate which model goes first
        for name in order:
            t0 = time.perf_counter()
            pred = infs[name].predict(image)
            ms[name].append((time.perf_counter() - t0) * 1000)
            amap = pred.anomaly_map
            if amap.shape != (h, w):
                amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
            scores[name].append(pred.score)
            maps[name].append(amap)
        masks.append(load_mask(s.mask, (h, w)))
        labels.append(int(s.label))
        rel = Path(s.path).relative_to(data / category).as_posix()
        sizes.append(sizes_by_rel.get(rel, 0))
        pixels.append(h * w)
    out = {"test_images": len(labels), "defective": int(sum(labels)), "models": {}}
    for name in infs:
        row = {"all": band_metrics(scores[name], labels, maps[name], masks, sizes, (1, 10**9))}
        for lo, hi, band in SIZE_BANDS:
            row[band] = band_metrics(scores[name], labels, maps[name], masks, sizes, (max(lo, 1), hi))
        row["ms_per_image"] = float(np.median(ms[name]))
        row["ms_per_mp"] = float(np.median(np.asarray(ms[name]) / (np.asarray(pixels) / 1e6)))
        out["models"][name] = row
    out["cost_by_size"] = cost_by_size(infs, read_image(ds.test[0].path))
    out["memory_20mp_tiled"] = memory_20mp(models["tiled"], ds.test[0].path)
    for inf in infs.values():
        inf.close()
    return out


def cost_by_size(infs: dict, image: np.ndarray, reps: int = 3) -> dict:
    """Median ms per image and per megapixel at several image sizes (the same photograph resized)."""
    out = {}
    for side in SCALE_SIDES:
        img = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
        row = {}
        for name, inf in infs.items():
            inf.predict(img)  # warm-up at this size
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                inf.predict(img)
                times.append((time.perf_counter() - t0) * 1000)
            med = float(np.median(times))
            row[name] = {"ms": med, "ms_per_mp": med / (side * side / 1e6)}
        out[f"{side}x{side}"] = row
    return out


MEMORY_CHILD = """
import sys, time, numpy as np
from adtr_deploy.preprocess import read_image
from adtr_deploy.runtime import Inferencer
inf = Inferencer(sys.argv[1])
tile = read_image(sys.argv[2])
reps = (-(-3648 // tile.shape[0]), -(-5472 // tile.shape[1]), 1)
image = np.ascontiguousarray(np.tile(tile, reps)[:3648, :5472])  # 20 MP, 5472 x 3648, from the test photograph
inf.predict(tile)  # the session warmed up on a 1 MP image
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = peak_mb()
t0 = time.perf_counter()
inf.predict(image)
seconds = time.perf_counter() - t0
after = peak_mb()
print(before, after, seconds, image.nbytes / 2**20)
"""


def memory_20mp(model: Path, image_path: Path) -> dict:
    """Peak memory of one tiled 20-megapixel frame in a fresh process: the process's peak RSS after a warm-up on a
    1 MP image, and after the 20 MP frame (which holds the 60 MB frame itself)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(model), str(image_path)], check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    before, after, seconds, frame = (float(v) for v in out[-4:])
    return {"peak_rss_mb_1mp": before, "peak_rss_mb_20mp": after, "frame_mb": frame, "seconds_20mp": seconds}


def markdown(result: dict) -> str:
    lines = [
        "# Large images, small defects: resize-to-input vs tiled (issue 28)",
        "",
        f"`{result['command']}`",
        "",
        "Image / pixel AUROC and PRO (FPR <= 0.3, %) per defect size band, each band against all good test images; maps "
        "against the full-resolution masks. Cost: ONNX Runtime CPU through the runtime, median ms per test image and "
        "per megapixel.",
        "",
        "| category | model | band | defects | image AUROC | pixel AUROC | PRO | ms / image | ms / MP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cat, r in result["categories"].items():
        for name, row in r["models"].items():
            for band in ("all", *[b for _, _, b in SIZE_BANDS]):
                m = row[band]
                cost = (f"{row['ms_per_image']:.0f}", f"{row['ms_per_mp']:.0f}") if band == "all" else ("", "")
                lines.append(
                    f"| {cat} | {name} | {band} | {m['images']} | {pct(m.get('image_auroc'))} | "
                    f"{pct(m.get('pixel_auroc'))} | {pct(m.get('pro'))} | {cost[0]} | {cost[1]} |"
                )
    lines += ["", "Cost against image size (the same photograph resized; median of 3 after a warm-up):", ""]
    lines += ["| category | size | " + " | ".join(f"{n} ms | {n} ms/MP" for n in MODELS) + " |"]
    lines += ["|---|---|" + "---|---|" * len(MODELS)]
    for cat, r in result["categories"].items():
        for size, row in r["cost_by_size"].items():
            cells = " | ".join(f"{row[n]['ms']:.0f} | {row[n]['ms_per_mp']:.0f}" for n in MODELS)
            lines.append(f"| {cat} | {size} | {cells} |")
    lines += ["", "Memory of one tiled 20-megapixel frame (5472 x 3648), peak RSS of a fresh process:", ""]
    for cat, r in result["categories"].items():
        m = r["memory_20mp_tiled"]
        lines.append(
            f"- {cat}: {m['peak_rss_mb_1mp']:.0f} MB after a 1 MP frame, {m['peak_rss_mb_20mp']:.0f} MB after the 20 MP "
            f"frame (the frame itself: {m['frame_mb']:.0f} MB), {m['seconds_20mp']:.1f} s"
        )
    lines += ["", "Training (same good images; the tiled model trains on their tiles):", ""]
    for cat, r in result["categories"].items():
        for name, t in r["train"].items():
            lines.append(
                f"- {cat} {name}: {t['epochs']} epochs, {t['train_seconds']:.0f} s training, final loss "
                f"{t['final_loss']:.4g}"
            )
    return "\n".join(lines) + "\n"


def memory_only(args, cats: list[str], argv) -> dict:
    """The 20 MP memory check alone, for both models of each category already trained and exported in --work."""
    result = {"command": command_line("tiling.py", argv), "memory_20mp": {}}
    for cat in cats:
        image = args.work / "data" / cat / "test" / "good" / "000.png"
        for name in MODELS:
            model = args.work / "runs" / f"{cat}-{name}" / "export" / "model.onnx"
            result["memory_20mp"][f"{cat} {name}"] = memory_20mp(model, image)
    result["machine"] = machine()

    def table(r: dict) -> str:
        rows = [f"`{r['command']}`", "", "| model | peak MB after 1 MP | peak MB after 20 MP | 20 MP frame MB | s |"]
        rows.append("|---|---|---|---|---|")
        for k, m in r["memory_20mp"].items():
            rows.append(
                f"| {k} | {m['peak_rss_mb_1mp']:.0f} | {m['peak_rss_mb_20mp']:.0f} | {m['frame_mb']:.0f} | "
                f"{m['seconds_20mp']:.1f} |"
            )
        return "\n".join(rows) + "\n"

    return write_result(result, args.out, table)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", default="brick")
    p.add_argument("--work", type=Path, default=Path("/tmp/adtr-tiling"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tiling.json"))
    p.add_argument("--train-images", type=int, default=16, help="good training images per category (4 calibrate)")
    p.add_argument("--epochs-resized", type=int, default=30)
    p.add_argument("--epochs-tiled", type=int, default=4)
    p.add_argument("--tile", default="native")
    p.add_argument("--preset", default="lite0")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--memory-only", action="store_true", help="only the 20 MP memory check of the models in --work")
    args = p.parse_args(argv)
    cats = [c for c in args.categories.split(",") if c]
    if args.memory_only:
        return memory_only(args, cats, argv)
    data = write_large_dataset(args.work / "data", cats, size=args.image_size, counts=(args.train_images, 16, 12))
    result = {"command": command_line("tiling.py", argv), "categories": {}}
    for cat in cats:
        trained = {name: train_and_export(data, cat, args.work, name, args) for name in MODELS}
        r = evaluate(data, cat, {name: path for name, (path, _) in trained.items()})
        r["train"] = {name: info for name, (_, info) in trained.items()}
        result["categories"][cat] = r
    result["machine"] = machine(preset=args.preset, image_size=args.image_size, train_images=args.train_images)
    return write_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
