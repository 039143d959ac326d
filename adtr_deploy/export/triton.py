"""A Triton Inference Server model repository from an exported model (ONNX or TensorRT engine).

Layout written (Triton's documented repository layout; one model, version 1):

    REPO/MODEL/config.pbtxt      ModelConfig in protobuf text format; the ModelSpec rides in `parameters`
    REPO/MODEL/model.json        the ModelSpec, so the folder is self-describing (Triton ignores non-numeric entries)
    REPO/MODEL/1/model.onnx      platform onnxruntime_onnx   (or 1/model.plan, platform tensorrt_plan)
    REPO/MODEL/1/model.py        with backend="python" instead: backend python, running adtr-deploy's runtime on the
                                 ONNX model inside the server (export/triton_python.py; requirements.txt beside it)

The graph takes a uint8 RGB batch (N, H, W, 3) and returns anomaly_map (N, 1, H, W) float32 and score (N,) float32.
With max_batch_size > 0 Triton adds the batch axis itself, so dims leave it out. Triton forbids empty dims, so the
per-image scalar score is declared `dims: [ 1 ]` with `reshape: { shape: [ ] }`: the model produces (N,), clients
receive (N, 1). The config is written as text here (no dependency) and checked by parsing it into Triton's own
ModelConfig protobuf from tritonclient, which rejects unknown fields and bad enum values.
"""

from __future__ import annotations

import json
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_copy, atomic_write_text
from adtr_deploy.spec import METADATA_KEY, SPEC_FILENAME, ModelSpec, SpecError, spec_path_for

CONFIG_FILENAME = "config.pbtxt"
VERSION = "1"  # the one version folder we write; Triton's default policy serves the latest version

