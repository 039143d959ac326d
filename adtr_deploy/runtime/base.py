"""What every backend shares: the Backend interface, the spec lookup, and the check that a spec fits its graph.

numpy and the stdlib only, so every backend module (ONNX Runtime, TensorRT, TorchScript, Triton) can build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.spec import SPEC_FILENAME, ModelSpec, SpecError, spec_path_for


class BackendError(UserError, RuntimeError):
    """A model cannot be opened or run by the requested backend."""


def read_spec(model_path: str | Path, embedded: str | None = None, *, verify: bool = True) -> ModelSpec:
    """The spec beside the artifact (`model.json`) wins, so thresholds can be edited; the embedded copy is the fallback.

    With `verify`, a `model.json` is bound to its artifact: the sha256 it records must be the artifact's, and the
    checkpoint it names must be the one the artifact's embedded spec names. A model.json copied from another export
    (same architecture, other weights: wrong threshold, wrong normalized scores) is refused instead of used."""
    beside = spec_path_for(model_path)
    if beside.is_file():
        spec = ModelSpec.load(beside)
        if verify:
            check_identity(spec, Path(model_path), beside, ModelSpec.from_json(embedded) if embedded else None)
        return spec
    if embedded:
        return ModelSpec.from_json(embedded)
    raise SpecError(
        f"{model_path} has no {SPEC_FILENAME} beside it and no embedded spec; export it with adtr-export, which writes both"
    )


def _checkpoint_sha(spec: ModelSpec) -> str | None:
    ckpt = spec.extra.get("checkpoint") if isinstance(spec.extra, dict) else None
    return ckpt.get("sha256") if isinstance(ckpt, dict) else None


def check_identity(spec: ModelSpec, model_path: Path, spec_path: Path, embedded: ModelSpec | None) -> None:
    """Refuse a spec that was written for another artifact (see read_spec). A spec without recorded hashes (written
    by hand) is accepted: there is nothing to bind it to."""
    recorded = spec.extra.get("sha256") if isinstance(spec.extra, dict) else None
    if recorded and model_path.is_file() and sha256_file(model_path) != recorded:
        raise BackendError(
            f"{spec_path} was written for another model file than {model_path} (the sha256 it records differs): it "
            "belongs to another model; put the model.json that adtr-export wrote with this model beside it"
        )
    theirs, ours = _checkpoint_sha(spec), _checkpoint_sha(embedded) if embedded else None
    if theirs and ours and theirs != ours:
        raise BackendError(
            f"{spec_path} describes a model trained as another checkpoint than the one inside {model_path}: it "
            "belongs to another model; put the model.json that adtr-export wrote with this model beside it"
        )
    if embedded is not None and spec.tiling != embedded.tiling:

        def says(s: ModelSpec) -> str:
            return "whole images resized to its input" if s.tiling is None else f"tiles {s.tiling}"

        raise BackendError(
            f"{spec_path} says the model takes {says(spec)}, but {model_path} was exported for {says(embedded)}: a "
            "model scores only the way it was trained; put back the tiling that adtr-export wrote into model.json"
        )


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 'tensorrt' | 'tensorrt:0' -> (kind, device index)."""
    kind, _, index = str(device).strip().lower().partition(":")
    if kind not in ("cpu", "cuda", "tensorrt") or (index and not index.isdigit()):
        raise BackendError(f"device {device!r} is not understood; use cpu, cuda, cuda:N, tensorrt or tensorrt:N")
    return kind, int(index or 0)


def check_graph_io(
    spec: ModelSpec,
    path: str | Path,
    input_name: str,
    input_shape: Sequence[int | str | None],
    output_names: Sequence[str],
) -> None:
    """Refuse a spec that does not describe this graph (wrong names or input size): it belongs to another model.

    `input_shape` is the graph's declared input shape; symbolic or unknown dimensions (str, None, -1) are not checked.
    """
    h, w = spec.input_size
    problems = []
    if input_name != spec.input_name:
        problems.append(f"input {input_name!r} (spec: {spec.input_name!r})")
    if set(output_names) != set(spec.output_names):
        problems.append(f"outputs {list(output_names)} (spec: {list(spec.output_names)})")
    expected = (None, h, w, 3)  # NHWC uint8; the batch axis is free
    shape = list(input_shape)
    if len(shape) != 4:
        problems.append(f"a {len(shape)}-D input (spec: N x {h} x {w} x 3)")
    else:
        for got, want in zip(shape, expected, strict=True):
            if want is not None and isinstance(got, int) and got > 0 and got != want:
                problems.append(f"input shape {shape} (spec: N x {h} x {w} x 3)")
                break
    if problems:
        raise BackendError(
            f"{path} has {' and '.join(problems)}: the model.json beside it belongs to another model; "
            "re-export the model so the two match"
        )


class Backend:
    """One inference engine. `run(batch)` takes uint8 RGB (N, H, W, 3) at the spec's input size and returns
    (anomaly_map (N, 1, H, W) float32, score (N,) float32)."""

    name = "base"
    max_batch: int | None = None  # the largest batch the model accepts (None: no limit known)
    local = True  # opens a model file on this machine; a served backend (Triton) sets False and takes a name instead
    concurrency = 1  # run() calls worth having in flight at once (ONNX Runtime with streams: one per stream)

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
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise BackendError(f"batch of {batch.shape[0]} is larger than this model's maximum of {self.max_batch}")
        return np.ascontiguousarray(batch, dtype=np.uint8)

    @staticmethod
    def as_outputs(amap: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fp16 engines return half floats; everything after the backend works in float32."""
        return np.asarray(amap, dtype=np.float32), np.asarray(score, dtype=np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "model": str(self.path)}

    def close(self) -> None:
        """Release engine resources (device memory, sessions). Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
