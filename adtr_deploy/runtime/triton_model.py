"""The model.py of a Triton Python-backend repository (adtr-export --format triton --triton-backend python).

adtr-export copies this file verbatim into REPO/MODEL/1/model.py. Inside the server, Triton's Python-backend stub
imports it and calls `TritonPythonModel.initialize/execute/finalize`; execute runs the exported ONNX model through the
torch-free runtime (OnnxRuntimeBackend), so preprocessing and postprocessing of adtr-deploy can run in the server too.

The stub runs in its own Python environment (the `python3` first on the server's PATH, or the EXECUTION_ENV_PATH
parameter of the model config), not the server's. What that environment needs is REQUIREMENTS below (also written as
REPO/MODEL/requirements.txt); `check_environment()` checks it when the server loads the model, and a missing or wrong
package fails the load with one sentence in the server log instead of wrong answers later: with numpy >= 2 the stub of
Triton 2.51 (the nvidia-pytriton 0.7.0 wheel) hands back output tensors of size 0. `python model.py --check` runs the
same check in any interpreter and prints the result as JSON (what `adtr triton serve` does before starting a server).

Nothing is imported at module level but the standard library, so the check can report what is missing.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

# pip requirement lines of the stub's environment; the numpy bound is the stub's ABI, onnxruntime runs the model
REQUIREMENTS = ("numpy>=1.24,<2", "onnxruntime>=1.17")
MAKE_ENV = "make one with `adtr triton env DIR` and serve with `adtr triton serve REPO --python-env DIR`"


def check_environment() -> list[str]:
    """What this interpreter lacks to serve the model: a list of short phrases, empty when it is fit."""
    problems = []
    try:
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2:
            problems.append(
                f"numpy is {numpy.__version__} but Triton's Python-backend stub needs numpy<2 "
                "(with numpy 2 it answers with empty tensors)"
            )
    except ImportError:
        problems.append("numpy is not installed")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        problems.append("onnxruntime is not installed")
    try:
        import adtr_deploy.runtime.backends  # noqa: F401
    except ImportError as exc:
        problems.append(f"adtr_deploy's runtime cannot be imported ({exc})")
    return problems


def environment_report() -> dict:
    """The check's result with what it ran on, as `python model.py --check` prints it."""
    versions = {}
    for name in ("numpy", "onnxruntime", "adtr_deploy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return {
        "python": sys.executable,
        "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "prefix": sys.prefix,
        "libdir": sysconfig.get_config_var("LIBDIR"),  # where the stub, linked to libpythonX.Y.so, finds it
        "versions": versions,
        "problems": check_environment(),
    }


class TritonPythonModel:
    """One instance per Triton model instance. Requests that the dynamic batcher hands over together run as one batch."""

    def initialize(self, args: dict) -> None:
        problems = check_environment()
        if problems:
            raise RuntimeError(
                f"adtr model {args.get('model_name')!r} cannot run in the Python-backend environment {sys.prefix} "
                f"(python {sys.executable}): {'; '.join(problems)}; {MAKE_ENV}"
            )
        from adtr_deploy.runtime.backends import OnnxRuntimeBackend

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        threads = int(params.get("adtr_threads") or 0) or None
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.backend = OnnxRuntimeBackend(version_dir / "model.onnx", "cpu", threads=threads)
        self.input_name = self.backend.spec.input_name
        self.map_name, self.score_name = self.backend.spec.output_names

    def execute(self, requests: list) -> list:
        import numpy as np
        import triton_python_backend_utils as pb_utils

        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            maps, scores = self.backend.run(np.concatenate(batches) if len(batches) > 1 else batches[0])
        except Exception as exc:  # one error answer per request; the instance stays up for the next ones
            error = pb_utils.TritonError(f"adtr model failed on this batch: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for batch in batches:
            end = start + len(batch)
            outputs = [
                pb_utils.Tensor(self.map_name, np.ascontiguousarray(maps[start:end], dtype=np.float32)),
                # config dims [1]: the score leaves as (n, 1), as the ONNX platform's reshape gives it
                pb_utils.Tensor(self.score_name, np.ascontiguousarray(scores[start:end], np.float32).reshape(-1, 1)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            start = end
        return responses

    def finalize(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        report = environment_report()
        print(json.dumps(report, allow_nan=False))
        sys.exit(1 if report["problems"] else 0)
    print("usage: python model.py --check   (checks this interpreter can serve the model in Triton)", file=sys.stderr)
    sys.exit(2)
