"""Inference backends: one small class per engine, chosen from the model file's suffix. No torch at import time.

Every backend takes a uint8 RGB batch (N, H, W, 3) at the spec's input size and returns (anomaly_map (N, 1, H, W) float32,
score (N,) float32). It reads the ModelSpec from `model.json` beside the file, or from the artifact's own metadata, and
refuses a spec that does not describe the graph it opened.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from adtr_deploy.runtime.base import Backend, BackendError, check_graph_io, parse_device, read_spec
from adtr_deploy.runtime.openvino import OpenVINOBackend
from adtr_deploy.runtime.pt2 import Pt2Backend
from adtr_deploy.runtime.streams import open_streams, threads_per_stream
from adtr_deploy.runtime.tensorrt import TensorRTBackend
from adtr_deploy.runtime.triton import TritonBackend
from adtr_deploy.spec import METADATA_KEY, SPEC_FILENAME

__all__ = [
    "BACKENDS",
    "NAMED_BACKENDS",
    "Backend",
    "BackendError",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "Pt2Backend",
    "TensorRTBackend",
    "TorchScriptBackend",
    "backend_class",
    "model_file",
    "open_model",
    "read_spec",
]

# --device -> ONNX Runtime execution providers, most preferred first. ORT silently drops a provider it cannot load,
# so the session's get_providers() is checked against the first entry after the session is made.
ORT_PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    Options: `threads` (intra-op threads; default ORT's, the physical cores), `spinning` (let idle intra-op threads
    spin-wait for work between operators). Spinning is a property of the machine, not the model, measured on 2 cores
    (benchmarks/results/speed_levers_s6.md): on otherwise idle cores it is 1.2-1.3x faster at batch 1 (no thread wake-up
    between the graph's ~300 operators); when other processes want the cores it is 10-25% slower, and on a heavily
    loaded machine (load 11-14) 1.9x slower. The default is off (it never loses much); a dedicated box turns it on
    (`adtr-run --spin`) after `adtr-bench --spinning both` shows it wins there. `allow_fallback` (run on whatever ORT
    picked, with a warning, instead of refusing), `io_binding` (default: on for GPU devices), `trt_cache_dir`
    (TensorRT engine cache, default `trt_cache/` beside the model), `fp16` (TensorRT provider in fp16; default: the
    spec's precision), `streams` (CPU: this many concurrent runs sharing `threads`, on one session when each gets one
    thread, else one session each; a batch is split over the free ones, adtr_deploy/runtime/streams.py).
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        *,
        threads: int | None = None,
        spinning: bool = False,
        allow_fallback: bool = False,
        io_binding: bool | None = None,
        trt_cache_dir: str | Path | None = None,
        fp16: bool | None = None,
        streams: int = 1,
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed; install it with pip install 'adtr-deploy[cpu]' (or [gpu] on an NVIDIA machine)"
            ) from None
        kind, index = parse_device(device)
        if streams < 1:
            raise BackendError(f"--streams {streams} must be at least 1 (1: one session, the default)")
        if streams > 1 and kind != "cpu":
            raise BackendError(
                f"--streams {streams} needs --device cpu: inference streams are CPU sessions sharing the cores, and a "
                "GPU runs the whole batch at once; leave --streams at 1 on a GPU"
            )
        if streams > 1:
            threads = threads_per_stream(threads, streams)
        path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.threads, self.spinning = threads, spinning
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The spec decides the TensorRT precision unless the caller says otherwise; read it before the session exists.
        spec_hint = read_spec(path, None, verify=False) if path.with_name(SPEC_FILENAME).is_file() else None
        if fp16 is None:
            fp16 = bool(spec_hint and spec_hint.precision == "fp16")
        providers = self._providers(kind, index, path, trt_cache_dir, fp16)
        wanted = ORT_PROVIDERS[kind][0]
        available = ort.get_available_providers()
        missing = wanted not in available
        # Asking for a provider this onnxruntime build lacks only makes ORT log a warning and skip it; we skip it
        # ourselves and say why below.
        providers = [p for p in providers if (p[0] if isinstance(p, tuple) else p) in available]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except onnx_file_errors(ort) as exc:
            if not is_bad_onnx_file(exc):
                raise
            raise BackendError(f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        super().__init__(path, read_spec(path, meta.get(METADATA_KEY)), device)
        self.providers = self.session.get_providers()
        self.fallback: str | None = None
        if missing or self.providers[0] != wanted:
            self.fallback = (
                f"--device {kind} asks for ONNX Runtime's {wanted}, but this session runs on {self.providers[0]} "
                + (
                    "because the installed onnxruntime has no such provider (install onnxruntime-gpu, not onnxruntime, "
                    "via adtr-deploy[gpu])"
                    if missing
                    else "because the provider failed to load (no GPU, or its CUDA/cuDNN/TensorRT libraries are missing)"
                )
            )
            if not allow_fallback:
                raise BackendError(
                    self.fallback + "; fix that, or use --device cpu (or --allow-fallback to run anyway)"
                )
            warnings.warn(self.fallback, RuntimeWarning, stacklevel=2)

        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        check_graph_io(self.spec, path, inp.name, inp.shape, self.output_names)
        if isinstance(inp.shape[0], int) and inp.shape[0] > 0:
            self.max_batch = inp.shape[0]
        # Outputs are fetched by the spec's names, so a graph that orders them differently still works.
        self._fetch = list(self.spec.output_names)
        on_gpu = self.providers[0] != "CPUExecutionProvider"
        self.io_binding = on_gpu if io_binding is None else io_binding
        self._ort_device = ("cuda", index) if on_gpu else ("cpu", 0)
        self._ort = ort
        # streams of one thread each run the one session concurrently (one copy of the weights; runtime/streams.py)
        self._streams = open_streams(
            lambda: ort.InferenceSession(str(path), sess_options=opts, providers=providers),
            self.session,
            streams,
            share=threads == 1,
        )
        self.concurrency = streams  # sessions that can run at once (the pipeline keeps streams // batch in flight)

    @staticmethod
    def _providers(kind: str, index: int, path: Path, trt_cache_dir, fp16: bool) -> list:
        cuda = ("CUDAExecutionProvider", {"device_id": index})
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        if kind == "cuda":
            return [cuda, "CPUExecutionProvider"]
        cache = _writable_cache(Path(trt_cache_dir) if trt_cache_dir else path.parent / "trt_cache", path)
        trt = (
            "TensorrtExecutionProvider",
            {
                "device_id": index,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_fp16_enable": bool(fp16),
            },
        )
        return [trt, cuda, "CPUExecutionProvider"]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self.check_batch(batch)
        if self.io_binding:
            return self._run_bound(batch)
        if self._streams is not None:  # any batch size: a single frame takes whichever session is free
            amap, score = self._streams.run(self._fetch, self.input_name, batch)
            return self.as_outputs(amap, score)
        amap, score = self.session.run(self._fetch, {self.input_name: batch})
        return self.as_outputs(amap, score)

    def _run_bound(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IO binding: the input is copied once from host to the device, outputs stay on the device until the copy back,
        so ORT does not stage them through its own host buffers."""
        device, index = self._ort_device
        binding = self.session.io_binding()
        x = self._ort.OrtValue.ortvalue_from_numpy(batch, device, index)
        binding.bind_ortvalue_input(self.input_name, x)
        for name in self._fetch:
            binding.bind_output(name, device, index)
        self.session.run_with_iobinding(binding)
        amap, score = binding.copy_outputs_to_cpu()
        return self.as_outputs(amap, score)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "providers": self.providers,
            "intra_op_threads": self.threads,  # None: ORT's default (the physical cores)
            "spinning": self.spinning,
            "streams": self.concurrency,
            "io_binding": self.io_binding,
            "fallback": self.fallback,
        }

    def close(self) -> None:
        if self._streams is not None:
            self._streams.close()


