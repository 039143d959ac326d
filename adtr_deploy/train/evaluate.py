"""Evaluation of a checkpoint (PyTorch) or an exported model (through the runtime) on a test split.

The same code runs on both, so the accuracy of what is deployed is measured, not assumed: images go through the shared
preprocessing, anomaly maps are compared with the masks at the model's input size, and the metrics come from
`adtr_deploy.metrics.evaluate`.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from adtr_deploy.data.layout import AnomalyData, load_sample, open_dataset
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write, write_json_atomic
from adtr_deploy.tiling import Tiling, from_spec, run_tiled

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


class TorchRunner:
    """An ADTR module behind the runtime backends' interface: uint8 (N, H, W, 3) -> (maps, scores) as numpy."""

    name = "pytorch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", *, tiling: Tiling | None = None):
        import torch

        self.tiling = tiling  # trained on tiles: images are scored tiled and stitched (adtr_deploy/tiling.py)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size = tuple(model.cfg.input_size)

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.as_tensor(batch).to(self.device)
        with torch.no_grad():
            amap, score = self.model(x)
        return amap.float().cpu().numpy(), score.float().cpu().numpy()


class BackendRunner:
    """An exported model opened by the runtime (ONNX Runtime, TorchScript, TensorRT ...)."""

    def __init__(self, backend):
        self.backend = backend
        self.tiling = from_spec(backend.spec)
        self.name = backend.name
        self.input_size = tuple(backend.spec.input_size)

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(batch)  # a torch tensor (DataLoader) or a numpy batch (torch-free evaluation)
        amap, score = self.backend.run(arr)
        return np.asarray(amap, dtype=np.float32), np.asarray(score, dtype=np.float32).reshape(-1)


def is_checkpoint(path: str | Path) -> bool:
    """True for an adtr-train checkpoint (or a run folder holding one); False for exported artifacts.

    TorchScript files also end in .pt, and both are zip archives: a TorchScript archive has a code/ folder and
    constants.pkl, a torch.save archive has neither.
    """
    path = Path(path)
    if path.is_dir():
        return (path / "checkpoint.pt").is_file()
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return True  # not a TorchScript archive; read_checkpoint says what is wrong with it
    return not any("/code/" in n or n.endswith("constants.pkl") for n in names)


def open_runner(model_path: str | Path, device: str = "cpu"):
    """A checkpoint -> TorchRunner (PyTorch eager); anything else -> BackendRunner through adtr_deploy.runtime.open_model."""
    check_device(device)
    if is_checkpoint(model_path):
        from adtr_deploy.model.checkpoint import load_checkpoint

        model, ckpt = load_checkpoint(model_path)
        tiling = (ckpt.get("info") or {}).get("tiling")
        return TorchRunner(model, device, tiling=None if tiling is None else Tiling.from_dict(tiling, str(model_path)))
    from adtr_deploy.runtime import open_model

    return BackendRunner(open_model(model_path, device))


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UserError(f"device {device!r} is not supported; use cpu or cuda")
    if str(device).startswith("cuda") and not _cuda_available():
        raise UserError("--device cuda was given but PyTorch sees no CUDA GPU here; use --device cpu")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False  # onnxruntime-gpu alone: the backend itself says whether CUDA works
    return torch.cuda.is_available()


def _numpy_batches(samples, size, *, batch_size: int, masks: bool):
    """The DataLoader's batches without torch (exported models in a runtime-only install), decoded in this process."""
    from adtr_deploy.preprocess import load_mask

    for start in range(0, len(samples), batch_size):
        idx = np.arange(start, min(start + batch_size, len(samples)))
        batch = {"image": np.stack([load_sample(samples[i], size) for i in idx]), "index": idx}
        if masks:
            batch["mask"] = np.stack([load_mask(samples[i].mask, size)[None] for i in idx])
        yield batch


def _batches(samples, size, *, batch_size: int, workers: int, masks: bool):
    """torch's DataLoader (parallel decoding with workers) when torch is installed, else the numpy batches."""
    try:
        from adtr_deploy.data.datasets import image_loader
    except ImportError:
        return _numpy_batches(samples, size, batch_size=batch_size, masks=masks)
    return image_loader(samples, size, batch_size=batch_size, workers=workers, masks=masks)


def _progress(iterable, *, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the train extra; a runtime-only install evaluates without a bar
        return iterable
    return tqdm(iterable, desc=desc, unit="batch", disable=not enabled, leave=False)


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) float32 raw image scores
    maps: np.ndarray | None  # (M, 1, H, W) float32 for the M samples with pixel ground truth, when kept
    masks: np.ndarray | None  # (M, 1, H, W) bool, same samples
    pixel_index: np.ndarray | None  # (M,) indices of those samples


