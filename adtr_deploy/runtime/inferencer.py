"""The Python API: `Inferencer(model_path).predict(image_or_path)`, torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adtr_deploy.preprocess import load_image, prepare, read_image, to_rgb_uint8
from adtr_deploy.runtime.backends import open_model
from adtr_deploy.runtime.postprocess import Postprocessor, Prediction
from adtr_deploy.tiling import check_requested, from_spec, run_frames

ImageLike = str | Path | np.ndarray


class Inferencer:
    """An exported model ready to score images.

    >>> inf = Inferencer("export/model.onnx")            # doctest: +SKIP
    >>> p = inf.predict("part.png")                      # doctest: +SKIP
    >>> p.score, p.normalized_score, p.is_anomaly, p.anomaly_map.shape  # doctest: +SKIP

    Arrays are taken as RGB (pass `bgr=True` for frames from OpenCV); files go through adtr_deploy.preprocess exactly as
    in training. `threshold` (raw score units) replaces the calibrated threshold from the model's metadata.

    A model trained on tiles (model.json `tiling`) scores images at their own size, tiled exactly as in training, and
    its maps are at the image's size times the tiling scale; `tile` (a --tile text, e.g. "off" or "native") is refused
    in one sentence unless it says what the model was trained with.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        *,
        threshold: float | None = None,
        batch_size: int = 8,
        tile: str | None = None,
        **options,
    ):
        self.backend = open_model(model_path, device, **options)
        self.spec = self.backend.spec
        try:
            self.tiling = check_requested(from_spec(self.spec), tile, str(model_path))
        except Exception:
            self.backend.close()
            raise
        self.post = Postprocessor(self.spec.calibration, threshold)
        self.batch_size = max(1, min(batch_size, self.backend.max_batch or batch_size))

    @property
    def threshold(self) -> float:
        return self.post.threshold

    def prepare(self, image: ImageLike, *, bgr: bool = False) -> np.ndarray:
        """A path or an array -> uint8 RGB at the model's input size (H, W, 3), or at its own size for a tiled model."""
        if self.tiling is not None:
            return read_image(image) if isinstance(image, str | Path) else to_rgb_uint8(np.asarray(image), bgr=bgr)
        if isinstance(image, str | Path):
            return load_image(image, self.spec.input_size)
        return prepare(np.asarray(image), self.spec.input_size, bgr=bgr)

    def predict(self, image: ImageLike, *, bgr: bool = False) -> Prediction:
        """One image (path or array) -> Prediction(anomaly_map (H, W) float32, score, normalized_score, is_anomaly)."""
        return self.predict_batch([image], bgr=bgr)[0]

    def predict_batch(self, images: Sequence[ImageLike], *, bgr: bool = False) -> list[Prediction]:
        """Many images, run in batches of `batch_size`; results in input order."""
        out: list[Prediction] = []
        for i in range(0, len(images), self.batch_size):
            batch = [self.prepare(img, bgr=bgr) for img in images[i : i + self.batch_size]]
            out.extend(self.post(*run_frames(self.backend, batch, self.tiling)))
        return out

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Inferencer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