def onnx_file_errors(ort) -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises when the file itself is not a model it can load (onnxruntime 1.32, tried with a text
    file, an empty file, a truncated model, a dangling node input, an unknown op, a type clash, an unknown opset and a
    missing file: tests/test_runtime.py): InvalidProtobuf, InvalidArgument, InvalidGraph, NoSuchFile, and Fail for type
    and opset errors; NotImplemented for an op no kernel implements. Out of memory (RuntimeException, MemoryError) and
    provider failures (EPFail, RuntimeException) are not among them: they reach the user as they are."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidArgument", "InvalidGraph", "NoSuchFile", "NotImplemented", "Fail")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


def is_bad_onnx_file(exc: BaseException) -> bool:
    """A load error of the file (not, say, a bad session option): ONNX Runtime says "Load model from PATH failed"."""
    return "Load model" in str(exc) or type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile")


def _writable_cache(wanted: Path, model: Path) -> Path:
    """TensorRT engines take minutes to build, so ORT keeps them on disk: beside the model, or in the user's cache
    folder when the model lies on a read-only path."""
    for folder in (wanted, Path.home() / ".cache" / "adtr-deploy" / "trt" / model.parent.name):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise BackendError(f"no writable folder for the TensorRT engine cache ({wanted}); pass trt_cache_dir=WRITABLE_DIR")


