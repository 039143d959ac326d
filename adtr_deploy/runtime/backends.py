"""Inference backends: one small class per engine, chosen from the model file's suffix. No torch at import time.

Every backend takes a uint8 RGB batch (N, H, W, 3) at the spec's input size and returns (anomaly_map (N, 1, H, W) float32,
score (N,) float32). It reads the ModelSpec from `model.json` beside the file, or from the artifact's own metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adtr_deploy.spec import METADATA_KEY, SPEC_FILENAME, ModelSpec, SpecError, spec_path_for


class BackendError(RuntimeError):
    """A model cannot be opened or run by the requested backend."""


def read_spec(model_path: str | Path, embedded: str | None = None) -> ModelSpec:
    """The spec beside the artifact (`model.json`) wins; the artifact's embedded copy is the fallback."""
    beside = spec_path_for(model_path)
    if beside.is_file():
        return ModelSpec.load(beside)
    if embedded:
        return ModelSpec.from_json(embedded)
    raise SpecError(
        f"{model_path} has no {SPEC_FILENAME} beside it and no embedded spec; export it with adtr-export, which writes both"
    )


class Backend:
    """Base class: `spec`, `name`, `device`, and `run(batch) -> (maps, scores)`."""

    name = "base"

    def __init__(self, path: str | Path, spec: ModelSpec, device: str):
        self.path = Path(path)
        self.spec = spec
        self.device = device

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        h, w = self.spec.input_size
        if batch.ndim != 4 or batch.shape[1:] != (h, w, 3):
            raise BackendError(f"input batch has shape {batch.shape}; the model takes (N, {h}, {w}, 3) uint8 RGB")
        return np.ascontiguousarray(batch, dtype=np.uint8)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "model": str(self.path)}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed; install it with pip install 'adtr-deploy[cpu]' (or [gpu] on an NVIDIA machine)"
            ) from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(device)
        if providers is None:
            raise BackendError(f"device {device!r} is not supported by the onnxruntime backend; use cpu or cuda")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise BackendError(f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        super().__init__(path, read_spec(path, meta.get(METADATA_KEY)), device)
        self.providers = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise BackendError(
                "CUDA was requested but ONNX Runtime fell back to the CPU (no GPU, or onnxruntime-gpu/CUDA libraries missing); "
                "install adtr-deploy[gpu] on a machine with an NVIDIA GPU, or use --device cpu"
            )
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if self.input_name != self.spec.input_name or tuple(names) != tuple(self.spec.output_names):
            raise BackendError(
                f"{path} has input {self.input_name!r} and outputs {names}, but its spec says {self.spec.input_name!r} and "
                f"{list(self.spec.output_names)}; the spec belongs to another model: re-export"
            )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.session.run(None, {self.input_name: self.check_batch(batch)})
        return amap, score

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}


class TorchScriptBackend(Backend):
    """TorchScript through torch, imported only when this backend is chosen."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: str = "cpu"):
        try:
            import torch
        except ImportError:
            raise BackendError("the TorchScript backend needs torch; install it, or run the .onnx model instead") from None
        extra = {SPEC_FILENAME: ""}
        try:
            self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:
            raise BackendError(f"{path} is not a loadable TorchScript model ({str(exc).splitlines()[0][:200]})") from None
        super().__init__(path, read_spec(path, extra[SPEC_FILENAME] or None), device)
        self.module.eval()
        self._torch = torch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            amap, score = self.module(torch.from_numpy(self.check_batch(batch)).to(self.device))
        return amap.float().cpu().numpy(), score.float().cpu().numpy()


# suffix -> backend class; other engines (TensorRT, Triton) are added beside these.
BACKENDS: dict[str, type[Backend]] = {
    ".onnx": OnnxRuntimeBackend,
    ".torchscript": TorchScriptBackend,
    ".pt": TorchScriptBackend,
}


def open_model(path: str | Path, device: str = "cpu", **options) -> Backend:
    """Open an exported model with the backend its suffix names. `path` may also be an export folder."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix in BACKENDS or p.suffix == ".engine"]
        if not found:
            raise BackendError(f"{path} holds no exported model (model.onnx, model.torchscript, model.engine)")
        path = found[0]
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist; give the file that adtr-export wrote")
    cls = BACKENDS.get(path.suffix)
    if cls is None:
        raise BackendError(f"{path.name}: unknown model type {path.suffix!r}; expected one of {', '.join(BACKENDS)}")
    return cls(path, device, **options)


def embedded_spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)
