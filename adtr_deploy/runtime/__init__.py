"""The torch-free runtime: numpy, OpenCV and an inference engine (ONNX Runtime, TensorRT). Never imports torch here."""

from adtr_deploy.runtime.backends import BACKENDS, NAMED_BACKENDS, Backend, BackendError, open_model, read_spec
from adtr_deploy.runtime.inferencer import Inferencer
from adtr_deploy.runtime.line import Line
from adtr_deploy.runtime.pipeline import Pipeline, RunOptions, run_pipeline
from adtr_deploy.runtime.postprocess import Postprocessor, Prediction, overlay
from adtr_deploy.runtime.sources import Frame, Source, open_source

__all__ = [
    "BACKENDS",
    "NAMED_BACKENDS",
    "Backend",
    "BackendError",
    "Frame",
    "Inferencer",
    "Line",
    "Pipeline",
    "Postprocessor",
    "Prediction",
    "RunOptions",
    "Source",
    "open_model",
    "open_source",
    "overlay",
    "read_spec",
    "run_pipeline",
]
