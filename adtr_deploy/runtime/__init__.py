"""The torch-free runtime: numpy, OpenCV and an inference engine (ONNX Runtime, TensorRT). Never imports torch here."""

from adtr_deploy.runtime.backends import Backend, BackendError, open_model

__all__ = ["Backend", "BackendError", "open_model"]