class TorchScriptBackend(Backend):
    """TorchScript through torch, imported only when this backend is chosen."""

    name = "torchscript"

    def __init__(self, path: str | Path, device: str = "cpu"):
        try:
            import torch
        except ImportError:
            raise BackendError(
                "the TorchScript backend needs torch; install it, or run the .onnx model instead"
            ) from None
        kind, index = parse_device(device)
        if kind == "tensorrt":
            raise BackendError("--device tensorrt needs an .onnx or .engine model; TorchScript runs on cpu or cuda")
        torch_device = "cpu" if kind == "cpu" else f"cuda:{index}"
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu")
        extra = {SPEC_FILENAME: ""}
        try:
            self.module = torch.jit.load(str(path), map_location=torch_device, _extra_files=extra)
        except Exception as exc:
            raise BackendError(
                f"{path} is not a loadable TorchScript model ({str(exc).splitlines()[0][:200]})"
            ) from None
        super().__init__(path, read_spec(path, extra[SPEC_FILENAME] or None), device)
        self.module.eval()
        self._torch = torch
        self._device = torch_device
        self._check_outputs()

    def _check_outputs(self) -> None:
        """TorchScript keeps no I/O names, so the spec is checked by shape: one image through must give an
        (1, 1, H, W) map and a (1,) score at the spec's input size."""
        h, w = self.spec.input_size
        try:
            amap, score = self.run(np.zeros((1, h, w, 3), np.uint8))
            ok = amap.shape == (1, 1, h, w) and score.shape == (1,)
        except Exception:
            ok = False
        if not ok:
            raise BackendError(
                f"{self.path} does not produce a ({h}, {w}) anomaly map and a score from a {h}x{w} image, as its "
                "model.json says: the spec belongs to another model; re-export the model so the two match"
            )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            amap, score = self.module(torch.from_numpy(self.check_batch(batch)).to(self._device))
        return self.as_outputs(amap.float().cpu().numpy(), score.float().cpu().numpy())


# suffix -> backend class (the default choice for a model file).
BACKENDS: dict[str, type[Backend]] = {
    ".onnx": OnnxRuntimeBackend,
    ".engine": TensorRTBackend,
    ".plan": TensorRTBackend,
    ".torchscript": TorchScriptBackend,
    ".pt": TorchScriptBackend,
    ".pt2": Pt2Backend,
    ".xml": OpenVINOBackend,  # OpenVINO IR (model.xml + model.bin); an .onnx runs on it with --backend openvino
}

# --backend NAME -> backend class, for an explicit choice (a served model, e.g. Triton, has no local file to look at).
NAMED_BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "tensorrt": TensorRTBackend,
    "torchscript": TorchScriptBackend,
    "pt2": Pt2Backend,
    "openvino": OpenVINOBackend,  # model.onnx or model.xml; --device cpu, gpu or npu
    "triton": TritonBackend,  # remote: --model is the served model's name, --url the server
}


def backend_class(path: str | Path, backend: str | None = None) -> type[Backend]:
    """The class that opens `path`: `backend` by name, or else the one its file suffix names."""
    if backend not in (None, "auto"):
        cls = NAMED_BACKENDS.get(backend)
        if cls is None:
            raise BackendError(f"unknown backend {backend!r}; choose one of auto, {', '.join(NAMED_BACKENDS)}")
        return cls
    path = model_file(path)
    cls = BACKENDS.get(path.suffix.lower())
    if cls is None:
        raise BackendError(f"{path}: unknown model type {path.suffix!r}; expected one of {', '.join(BACKENDS)}")
    return cls


def open_model(path: str | Path, device: str = "cpu", *, backend: str | None = None, **options) -> Backend:
    """Open an exported model. The backend is `backend` by name, or else chosen by the file's suffix; `path` may also be
    an export folder (the first model file in it is used). `options` go to the backend class."""
    cls = backend_class(path, backend)
    return cls(model_file(path) if cls.local else path, device, **options)


def is_training_checkpoint(path: Path) -> bool:
    """A torch.save zip (what adtr-train writes) rather than a TorchScript archive: it has data.pkl but no code/.
    Read with zipfile only, so the torch-free runtime can tell the user to export it instead of failing to load it."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/data.pkl") for n in names) and not any("/code/" in n for n in names)


def _not_exported(path: Path) -> BackendError:
    return BackendError(
        f"{path} is a training checkpoint, not an exported model; export it first "
        f"(adtr-export --model {path} --format onnx --out EXPORT_DIR) and run EXPORT_DIR/model.onnx"
    )


def model_file(path: str | Path) -> Path:
    """The model file itself: `path`, or the first model file in an export folder. Training checkpoints are refused
    with the export command to run."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix.lower() in BACKENDS and p.is_file()]
        exported = [p for p in found if not (p.suffix.lower() == ".pt" and is_training_checkpoint(p))]
        if not exported and found:
            raise _not_exported(found[0])
        if not exported:
            raise BackendError(
                f"{path} holds no exported model (model.onnx, model.engine, model.torchscript or model.pt2)"
            )
        return exported[0]
    if not path.is_file():
        raise BackendError(f"model file {path} does not exist; give the file that adtr-export wrote")
    if path.suffix.lower() in (".pt", ".pth", ".ckpt") and is_training_checkpoint(path):
        raise _not_exported(path)
    return path
