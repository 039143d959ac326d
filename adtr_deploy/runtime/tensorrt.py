"""Native TensorRT engines (.engine) through the TensorRT 10/11 tensor-name API, with device buffers from cuda-python.

Nothing heavy is imported here at module level: `tensorrt` and `cuda.bindings` are imported when an engine is opened, so
this module loads (and its compatibility check runs) on machines without a GPU.

A serialized engine runs only with the TensorRT version that built it and on the GPU architecture it was built for; the
export records both in model.json (`extra`), and an engine whose record differs from this machine is refused up front with
one sentence, instead of failing inside deserialization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.runtime.base import Backend, BackendError, check_graph_io, parse_device, read_spec
from adtr_deploy.spec import ModelSpec

# Where the export records the build environment in ModelSpec.extra (flat keys; a nested "tensorrt" dict is read too).
RECORD_KEYS = {
    "tensorrt_version": ("tensorrt_version", "trt_version"),
    "gpu_name": ("gpu_name", "gpu", "device_name"),
    "compute_capability": ("compute_capability", "gpu_compute_capability", "sm"),
}


def recorded_build(spec: ModelSpec) -> dict[str, str]:
    """The TensorRT version and GPU an engine was built with, as recorded in its spec (missing keys are left out)."""
    sources = [spec.extra, spec.extra.get("tensorrt") if isinstance(spec.extra.get("tensorrt"), dict) else {}]
    found = {}
    for key, aliases in RECORD_KEYS.items():
        for src in sources:
            hit = next((src[a] for a in aliases if src.get(a) not in (None, "")), None)
            if hit is not None:
                found[key] = _norm(key, hit)
                break
    return found


def _norm(key: str, value: Any) -> str:
    if key == "compute_capability" and isinstance(value, list | tuple):
        return ".".join(str(v) for v in value)
    return str(value).strip()


def compatibility_problem(recorded: dict[str, str], installed: dict[str, str]) -> str | None:
    """One sentence saying why an engine built in `recorded` cannot run in `installed`, or None when it can.

    TensorRT plans are tied to the exact TensorRT version and to the GPU architecture (compute capability); a different
    GPU model of the same architecture runs, so a name difference alone is not refused.
    """
    if not recorded:
        return None  # an engine without a record (built by hand): let TensorRT itself decide
    built, here = recorded.get("tensorrt_version"), installed.get("tensorrt_version")
    if built and here and built != here:
        return (
            f"this engine was built with TensorRT {built} but TensorRT {here} is installed; engines only run with the "
            "TensorRT that built them: rebuild it here with adtr-export --format tensorrt, or install TensorRT " + built
        )
    built_cc, here_cc = recorded.get("compute_capability"), installed.get("compute_capability")
    if built_cc and here_cc and built_cc != here_cc:
        gpu = recorded.get("gpu_name", "another GPU")
        return (
            f"this engine was built for {gpu} (compute capability {built_cc}) but this GPU, "
            f"{installed.get('gpu_name', '?')}, has compute capability {here_cc}; rebuild the engine on this machine "
            "with adtr-export --format tensorrt"
        )
    return None


def check_engine_spec(spec: ModelSpec, installed: dict[str, str]) -> None:
    """Raise BackendError when the engine's recorded build does not fit this machine. Uses the export's own check when it
    provides one (adtr_deploy.export.tensorrt.check_engine_compatible), so both sides apply the same rule."""
    problem = compatibility_problem(recorded_build(spec), installed)
    if problem:
        raise BackendError(problem)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "a .engine model needs TensorRT; install it with pip install 'adtr-deploy[tensorrt]' on an NVIDIA GPU "
            "machine, or run the .onnx model instead"
        ) from None
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(
                "a .engine model needs cuda-python for its GPU buffers; install it with pip install "
                "'adtr-deploy[tensorrt]'"
            ) from None
    return cudart


class _Cuda:
    """The few CUDA runtime calls we need, each checked: cuda-python returns (error, value...) tuples."""

    def __init__(self, cudart):
        self.rt = cudart

    def __call__(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise BackendError(f"CUDA call {what} failed with {name}; check the GPU driver and that a GPU is visible")
        return rest[0] if len(rest) == 1 else rest


def installed_build(trt, cuda: _Cuda, device_index: int) -> dict[str, str]:
    """This machine's TensorRT version, GPU name and compute capability."""
    count = cuda(cuda.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device_index >= count:
        raise BackendError(f"GPU {device_index} was requested but this machine has {count} CUDA GPU(s)")
    prop = cuda(cuda.rt.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": name.rstrip("\x00").strip(),
        "compute_capability": f"{prop.major}.{prop.minor}",
    }


class TensorRTBackend(Backend):
    """A serialized TensorRT engine. Device buffers are allocated once for the largest batch of the engine's optimization
    profile; each run copies the batch in, executes on our own CUDA stream and copies the two outputs back."""

    name = "tensorrt"

    def __init__(self, path: str | Path, device: str = "cuda"):
        kind, index = parse_device(device)
        if kind == "cpu":
            raise BackendError(
                "a TensorRT engine runs only on an NVIDIA GPU; use --device cuda, or run the .onnx model with --device cpu"
            )
        path = Path(path)
        spec = read_spec(path)
        trt = _import_tensorrt()
        cuda = _Cuda(_import_cudart())
        self._buffers: list = []
        self._stream = None
        self._cuda = cuda
        super().__init__(path, spec, device)
        self.installed = installed_build(trt, cuda, index)
        _check_compatible(spec, self.installed)
        cuda(cuda.rt.cudaSetDevice(index), "cudaSetDevice")

        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                f"TensorRT could not deserialize {path} (corrupt file, or built by another TensorRT/GPU); rebuild it "
                "with adtr-export --format tensorrt"
            )
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1:
            raise BackendError(f"{path} has inputs {inputs}; an ADTR engine has exactly one image input")
        self.input_name = inputs[0]
        self.output_names = outputs
        shape = list(engine.get_tensor_shape(self.input_name))  # -1 marks the dynamic batch axis
        check_graph_io(spec, path, self.input_name, shape, outputs)
        if shape[0] == -1:
            # profile 0: (min, opt, max) shapes; the max batch bounds the buffers we allocate
            self.max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        else:
            self.max_batch = int(shape[0])
        self.context = engine.create_execution_context()
        self._stream = cuda(cuda.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        h, w = spec.input_size
        self._full_shapes = {self.input_name: (self.max_batch, h, w, 3)}
        self.context.set_input_shape(self.input_name, (self.max_batch, h, w, 3))
        for n in outputs:
            self._full_shapes[n] = tuple(self.context.get_tensor_shape(n))
        self._device_ptr = {}
        for n in names:
            nbytes = int(np.prod(self._full_shapes[n])) * self._dtypes[n].itemsize
            ptr = cuda(cuda.rt.cudaMalloc(nbytes), "cudaMalloc")
            self._buffers.append(ptr)
            self._device_ptr[n] = ptr
            self.context.set_tensor_address(n, int(ptr))
        if self._dtypes[self.input_name] != np.uint8:
            raise BackendError(f"{path} takes {self._dtypes[self.input_name]} input; ADTR engines take uint8 images")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self.check_batch(batch)
        cuda, rt = self._cuda, self._cuda.rt
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.context.set_input_shape(self.input_name, batch.shape)
        cuda(
            rt.cudaMemcpyAsync(self._device_ptr[self.input_name], batch.ctypes.data, batch.nbytes, h2d, self._stream),
            "cudaMemcpyAsync (input)",
        )
        if not self.context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT failed to run {self.path} on a batch of {batch.shape[0]}")
        host = {}
        for n in self.output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            cuda(
                rt.cudaMemcpyAsync(out.ctypes.data, self._device_ptr[n], out.nbytes, d2h, self._stream),
                "cudaMemcpyAsync",
            )
            host[n] = out
        cuda(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        amap_name, score_name = self.spec.output_names
        return self.as_outputs(host[amap_name], host[score_name])

    def describe(self) -> dict:
        return {
            **super().describe(),
            "max_batch": self.max_batch,
            **{f"installed_{k}": v for k, v in self.installed.items()},
        }

    def close(self) -> None:
        rt = self._cuda.rt
        for ptr in self._buffers:
            rt.cudaFree(ptr)
        self._buffers = []
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _check_compatible(spec: ModelSpec, installed: dict[str, str]) -> None:
    """The export's check when it is importable without torch, else ours (the same rule on the same record)."""
    check_engine_spec(spec, installed)
