"""What gets timed: the exported model on each backend this machine has, and the PyTorch eager reference.

A Runner turns a uint8 batch into a zero-argument callable that runs one inference and returns only once the results exist.
On a GPU two variants are timed where it matters: `copies included` (numpy in, numpy out: what an application sees) and
`device-resident` (input already on the device, outputs left there, the device synchronized): the difference is the cost of
the host-device copies, never hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.spec import ModelSpec

REFERENCE = "pytorch-eager"
# backend name -> (artifact suffix, device); the names --backends takes.
BACKEND_CHOICES: dict[str, tuple[str, str]] = {
    "onnxruntime-cpu": (".onnx", "cpu"),
    "onnxruntime-cuda": (".onnx", "cuda"),
    "tensorrt": (".engine", "cuda"),
    "torchscript-cpu": (".torchscript", "cpu"),
    "torchscript-cuda": (".torchscript", "cuda"),
    "pt2-cpu": (".pt2", "cpu"),  # torch.export + AOTInductor: a package runs on the device kind it was compiled for
    "pt2-cuda": (".pt2", "cuda"),
}
ARTIFACT_SUFFIXES = (".onnx", ".torchscript", ".engine", ".pt2")
FORMAT_FOLDERS = ("onnx", "torchscript", "tensorrt", "pt2")  # sub-folders of `adtr-export --format all` (pt2: by hand)


@dataclass(frozen=True)
class Runner:
    """One timed configuration. `bind(batch)` returns the callable that is timed for that batch."""

    name: str  # e.g. "onnxruntime-cpu", "pytorch-eager-cuda (device-resident)"
    backend: str  # the BACKEND_CHOICES key, or REFERENCE
    device: str  # "cpu" | "cuda"
    copies: str  # "n/a (cpu)" | "included" | "excluded (device-resident)"
    bind: Callable[[np.ndarray], Callable[[], Any]]
    info: dict = field(default_factory=dict)
    gpu_peak: Callable[[Callable[[], Any]], dict] | None = None  # GPU memory while running a callable, where measurable
    streams: int = 1  # inference streams: a timed call runs streams // batch batches at once, as adtr-run does

    def in_flight(self, batch_size: int) -> int:
        """Batches one timed call runs at once (images per call = batch size x this)."""
        return max(1, self.streams // batch_size)

    @property
    def is_reference(self) -> bool:
        return self.backend == REFERENCE


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def find_artifacts(model: str | Path) -> dict[str, Path]:
    """suffix -> exported model: `model` itself, the others beside it, and those of an `adtr-export --format all` folder
    (EXPORT/onnx, EXPORT/torchscript, EXPORT/tensorrt), whether `model` is that folder or a file inside one of them."""
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"--model {model} does not exist; give the model file or folder that adtr-export wrote")
    found: dict[str, Path] = {}
    if model.is_file():
        if model.suffix not in ARTIFACT_SUFFIXES:
            raise UserError(
                f"--model {model} is not an exported model ({', '.join(ARTIFACT_SUFFIXES)}); give what adtr-export wrote"
            )
        found[model.suffix] = model
    folder = model if model.is_dir() else model.parent
    folders = [folder, *(folder / sub for sub in FORMAT_FOLDERS)]
    if folder.name in FORMAT_FOLDERS:
        folders += [folder.parent / sub for sub in FORMAT_FOLDERS]
    for f in folders:
        if not f.is_dir():
            continue
        for p in sorted(f.iterdir()):
            if p.suffix in ARTIFACT_SUFFIXES and p.suffix not in found and p.is_file():
                found[p.suffix] = p
    if not found:
        raise FileNotFoundError(f"{folder} holds no exported model (model.onnx, model.torchscript, model.engine)")
    return found


def find_reference(spec: ModelSpec, model: str | Path) -> tuple[Path | None, str]:
    """The checkpoint an export came from: `checkpoint.pt` beside it, else the one adtr-export recorded in its spec
    (extra.checkpoint.path, checked against its recorded sha256). Returns (path or None, how it was found)."""
    model = Path(model)
    folder = model if model.is_dir() else model.parent
    if (folder / "checkpoint.pt").is_file():
        return folder / "checkpoint.pt", f"checkpoint.pt beside the export ({folder / 'checkpoint.pt'})"
    record = spec.extra.get("checkpoint")
    if isinstance(record, dict) and record.get("path"):
        path = Path(record["path"])
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            return None, f"the export records its checkpoint {path}, which is not there: speed-up ratios unavailable"
        note = f"recorded in the export's model.json ({path})"
        if record.get("sha256"):
            if sha256_file(path) != record["sha256"]:
                return None, f"{path} has changed since the export (sha256 differs): speed-up ratios unavailable"
            note += ", sha256 verified"
        return path, note
    return None, "no checkpoint beside or recorded in the export: speed-up ratios unavailable"


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch: the eager reference and TorchScript


def _torch_gpu_peak(torch, device: str) -> Callable[[Callable[[], Any]], dict]:
    def measure(call: Callable[[], Any]) -> dict:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return {
            "allocated_before_mb": before / 2**20,
            "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "method": "torch.cuda.max_memory_allocated (the PyTorch caching allocator)",
        }

    return measure


def _device_gpu_peak() -> Callable[[Callable[[], Any]], dict] | None:
    """Whole-device memory in use after a call (cudaMemGetInfo via torch): engines outside PyTorch's allocator."""
    try:
        import torch
    except ImportError:
        return None

    def measure(call: Callable[[], Any]) -> dict:
        free0, total = torch.cuda.mem_get_info()
        call()
        torch.cuda.synchronize()
        free1, _ = torch.cuda.mem_get_info()
        return {
            "device_used_before_mb": (total - free0) / 2**20,
            "device_used_after_mb": (total - free1) / 2**20,
            "method": "cudaMemGetInfo, whole device (includes other processes)",
        }

    return measure


