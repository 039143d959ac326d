"""Native TensorRT engines (.engine) through the TensorRT 10/11 tensor-name API, with device buffers from cuda-python.

Nothing heavy is imported here at module level: `tensorrt` and `cuda.bindings` are imported when an engine is opened, so
this module loads on machines without a GPU and opening an engine there fails with one sentence saying what is missing.

A serialized engine runs only with the TensorRT version that built it and on the GPU architecture it was built for; the
export records both in model.json (extra["tensorrt"]), and `engine_check.check_engine_compatible` (the same rule the export
uses) refuses an engine whose record differs from this machine up front, instead of failing inside deserialization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adtr_deploy.runtime.base import Backend, BackendError, check_graph_io, parse_device, read_spec
from adtr_deploy.runtime.engine_check import EngineCompatibilityError, TensorRTUnavailable, check_engine_compatible
from adtr_deploy.spec import ModelSpec


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
        trt = _import_tensorrt()
        cuda = _Cuda(_import_cudart())
        spec = read_spec(path)  # after the imports: a machine without TensorRT says so first
        self._buffers: list = []
        self._stream = None
        self._cuda = cuda
        super().__init__(path, spec, device)
        self.installed = _check_compatible(spec, index)
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
        if self._dtypes[self.input_name] != np.uint8:
            raise BackendError(f"{path} takes {self._dtypes[self.input_name]} input; ADTR engines take uint8 images")
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


def _check_compatible(spec: ModelSpec, index: int) -> dict:
    """Refuse an engine whose recorded build (model.json extra["tensorrt"]) does not match this machine; return this
    machine's TensorRT/GPU facts."""
    try:
        return check_engine_compatible(spec, index)
    except (EngineCompatibilityError, TensorRTUnavailable) as exc:
        raise BackendError(str(exc)) from None
