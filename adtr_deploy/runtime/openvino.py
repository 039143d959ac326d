"""OpenVINO: our ONNX files read directly, or the IR (model.xml + model.bin) `adtr-export --format openvino` writes.

The precision OpenVINO computes in is set explicitly from the artifact's verified precision (model.json): OpenVINO's
own default on a CPU with AVX-512 BF16 or AMX is bfloat16 for an FP32 model, which nothing verified, so an FP32 or INT8
artifact runs with INFERENCE_PRECISION_HINT f32 (INT8: the layers the export left in FP32 stay FP32, as verified) and
only a BF16 or INT8-BF16 export (verified as such) runs in bf16 (an FP16 precision would run f16, for GPUs; no format
offers it yet). `threads` and `streams` mean what they mean for ONNX
Runtime: `threads` CPU threads in all (INFERENCE_NUM_THREADS; default: the physical cores), `streams` inference runs at
once sharing them (OpenVINO's NUM_STREAMS, one infer request per stream; a batch is split over them as ONNX Runtime's
streams split it, runtime/streams.py). Our exports keep the batch axis dynamic; OpenVINO's CPU plugin runs a model
compiled for one static shape faster (INT8 9-15 % at batch 1, 4-12 % at batch 8: docs/bench.md, "Static shapes"), so each
batch size the backend meets gets its own static compilation, made the first time (about a second), for at most
STATIC_SHAPES sizes; other sizes, and batches split into unequal parts over the streams, run on the dynamic one.
Torch-free; openvino is imported only when this backend is chosen.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from adtr_deploy.fileio import sha256_file
from adtr_deploy.runtime.base import Backend, BackendError, check_graph_io, read_spec
from adtr_deploy.runtime.streams import physical_cores
from adtr_deploy.spec import METADATA_KEY

INSTALL_HINT = "install it with pip install 'adtr-deploy[openvino]'"
# --device (ours, lower case) -> OpenVINO device name; "gpu.1" / "gpu:1" pick one of several GPUs
OV_DEVICES: dict[str, str] = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# the artifact's verified precision -> INFERENCE_PRECISION_HINT; INT8 keeps the layers the export left in FP32 in f32
PRECISION_HINTS: dict[str, str] = {
    "fp32": "f32",
    "bf16": "bf16",
    "fp16": "f16",
    "int8": "f32",
    "int8-dynamic": "f32",
    "int8-bf16": "bf16",  # an OpenVINO export: int8 where the graph says, the rest in bf16
}
# How many batch (part) sizes get a static-shape compilation of their own; each holds its own copy of the compiled
# weights (a few MB to tens of MB for lite0), so a run that meets many sizes (a folder's last batch, a camera's
# varying batches) is bounded. 0 turns static compilation off.
STATIC_SHAPES = 4
# where the spec lives in the model's rt_info: our IR (SPEC_RT_KEY), an ONNX file's metadata_props (framework/...)
SPEC_RT_KEY = [METADATA_KEY]
ONNX_SPEC_RT_KEY = ["framework", METADATA_KEY]


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError(
            f"the OpenVINO backend needs the openvino package, which is not installed; {INSTALL_HINT}"
        ) from None
    return openvino


def ov_device(device: str) -> str:
    """'cpu' | 'gpu' | 'gpu.1' | 'gpu:1' | 'npu' (any case) -> OpenVINO's 'CPU', 'GPU', 'GPU.1', 'NPU'."""
    kind, sep, index = str(device).strip().lower().replace(":", ".").partition(".")
    if kind not in OV_DEVICES or (sep and not index.isdigit()):
        raise BackendError(
            f"device {device!r} is not an OpenVINO device; use cpu, gpu, gpu.N or npu with --backend openvino"
        )
    return OV_DEVICES[kind] + (f".{index}" if sep else "")


def embedded_spec(model) -> str | None:
    """The spec adtr-export embedded: in our IR's rt_info, or in the ONNX file's metadata that OpenVINO keeps."""
    for key in (SPEC_RT_KEY, ONNX_SPEC_RT_KEY):
        try:
            if model.has_rt_info(key):
                return str(model.get_rt_info(key).astype(str))
        except (RuntimeError, TypeError, AttributeError):
            continue
    return None