def torch_runners(module: Any, backend: str, label: str, device: str, info: dict) -> list[Runner]:
    """Runners for a torch module (eager reference or TorchScript): on CPU one; on CUDA copies included and excluded."""
    import torch

    module = module.to(device).eval()

    def bind_host(batch: np.ndarray) -> Callable[[], Any]:
        def call():
            with torch.inference_mode():
                amap, score = module(torch.from_numpy(batch).to(device))
                return amap.cpu().numpy(), score.cpu().numpy()  # .cpu() waits for the device

        return call

    if device == "cpu":
        return [Runner(label, backend, "cpu", "n/a (cpu)", bind_host, info)]

    def bind_resident(batch: np.ndarray) -> Callable[[], Any]:
        x = torch.from_numpy(batch).to(device)

        def call():
            with torch.inference_mode():
                out = module(x)
            torch.cuda.synchronize(device)
            return out

        return call

    gpu_peak = _torch_gpu_peak(torch, device)
    return [
        Runner(f"{label}", backend, "cuda", "included", bind_host, info, gpu_peak),
        Runner(
            f"{label} (device-resident)", backend, "cuda", "excluded (device-resident)", bind_resident, info, gpu_peak
        ),
    ]


def reference_runners(checkpoint: str | Path, device: str) -> tuple[list[Runner], Any]:
    """The PyTorch eager reference from a checkpoint: (runners, the CPU module for FLOP counting)."""
    from adtr_deploy.model.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    info = {"checkpoint": str(checkpoint), "backbone": ckpt.get("config", {}).get("backbone")}
    label = REFERENCE if device == "cpu" else f"{REFERENCE}-cuda"
    runners = torch_runners(model, REFERENCE, label, device, info)
    return runners, model


def export_torchscript(checkpoint: Path, out_dir: Path) -> Path:
    """A TorchScript artifact made from the reference with adtr-export's own TorchScript export (verified), for runs
    whose export folder has none; the report records that it was made here."""
    from adtr_deploy.export import export_checkpoint

    return Path(export_checkpoint(checkpoint, "torchscript", out_dir, verify=True).path)


# ----------------------------------------------------------------------------------------------------------------------
# Exported-model backends through the runtime


# --spinning -> the onnxruntime-cpu sessions timed: intra-op threads spin-wait off (the runtime's default), on, or both
SPINNING: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}
SPINNING_SUFFIX = " (spinning)"