def predict(
    runner,
    samples: list[Sample] | tuple[Sample, ...],
    *,
    batch_size: int = 16,
    workers: int = 0,
    keep_maps: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Predictions:
    """Run a model over samples; keep the maps (and load the masks) only of samples with pixel ground truth. A tiled
    model's runner scores whole images tiled and stitched, against masks at the images' own size."""
    if getattr(runner, "tiling", None) is not None:
        return predict_tiled(runner, samples, batch_size=batch_size, keep_maps=keep_maps, progress=progress, desc=desc)
    size = runner.input_size
    scores = np.zeros(len(samples), dtype=np.float32)
    maps, masks, pix = [], [], []
    loader = _batches(samples, size, batch_size=batch_size, workers=workers, masks=keep_maps)
    for batch in _progress(loader, desc=desc, enabled=progress):
        amap, score = runner.run(batch["image"])
        idx = np.asarray(batch["index"])
        scores[idx] = score
        if keep_maps:
            for j, i in enumerate(idx):
                if samples[i].has_pixel_truth:
                    maps.append(amap[j])
                    masks.append(np.asarray(batch["mask"][j]))
                    pix.append(i)
    if not keep_maps or not pix:
        return Predictions(scores, None, None, None)
    return Predictions(scores, np.stack(maps), np.stack(masks), np.asarray(pix))


def predict_tiled(runner, samples, *, batch_size: int, keep_maps: bool, progress: bool, desc: str) -> Predictions:
    """`predict` for a tiled model: each image at its own size through tiling.run_tiled (batch_size tiles a call); maps
    brought back to the image's size (when the tiling scale is not 1) and compared with masks at that size. Images of
    other sizes than the first with pixel truth are brought to its size (maps bilinearly, masks nearest)."""
    import cv2

    from adtr_deploy.data.tiles import full_image
    from adtr_deploy.preprocess import load_mask

    scores = np.zeros(len(samples), dtype=np.float32)
    maps, masks, pix, shape = [], [], [], None
    for i in _progress(range(len(samples)), desc=desc, enabled=progress):
        image = full_image(samples[i])
        amap, scores[i] = run_tiled(runner.run, image, runner.tiling, batch_size)
        if keep_maps and samples[i].has_pixel_truth:
            shape = shape or image.shape[:2]
            if amap.shape != shape:
                amap = cv2.resize(amap, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
            maps.append(amap[None])
            masks.append(load_mask(samples[i].mask, shape)[None])
            pix.append(i)
    if not keep_maps or not pix:
        return Predictions(scores, None, None, None)
    return Predictions(scores, np.stack(maps), np.stack(masks), np.asarray(pix))


def _clean(value: Any) -> Any:
    """numpy scalars -> floats, NaN -> None, so metrics.json is plain JSON."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compute_metrics(samples, preds: Predictions) -> dict[str, Any]:
    """Image metrics over every test image; pixel metrics over the images that have pixel ground truth."""
    from adtr_deploy.metrics import evaluate, image_auroc

    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    result = dict(evaluate(preds.scores, labels))
    result["pixel_auroc"], result["pro"] = None, None
    if preds.maps is not None and any(labels[preds.pixel_index] == 1):
        px = evaluate(preds.scores[preds.pixel_index], labels[preds.pixel_index], preds.maps, preds.masks)
        result["pixel_auroc"], result["pro"] = px["pixel_auroc"], px["pro"]
        result["pixel_images"] = len(preds.pixel_index)
    result["num_images"] = len(samples)
    result["num_anomalous"] = int(labels.sum())
    good = labels == 0
    per_defect = {}
    for defect in sorted({s.defect for s in samples if s.label == 1}):
        sel = good | np.asarray([s.defect == defect for s in samples])
        per_defect[defect] = {
            "image_auroc": _clean(image_auroc(preds.scores[sel], labels[sel])) if good.any() else None,
            "num_images": int(sel.sum() - good.sum()),
        }
    result["per_defect"] = per_defect
    return {k: _clean(v) for k, v in result.items()}


def scores_path_for(metrics_path: str | Path) -> Path:
    """The per-image score table beside metrics.json: metrics.json -> metrics_scores.csv."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_scores.csv")


def write_results(metrics: dict[str, Any], samples, scores: np.ndarray, out: str | Path) -> Path:
    """metrics.json (atomically) and the per-image scores CSV beside it (path, label, defect, score)."""
    out = Path(out)
    table = scores_path_for(out)

    def write_table(fh) -> None:
        w = csv.writer(fh)
        w.writerow(["path", "label", "defect", "score"])
        for s, score in zip(samples, scores):
            w.writerow([str(s.path), s.label, s.defect, f"{float(score):.6g}"])

    atomic_write(table, write_table, text=True)
    return write_json_atomic(metrics, out)


def evaluate_runner(
    runner, data: AnomalyData, *, batch_size: int = 16, workers: int = 0, progress: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of a runner on the test split of `data`, and the raw scores in test order."""
    if not data.has_test:
        raise UserError(
            f"{data.root} has no test split for {data.category or 'this data'}; evaluation needs test images "
            "(MVTec-AD layout test/good and test/<defect>, or CIFAR test_batch)"
        )
    preds = predict(
        runner, data.test, batch_size=batch_size, workers=workers, keep_maps=data.has_masks, progress=progress
    )
    metrics = compute_metrics(data.test, preds)
    metrics["backend"] = runner.name
    metrics["input_size"] = list(runner.input_size)
    if getattr(runner, "tiling", None) is not None:
        metrics["tiling"] = runner.tiling.to_dict()
    metrics["data"] = data.info()
    return metrics, preds.scores


def evaluate_model(
    model_path: str | Path,
    data_root: str | Path,
    category: str | int | None,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    workers: int = 0,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint or an exported model on the test split of `data_root`/`category`.

    Returns the metrics dict (image_auroc, pixel_auroc, pro, f1_max, f1_max_threshold_on_test, num_images, ...). With `out`, writes it
    there as JSON and the per-image scores as `<stem>_scores.csv` beside it.
    """
    data = open_dataset(data_root, category)
    if not data.has_test:
        raise UserError(
            f"{data_root} has no test split; evaluation needs the MVTec-AD test folders or CIFAR test_batch"
        )
    runner = open_runner(model_path, device)
    metrics, scores = evaluate_runner(runner, data, batch_size=batch_size, workers=workers, progress=progress)
    metrics = {"model": str(Path(model_path).resolve()), **metrics}
    if out is not None:
        write_results(metrics, data.test, scores, out)
    return metrics