# model file suffix -> the one OpenVINO frontend that reads it (Core.read_model tries every frontend on a bad file, and
# the TensorFlow one prints its parse errors to stderr)
FRONTENDS: dict[str, str] = {".onnx": "onnx", ".xml": "ir"}


def read_model(ov, core, path: Path):
    """The model through its own frontend (FRONTENDS), else through Core.read_model."""
    name = FRONTENDS.get(path.suffix.lower())
    if name is None:
        return core.read_model(str(path))
    frontend = ov.frontend.FrontEndManager().load_by_framework(name)
    return frontend.convert(frontend.load(str(path)))


def ov_errors() -> tuple[type[BaseException], ...]:
    """What OpenVINO raises for a file or graph it cannot handle: RuntimeError, and its frontends' GeneralFailure,
    OpConversionFailure, InitializationFailure, NotImplementedFailure (not RuntimeError subclasses)."""
    from openvino import _pyopenvino as native

    names = (
        "GeneralFailure",
        "OpConversionFailure",
        "InitializationFailure",
        "NotImplementedFailure",
        "OpValidationFailure",
    )
    return (RuntimeError, *(getattr(native, n) for n in names if isinstance(getattr(native, n, None), type)))


def last_line(exc: BaseException) -> str:
    """OpenVINO's messages start with lines of source locations; the last line says what is wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def check_weights(spec, path: Path) -> None:
    """An IR's weights are in model.bin, which the sha256 of model.xml in model.json does not cover: the export records
    the .bin's own sha256, and a different one (weights of another export copied in) is refused."""
    recorded = (spec.extra.get("openvino") or {}).get("bin_sha256") if isinstance(spec.extra, dict) else None
    weights = path.with_suffix(".bin")
    if recorded and path.suffix.lower() == ".xml" and weights.is_file() and sha256_file(weights) != recorded:
        raise BackendError(
            f"{weights} is not the model.bin that adtr-export wrote with {path.name} (its sha256 differs from the one "
            "model.json records): it belongs to another export; copy the export folder whole"
        )


class _Requests:
    """One OpenVINO infer request per stream. A batch is split into contiguous parts, one per stream (never more parts
    than images), the parts run at once with start_async, outputs concatenated in batch order; several
    callers may run batches at once (the pipeline keeps streams // batch in flight), each taking its requests all at
    once (no caller holds some while waiting for more). Every Python-side call into the requests (inputs in, outputs
    out) happens under one lock, only the waits outside it: with blocking infer() calls from two Python threads at once,
    one run in 12 here hung for good inside infer's input copy (OpenVINO 2026.4, Python 3.10)."""

    def __init__(self, compiled, count: int):
        self.compiled, self.count = compiled, count
        self._free = [compiled.create_infer_request() for _ in range(count)]
        self._cond = threading.Condition()

    def run(self, fetch: list[str], batch: np.ndarray) -> list[np.ndarray]:
        parts = np.array_split(batch, max(1, min(self.count, len(batch))))
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) >= len(parts))
            requests = [self._free.pop() for _ in parts]
            try:
                for request, part in zip(requests, parts):
                    request.start_async({0: part})  # the input is copied into the request's own tensor
            except BaseException:
                self._free.extend(requests)
                self._cond.notify_all()
                raise
        try:
            for request in requests:
                request.wait()  # releases the GIL
        finally:
            with self._cond:
                outputs = [[np.array(r.get_tensor(name).data, copy=True) for name in fetch] for r in requests]
                self._free.extend(requests)
                self._cond.notify_all()
        return [np.concatenate([out[i] for out in outputs]) for i in range(len(fetch))]