def _bind_run(backend: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
    def bind(batch: np.ndarray) -> Callable[[], Any]:
        return lambda: backend.run(batch)

    return bind


def _bind_in_flight(backend: Any, streams: int) -> Callable[[np.ndarray], Callable[[], Any]]:
    """A call that runs streams // batch copies of the batch at once (the first on the calling thread), each split over
    the free streams, as adtr-run's pipeline does; returns the first's outputs."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, streams - 1), "adtr-bench-stream")

    def bind(batch: np.ndarray) -> Callable[[], Any]:
        n = max(1, streams // len(batch))

        def call():
            others = [pool.submit(backend.run, batch) for _ in range(n - 1)]
            out = backend.run(batch)
            for f in others:
                f.result()
            return out

        return call

    return bind


def backend_runners(
    name: str, path: Path, threads: int | None, spinning: str = "off", streams: int = 1
) -> list[Runner]:
    """Runners for one runtime backend on `path`. Raises BackendError (with the reason) when it cannot run here.
    onnxruntime-cpu only: `spinning` "on" times a session whose idle intra-op threads spin-wait, "both" times it beside
    the default one (a second row, "onnxruntime-cpu (spinning)"); `streams` > 1 adds a row with that many concurrent
    sessions sharing the threads ("onnxruntime-cpu (N streams)", runtime/streams.py): below N images per batch each
    timed call runs N // batch batches at once, as adtr-run keeps them in flight; its images/s counts them all."""
    from adtr_deploy.runtime.backends import open_model

    if spinning not in SPINNING:
        raise ValueError(f"spinning {spinning!r} is not one of {', '.join(SPINNING)}")
    suffix, device = BACKEND_CHOICES[name]
    opts: dict[str, Any] = {}
    if name.startswith("onnxruntime") and threads:
        opts["threads"] = threads
    if name == "onnxruntime-cpu" and (spinning != "off" or streams > 1):
        runners = []
        for spin in SPINNING[spinning]:
            backend = open_model(path, device, spinning=spin, **opts)
            label = name + (SPINNING_SUFFIX if spin else "")
            runners.append(Runner(label, name, "cpu", "n/a (cpu)", _bind_run(backend), dict(backend.describe())))
        if streams > 1:  # timed as adtr-run runs it: streams // batch batches in flight, each split over free streams
            backend = open_model(path, device, streams=streams, **opts)
            label = f"{name} ({streams} streams)"
            info = dict(backend.describe())
            runners.append(
                Runner(label, name, "cpu", "n/a (cpu)", _bind_in_flight(backend, streams), info, None, streams)
            )
        return runners
    backend = open_model(path, device, **opts)
    info = dict(backend.describe())
    bind_run = _bind_run(backend)

    if device == "cpu":
        return [Runner(name, name, "cpu", "n/a (cpu)", bind_run, info)]
    runners = [Runner(name, name, "cuda", "included", bind_run, info, _device_gpu_peak())]
    if name == "onnxruntime-cuda":
        runners.append(_ort_resident(backend, info))
    elif name == "pt2-cuda":
        runners.append(_pt2_resident(backend, info))
    elif name == "torchscript-cuda":
        from adtr_deploy.runtime.base import parse_device

        torch_device = f"cuda:{parse_device(backend.device)[1]}"
        runners += [r for r in torch_runners(backend.module, name, name, torch_device, info) if "resident" in r.copies]
    return runners


def _ort_resident(backend: Any, info: dict) -> Runner:
    """ONNX Runtime CUDA with IO binding: input OrtValue on the device, outputs bound on the device, outputs synchronized."""
    import onnxruntime as ort

    def bind(batch: np.ndarray) -> Callable[[], Any]:
        session = backend.session
        binding = session.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), "cuda", 0)
        binding.bind_ortvalue_input(backend.input_name, x)
        for out in backend.spec.output_names:
            binding.bind_output(out, "cuda", 0)

        def call():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return binding

        return call

    return Runner(
        "onnxruntime-cuda (device-resident)", "onnxruntime-cuda", "cuda", "excluded (device-resident)", bind, info
    )


def _pt2_resident(backend: Any, info: dict) -> Runner:
    """A CUDA .pt2 package with the input already on the device, outputs left there, the device synchronized."""
    import torch

    def bind(batch: np.ndarray) -> Callable[[], Any]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(backend._device)

        def call():
            with torch.inference_mode():
                out = backend.module(x)
            torch.cuda.synchronize(backend._device)
            return out

        return call

    return Runner("pt2-cuda (device-resident)", "pt2-cuda", "cuda", "excluded (device-resident)", bind, info)


def build_runners(desc: dict) -> list[Runner]:
    """Runners from a plain description (so a child process can rebuild them for memory measurements):
    {"kind": "reference", "checkpoint", "device"} or {"kind": "backend", "name", "path", "threads", "spinning", "streams"}."""
    threads = desc.get("threads")
    if threads and (desc["kind"] == "reference" or desc.get("name", "").startswith(("torchscript", "pt2"))):
        import torch

        torch.set_num_threads(int(threads))
    if desc["kind"] == "reference":
        return reference_runners(desc["checkpoint"], desc["device"])[0]
    return backend_runners(
        desc["name"], Path(desc["path"]), threads, desc.get("spinning", "off"), desc.get("streams", 1)
    )


def available_backends(artifacts: dict[str, Path]) -> dict[str, str | None]:
    """backend name -> None when it can be tried here, else the reason it cannot."""
    gpu = cuda_available()
    out: dict[str, str | None] = {}
    for name, (suffix, device) in BACKEND_CHOICES.items():
        if suffix not in artifacts:
            out[name] = f"no {suffix} artifact beside the model"
        elif device == "cuda" and not gpu and name != "onnxruntime-cuda":
            out[name] = "no CUDA GPU visible to torch"
        elif name == "onnxruntime-cuda":
            try:
                import onnxruntime as ort
            except ImportError:
                out[name] = "onnxruntime is not installed"
                continue
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                out[name] = "the installed onnxruntime has no CUDAExecutionProvider (CPU build, or no GPU)"
            elif not gpu:
                out[name] = "no CUDA GPU visible"
            else:
                out[name] = None
        elif name.startswith("onnxruntime"):
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                out[name] = "onnxruntime is not installed"
                continue
            out[name] = None
        else:
            out[name] = None
    return out


def default_threads() -> int:
    """Physical cores where psutil knows them, else logical CPUs: what both PyTorch and ONNX Runtime default to."""
    from adtr_deploy.runtime.streams import physical_cores

    return physical_cores()
