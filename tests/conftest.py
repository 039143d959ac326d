"""Shared fixtures. Most tests use the tiny presets; tests marked e2e use the real pretrained weights."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def texture_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Real photographs (scikit-image textures) cut into (n, size, size, 3) uint8 RGB crops: real pixels, never zeros."""
    import cv2
    from skimage import data

    rs = np.random.default_rng(seed)
    sources = [data.brick(), data.grass(), data.gravel(), data.chelsea(), data.coffee()]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        if src.ndim == 2:
            src = cv2.cvtColor(src, cv2.COLOR_GRAY2RGB)
        h, w = src.shape[:2]
        c = min(h, w) // 2
        y, x = rs.integers(0, h - c), rs.integers(0, w - c)
        out.append(cv2.resize(src[y : y + c, x : x + c], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out).astype(np.uint8)


@pytest.fixture
def real_images():
    return texture_images


def export_tiny_onnx(out, seed: int = 0, size: int = 64) -> object:
    """A tiny ADTR (weights seeded by `seed`) exported to OUT/model.onnx with a dynamic batch and its model.json, as
    adtr-export lays it out; the TorchScript-based exporter (a few seconds, against ~10-40 s for the dynamo one on 2 busy
    cores)."""
    import warnings

    torch = pytest.importorskip("torch")
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.spec import ModelSpec

    torch.manual_seed(seed)
    model = ADTR(get_preset("tiny", input_size=(size, size))).eval()  # `size`: a slower model, e.g. 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(texture_images(2, size)),),
            str(out / "model.onnx"),
            dynamo=False,
            input_names=["image"],
            output_names=["anomaly_map", "score"],
            dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
            opset_version=18,
        )
    ModelSpec(input_size=(size, size), preset="tiny", backbone="tiny", format="onnx").save(out / "model.json")
    return out / "model.onnx"