class OpenVINOBackend(Backend):
    """OpenVINO on its CPU, GPU or NPU plugin (see the module docstring for precision, threads and streams)."""

    name = "openvino"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        *,
        threads: int | None = None,
        streams: int = 1,
        static_shapes: int = STATIC_SHAPES,
    ):
        ov = import_openvino()
        target = ov_device(device)
        if streams < 1:
            raise BackendError(f"--streams {streams} must be at least 1 (1: one inference at a time, the default)")
        path = Path(path)
        core = ov.Core()
        available = core.available_devices
        if target not in available and target not in {d.split(".")[0] for d in available}:
            raise BackendError(
                f"--device {device} asks for OpenVINO's {target} plugin, but this machine has only "
                f"{', '.join(available) or 'none'}; use --device cpu (or install that device's driver)"
            )
        try:
            model = read_model(ov, core, path)
        except ov_errors() as exc:
            raise BackendError(
                f"{path} is not a model OpenVINO can read ({last_line(exc)}); give the model.onnx or model.xml "
                "that adtr-export wrote (an IR needs its model.bin beside it)"
            ) from None
        if len(model.inputs) != 1:
            raise BackendError(
                f"{path} has {len(model.inputs)} inputs, not the one image input adtr-export writes; give the "
                "model.onnx or model.xml that adtr-export wrote"
            )
        super().__init__(path, read_spec(path, embedded_spec(model)), device)
        check_weights(self.spec, path)
        inp = model.inputs[0]
        shape = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
        check_graph_io(self.spec, path, inp.get_any_name(), shape, [o.get_any_name() for o in model.outputs])
        if shape and shape[0]:
            self.max_batch = shape[0]
        self.precision = self.spec.precision
        hint = PRECISION_HINTS.get(self.precision)
        if hint is None:
            raise BackendError(f"{path} is a {self.precision} model, which the OpenVINO backend does not run")
        if hint == "bf16" and not target.startswith("CPU"):
            raise BackendError(
                f"{path} is a {self.precision} export, whose BF16 OpenVINO runs on the CPU; on {target} use an fp32 or "
                "int8 export"
            )
        config: dict = {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": str(streams)}
        self.threads = (threads or physical_cores()) if target.startswith("CPU") else None
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        self._core, self._config, self._model = core, config, model
        self.target, self.hint, self.version = target, hint, ov.__version__
        self.compiled = self._compile(model)
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = str(getattr(ran, "get_type_name", lambda: ran)())
        self.ov_streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._fetch = list(self.spec.output_names)
        self._requests = _Requests(self.compiled, streams)
        self.concurrency = streams
        # batch part size -> requests of its static compilation; only for a dynamic batch axis
        self._static: dict[int, _Requests] = {}
        self._static_limit = static_shapes if not (shape and shape[0]) else 0
        self._static_lock = threading.Lock()
        self.static_error: str | None = None  # why a static compilation failed (then only the dynamic one runs)
        if not self._static_limit:
            self._model = None

    def _compile(self, model):
        try:
            return self._core.compile_model(model, self.target, self._config)
        except ov_errors() as exc:
            raise BackendError(
                f"OpenVINO could not compile {self.path} for {self.target} at {self.hint} ({last_line(exc)}); "
                "try --device cpu"
            ) from None

    def _requests_for(self, count: int) -> _Requests:
        """The requests a batch of `count` images runs on: the static compilation of its part size (made now if this is
        a new size and fewer than STATIC_SHAPES exist), else the dynamic one."""
        parts = max(1, min(self.concurrency, count))
        if count % parts:
            return self._requests
        size = count // parts
        requests = self._static.get(size)
        if requests is not None or self._model is None:
            return requests or self._requests
        with self._static_lock:  # a new size compiles once, while other callers of new sizes wait
            requests = self._static.get(size)
            if requests is None and self._model is not None:
                model = self._model.clone()
                h, w = self.spec.input_size
                try:
                    model.reshape({model.inputs[0].get_any_name(): [size, h, w, 3]})
                    requests = self._static[size] = _Requests(self._compile(model), self.concurrency)
                except (BackendError, *ov_errors()) as exc:  # an optimization only: the dynamic compilation runs
                    self.static_error, self._model = last_line(exc), None
                    return self._requests
                if len(self._static) >= self._static_limit:
                    self._model = None  # the limit is reached: the graph (and its weights) is no longer needed
        return requests or self._requests

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self.check_batch(batch)
        amap, score = self._requests_for(len(batch)).run(self._fetch, batch)
        return self.as_outputs(amap, score)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "openvino": self.version,
            "ov_device": self.target,
            "precision": self.precision,
            "inference_precision_hint": self.hint,
            "inference_precision": self.inference_precision,  # what the plugin runs: f32 where the CPU lacks BF16
            "threads": self.threads,
            "streams": self.ov_streams,
            "static_batch_sizes": sorted(self._static),  # part sizes compiled for a static shape so far
            **({"static_error": self.static_error} if self.static_error else {}),
        }