# exported artifact suffix -> (Triton platform, file name Triton expects in the version folder)
PLATFORMS: dict[str, tuple[str, str]] = {
    ".onnx": ("onnxruntime_onnx", "model.onnx"),
    ".engine": ("tensorrt_plan", "model.plan"),
    ".plan": ("tensorrt_plan", "model.plan"),
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# numpy/ONNX element type -> Triton model-config data type
DATA_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
TRT_PRECISIONS = ("fp32", "fp16")

# The row for the export CLI's table of formats (adtr_deploy/export/formats.py keys, plus what differs): Triton is not a
# new graph format but a repository around an exported ONNX model (or TensorRT engine), so it names the format it
# packages and a `writer` taking that artifact, instead of an `exporter` taking the torch model.
TRITON_FORMAT = {
    "filename": "model_repository/adtr/config.pbtxt",  # under --out; "adtr" is the default model name
    "suffix": ".pbtxt",
    "packages": ("onnx", "tensorrt"),  # onnx -> platform onnxruntime_onnx; tensorrt -> tensorrt_plan (GPU only)
    "writer": "adtr_deploy.export.triton:write_triton_repository",
    "dynamic_batch": True,  # Triton's dynamic batcher, up to max_batch_size
    "precisions": ("fp32", "fp16"),  # those of the packaged artifact
    "needs_gpu": False,
    "runs_on": "Triton Inference Server: ONNX Runtime backend on CPU or GPU instances, or TensorRT plan on GPU",
}


class TritonConfigError(UserError):
    """A Triton model configuration cannot be written or does not fit Triton's ModelConfig schema."""


def write_triton_repository(
    model_path: str | Path,
    repo_dir: str | Path,
    *,
    model_name: str = "adtr",
    max_batch_size: int = 8,
    instance_count: int = 1,
    kind: str = "cpu",
    preferred_batch_sizes: tuple[int, ...] | None = None,
    max_queue_delay_us: int = 500,
    gpus: tuple[int, ...] | None = None,
    ort_tensorrt: str | None = None,
    trt_workspace_bytes: int = 1 << 30,
    validate: bool | None = None,
    backend: str = "platform",
    python_env: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Write a Triton model repository for an exported model and return the model folder `repo_dir/model_name`.

    model_path: an exported `model.onnx` or `model.engine` (or the export folder holding one) with `model.json` beside.
    kind: "cpu" (KIND_CPU) or "gpu" (KIND_GPU) instances, `instance_count` of them (per GPU for "gpu").
    preferred_batch_sizes / max_queue_delay_us: the dynamic batcher; by default it prefers max_batch_size.
    ort_tensorrt: "fp32" or "fp16" lets Triton's ONNX Runtime backend run the ONNX model through its TensorRT
        execution provider on GPU instances (an optimization profile for batch 1..max_batch_size is declared).
    validate: parse the written config into Triton's ModelConfig (tritonclient.grpc.model_config_pb2). None: when
        tritonclient[grpc] is installed; True: required; False: skip.
    backend: "platform" (Triton's own backend for the artifact) or "python" (a Python-backend model.py running the
        ONNX model with adtr-deploy's runtime; export/triton_python.py). python_env: with "python", the stub's
        environment as the config's EXECUTION_ENV_PATH (default: the python3 on the server's PATH). threads: with
        "python", ONNX Runtime's intra-op threads per instance (default ORT's).
    """
    model_path = _find_model(Path(model_path))
    platform, filename = PLATFORMS[model_path.suffix]
    extra_params: dict[str, str] = {}
    if backend != "platform":
        from adtr_deploy.export.triton_python import python_backend_params

        extra_params = python_backend_params(backend, model_path, kind, ort_tensorrt, python_env, threads)
        platform = "python"
    proto = _onnx_proto(model_path) if platform == "onnxruntime_onnx" else None  # None: a plan, or onnx not installed
    spec = _read_spec(model_path, proto)
    _check_name(model_name)
    kind = kind.lower()
    if kind not in KINDS:
        raise TritonConfigError(f"instance kind {kind!r} is not supported; use one of {', '.join(KINDS)}")
    if platform == "tensorrt_plan" and kind != "gpu":
        raise TritonConfigError("a TensorRT engine runs only on GPU instances; use kind='gpu' (--triton-kind gpu)")
    if ort_tensorrt is not None:
        if ort_tensorrt not in TRT_PRECISIONS:
            raise TritonConfigError(f"ort_tensorrt {ort_tensorrt!r} is not supported; use one of {TRT_PRECISIONS}")
        if platform != "onnxruntime_onnx" or kind != "gpu":
            raise TritonConfigError(
                "the ONNX Runtime TensorRT accelerator applies to an ONNX model on GPU instances; "
                "use an .onnx model with kind='gpu', or leave ort_tensorrt unset"
            )
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise TritonConfigError(
            f"max_batch_size must be an integer >= 1 (got {max_batch_size!r}); Triton batches for us"
        )
    if not isinstance(instance_count, int) or instance_count < 1:
        raise TritonConfigError(f"instance_count must be an integer >= 1 (got {instance_count!r})")
    if max_queue_delay_us < 0:
        raise TritonConfigError(f"max_queue_delay_us must be >= 0 (got {max_queue_delay_us})")
    preferred = tuple(sorted(set(preferred_batch_sizes or (max_batch_size,))))
    if preferred[0] < 1 or preferred[-1] > max_batch_size:
        raise TritonConfigError(
            f"preferred batch sizes {list(preferred)} must lie in 1..max_batch_size ({max_batch_size})"
        )
    out_types = _check_graph(model_path, proto, spec, max_batch_size)

    text = triton_config(
        spec,
        model_name=model_name,
        platform=platform,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        kind=kind,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=int(max_queue_delay_us),
        gpus=gpus,
        ort_tensorrt=ort_tensorrt,
        trt_workspace_bytes=trt_workspace_bytes,
        output_types=out_types,
        extra_parameters=extra_params,
    )
    if validate or validate is None:
        pb2 = _model_config_pb2(required=bool(validate))
        if pb2 is not None:
            parse_config(text, pb2)

    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(name for _, name in PLATFORMS.values()) - {filename}:
        (version_dir / stale).unlink(missing_ok=True)  # a re-export to another platform must not leave two models
    atomic_copy(model_path, version_dir / filename)
    for data in _external_data(model_path, proto):
        atomic_copy(model_path.parent / data, version_dir / data)
    spec.save(model_dir / SPEC_FILENAME)
    if platform == "python":
        from adtr_deploy.export.triton_python import write_python_model

        write_python_model(version_dir, spec)
    else:
        (version_dir / "model.py").unlink(missing_ok=True)  # back to a platform: Triton must not see a Python model
    atomic_write_text(model_dir / CONFIG_FILENAME, text)
    return model_dir


def triton_config(
    spec: ModelSpec,
    *,
    model_name: str,
    platform: str,
    max_batch_size: int,
    instance_count: int,
    kind: str,
    preferred_batch_sizes: tuple[int, ...],
    max_queue_delay_us: int,
    gpus: tuple[int, ...] | None = None,
    ort_tensorrt: str | None = None,
    trt_workspace_bytes: int = 1 << 30,
    output_types: tuple[str, str] = ("TYPE_FP32", "TYPE_FP32"),
    extra_parameters: dict[str, str] | None = None,
) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig) for a model with this spec."""
    h, w = spec.input_size
    map_name, score_name = spec.output_names
    in_type = DATA_TYPES.get(spec.input_dtype)
    if in_type is None:
        raise TritonConfigError(f"input dtype {spec.input_dtype!r} has no Triton type; the spec must say uint8")
    lines = [
        f"name: {_quote(model_name)}",
        f"backend: {_quote(platform)}" if platform == "python" else f"platform: {_quote(platform)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_quote(spec.input_name)}",
        f"    data_type: {in_type}",
        f"    dims: [ {h}, {w}, 3 ]",  # NHWC without the batch axis
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quote(map_name)}",
        f"    data_type: {output_types[0]}",
        f"    dims: [ 1, {h}, {w} ]",
        "  },",
        "  {",
        f"    name: {_quote(score_name)}",
        f"    data_type: {output_types[1]}",
        "    dims: [ 1 ]",  # the model gives (N,); Triton needs non-empty dims and reshapes to (N, 1)
        *(["    reshape: { shape: [ ] }"] if platform != "python" else []),  # model.py hands out (N, 1) itself
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {KINDS[kind]}",
    ]
    if gpus and kind == "gpu":
        lines.append(f"    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]")
    lines += ["  }", "]"]
    if ort_tensorrt:
        shape = f"{h}x{w}x3"
        opt = max(preferred_batch_sizes)
        trt = {
            "precision_mode": ort_tensorrt.upper(),
            "max_workspace_size_bytes": str(int(trt_workspace_bytes)),
            # one profile covering every batch the dynamic batcher can form, so no engine rebuild at run time
            "trt_profile_min_shapes": f"{spec.input_name}:1x{shape}",
            "trt_profile_opt_shapes": f"{spec.input_name}:{opt}x{shape}",
            "trt_profile_max_shapes": f"{spec.input_name}:{max_batch_size}x{shape}",
        }
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator [", "      {"]
        lines.append('        name: "tensorrt"')
        lines += [f"        parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in trt.items()]
        lines += ["      }", "    ]", "  }", "}"]
    spec_json = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    for key, value in {METADATA_KEY: spec_json, **(extra_parameters or {})}.items():
        lines += ["parameters {", f"  key: {_quote(key)}", f"  value: {{ string_value: {_quote(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def parse_config(text: str, pb2=None):
    """Parse config.pbtxt text into Triton's ModelConfig message; TritonConfigError names the offending line.

    pb2: the module tritonclient.grpc.model_config_pb2 (imported when not given).
    """
    from google.protobuf import text_format

    pb2 = pb2 or _model_config_pb2(required=True)
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise TritonConfigError(f"the Triton model config does not fit Triton's ModelConfig schema: {exc}") from None
    return config


def _model_config_pb2(required: bool):
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient raises RuntimeError when its grpc extra is missing
        if required:
            raise TritonConfigError(
                "validating a Triton config needs tritonclient with gRPC support; "
                "install it with pip install 'adtr-deploy[triton]'"
            ) from None
        return None
    return model_config_pb2


def _find_model(path: Path) -> Path:
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix in PLATFORMS and p.is_file()]
        if not found:
            raise TritonConfigError(f"{path} holds no model.onnx or model.engine; export one first with adtr-export")
        path = found[0]
    if not path.is_file():
        raise TritonConfigError(
            f"model file {path} does not exist; give the model.onnx or model.engine adtr-export wrote"
        )
    if path.suffix not in PLATFORMS:
        raise TritonConfigError(
            f"{path.name}: Triton serving takes an exported .onnx or .engine model, not {path.suffix!r}"
        )
    return path


def _read_spec(model_path: Path, proto) -> ModelSpec:
    """The model.json beside the artifact wins; an ONNX model's embedded copy is the fallback."""
    if spec_path_for(model_path).is_file():
        return ModelSpec.load(spec_path_for(model_path))
    embedded = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY) if proto is not None else None
    if embedded:
        return ModelSpec.from_json(embedded)
    raise SpecError(
        f"{model_path} has no {SPEC_FILENAME} beside it; export it with adtr-export, which writes the spec beside the model"
    )


def _onnx_proto(path: Path):
    """The ONNX model without its weights, or None where the onnx package is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TritonConfigError(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None


def _check_graph(model_path: Path, proto, spec: ModelSpec, max_batch_size: int) -> tuple[str, str]:
    """Check the ONNX graph's names and batch axis against the spec; return the Triton types of the two outputs.

    A TensorRT engine cannot be read without TensorRT: it is taken on the spec's word (outputs FP32).
    """
    if proto is None:
        return ("TYPE_FP32", "TYPE_FP32")
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names_in = [i.name for i in inputs]
    names_out = [o.name for o in graph.output]
    if names_in != [spec.input_name] or tuple(names_out) != tuple(spec.output_names):
        raise TritonConfigError(
            f"{model_path} has inputs {names_in} and outputs {names_out}, but its spec says {spec.input_name!r} and "
            f"{list(spec.output_names)}; the spec belongs to another model: re-export"
        )
    batch = inputs[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value") and batch.dim_value < max_batch_size:
        raise TritonConfigError(
            f"{model_path} has a fixed batch size of {batch.dim_value}, below max_batch_size {max_batch_size}; "
            "export it with a dynamic batch axis (adtr-export does by default)"
        )
    from onnx import TensorProto

    onnx_types = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16"}
    types = [onnx_types.get(o.type.tensor_type.elem_type) for o in graph.output]
    if None in types:
        raise TritonConfigError(f"{model_path} has outputs that are neither float32 nor float16; re-export the model")
    return types[0], types[1]


def _external_data(model_path: Path, proto) -> list[str]:
    """Relative names of the external weight files an ONNX model refers to (they must travel with it)."""
    if model_path.suffix != ".onnx":
        return []
    if proto is None:  # onnx not installed: the name torch.onnx.export gives external data
        return sorted(p.name for p in model_path.parent.glob(model_path.name + ".data"))
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in '/\\"\n') or name.strip() != name:
        raise TritonConfigError(
            f"model name {name!r} cannot be a Triton model folder; use letters, digits, '-', '_' or '.'"
        )


def _quote(value: str) -> str:
    """A protobuf text-format string literal (backslash and double quote escaped; JSON never holds raw newlines)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
