"""Triton serving: the model repository adtr-export writes, checked against Triton's own ModelConfig schema, and the
Triton client backend, tested on the wire against small KServe-v2 servers (HTTP/REST with the binary tensor extension,
and gRPC with tritonclient's own service definition) that run a real ONNX Runtime session of a tiny exported ADTR.

These servers speak the documented protocol subset tritonclient uses and apply the served config the way Triton does
(batch axis + dims, output reshape, max_batch_size); they are not Triton. They stay for what the real server of
tests/test_triton_server.py (Triton 2.51 from the nvidia-pytriton wheel, Python backend only) cannot load: the
onnxruntime_onnx platform repository and its score reshape. Everything else is shown there against the real server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from adtr_deploy.export.triton import TritonConfigError, parse_config, write_triton_repository
from adtr_deploy.runtime.backends import NAMED_BACKENDS, BackendError, OnnxRuntimeBackend, open_model
from adtr_deploy.spec import ModelSpec, SpecError
from tests.conftest import export_tiny_onnx, texture_images


def _import_or_skip(name: str):
    """tritonclient raises RuntimeError (not ImportError) when a protocol extra is missing: skip on either."""
    import importlib

    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"{name} is not usable here ({exc}); install adtr-deploy[triton]", allow_module_level=True)


pb2 = _import_or_skip("tritonclient.grpc.model_config_pb2")
TIMEOUT_S = 10.0  # every client call and server wait in this file is bounded by this


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ADTR exported to ONNX (dynamic batch) with its model.json, as adtr-export lays it out."""
    return export_tiny_onnx(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def repo(exported, tmp_path_factory):
    """A repository served by the test servers: max_batch_size 4, so a batch of 6 must go out in two requests."""
    root = tmp_path_factory.mktemp("repo")
    model_dir = write_triton_repository(exported, root, max_batch_size=4, preferred_batch_sizes=(2, 4), validate=True)
    return model_dir


# --- the repository and its config ---------------------------------------------------------------------------------


def test_repository_layout_and_config_parse_into_tritons_model_config(exported, tmp_path):
    model_dir = write_triton_repository(
        exported, tmp_path / "models", model_name="detector", max_batch_size=8, instance_count=2,
        preferred_batch_sizes=(8, 4), max_queue_delay_us=250, validate=True,
    )  # fmt: skip
    assert model_dir == tmp_path / "models" / "detector"
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported.read_bytes()
    spec = ModelSpec.load(model_dir / "model.json")
    assert spec == ModelSpec.load(exported.with_name("model.json"))

    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("detector", "onnxruntime_onnx", 8)
    (inp,) = cfg.input
    assert inp.name == "image" and inp.data_type == pb2.TYPE_UINT8 and list(inp.dims) == [64, 64, 3]
    amap, score = cfg.output
    assert amap.name == "anomaly_map" and amap.data_type == pb2.TYPE_FP32 and list(amap.dims) == [1, 64, 64]
    assert not amap.HasField("reshape")
    # Triton's documented form of a per-sample scalar with batching: dims [1] reshaped to [] for the model.
    assert score.name == "score" and list(score.dims) == [1]
    assert score.HasField("reshape") and list(score.reshape.shape) == []
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    (group,) = cfg.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_CPU and group.count == 2
    assert not cfg.HasField("optimization")
    assert ModelSpec.from_json(cfg.parameters["adtr_spec"].string_value) == spec


def test_external_weights_travel_with_the_model(exported, tmp_path):
    """The dynamo exporter writes weights to model.onnx.data: Triton needs that file beside 1/model.onnx."""
    import onnx
    import onnxruntime as ort

    src = tmp_path / "export"
    src.mkdir()
    onnx.save(onnx.load(str(exported)), str(src / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    (src / "model.json").write_text(exported.with_name("model.json").read_text())
    model_dir = write_triton_repository(src / "model.onnx", tmp_path / "repo")
    assert (model_dir / "1" / "model.onnx.data").read_bytes() == (src / "model.onnx.data").read_bytes()
    x = texture_images(2, 64, seed=5)
    served = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(served.run(None, {"image": x})[1], ref.run(None, {"image": x})[1])


def test_gpu_config_carries_instance_gpus_and_the_ort_tensorrt_accelerator(exported, tmp_path):
    model_dir = write_triton_repository(
        exported, tmp_path, kind="gpu", gpus=(0, 1), max_batch_size=16, preferred_batch_sizes=(4, 8),
        ort_tensorrt="fp16", validate=True,
    )  # fmt: skip
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    (group,) = cfg.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1]
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_profile_min_shapes"] == "image:1x64x64x3"
    assert acc.parameters["trt_profile_opt_shapes"] == "image:8x64x64x3"
    assert acc.parameters["trt_profile_max_shapes"] == "image:16x64x64x3"


def test_schema_check_rejects_unknown_fields_and_bad_enums(repo):
    text = (repo / "config.pbtxt").read_text()
    parse_config(text)
    with pytest.raises(TritonConfigError, match="max_batch_sizes"):
        parse_config(text.replace("max_batch_size:", "max_batch_sizes:"))
    with pytest.raises(TritonConfigError, match="KIND_TPU"):
        parse_config(text.replace("KIND_CPU", "KIND_TPU"))
    with pytest.raises(TritonConfigError, match="TYPE_FLOAT"):
        parse_config(text.replace("TYPE_FP32", "TYPE_FLOAT", 1))


def test_engine_becomes_a_tensorrt_plan_on_gpu_instances_only(exported, tmp_path):
    # Not a real engine (TensorRT is not installed here): this checks the layout and config, not that Triton loads it.
    src = tmp_path / "export"
    src.mkdir()
    (src / "model.engine").write_bytes(b"engine bytes stand-in")
    ModelSpec.load(exported.with_name("model.json")).replace(format="tensorrt", precision="fp16").save(
        src / "model.json"
    )
    with pytest.raises(TritonConfigError, match="GPU instances"):
        write_triton_repository(src / "model.engine", tmp_path / "repo")
    model_dir = write_triton_repository(src, tmp_path / "repo", kind="gpu", validate=True)
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine bytes stand-in"
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 4, "preferred_batch_sizes": (2, 8)}, "must lie in 1..max_batch_size"),
        ({"kind": "tpu"}, "kind 'tpu' is not supported"),
        ({"ort_tensorrt": "fp16"}, "GPU instances"),
        ({"model_name": "a/b"}, "cannot be a Triton model folder"),
        ({"max_batch_size": 0}, "max_batch_size must be"),
    ],
)
def test_bad_options_are_refused_with_one_sentence(exported, tmp_path, kwargs, match):
    with pytest.raises(TritonConfigError, match=match):
        write_triton_repository(exported, tmp_path, **kwargs)
    assert not (tmp_path / "adtr").exists()  # nothing half-written


def test_model_without_spec_is_refused(exported, tmp_path):
    lone = tmp_path / "model.onnx"
    lone.write_bytes(exported.read_bytes())  # no model.json beside it, no embedded spec
    with pytest.raises(SpecError, match="model.json"):
        write_triton_repository(lone, tmp_path / "repo")


# --- test servers speaking the KServe v2 protocol --------------------------------------------------------------------

NP_TYPES = {"UINT8": np.uint8, "FP32": np.float32}
CONFIG_TO_WIRE = {pb2.TYPE_UINT8: "UINT8", pb2.TYPE_FP32: "FP32"}


class ServedModel:
    """What Triton does for one loaded model, reduced to what we test: check the request against the config
    (names, types, dims, max_batch_size), run ONNX Runtime, reshape outputs to [batch] + dims. Records requests."""

    def __init__(self, model_dir, serve_spec: bool = True):
        import onnxruntime as ort
        from google.protobuf import json_format

        self.config = parse_config((model_dir / "config.pbtxt").read_text())
        if not serve_spec:
            self.config.ClearField("parameters")
        self.name = self.config.name
        self.config_json = json_format.MessageToDict(self.config, preserving_proto_field_name=True)
        self.session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.requests: list[tuple[str, str, list[int]]] = []
        self.encodings: list[str] = []  # HTTP only: how each input tensor travelled ("binary" or "json")

    def infer(self, inputs: dict[str, tuple[str, list[int], np.ndarray]]) -> dict[str, tuple[str, np.ndarray]]:
        feed = {}
        for spec in self.config.input:
            if spec.name not in inputs:
                raise ValueError(f"missing input {spec.name}")
            datatype, shape, data = inputs[spec.name]
            self.requests.append((spec.name, datatype, list(shape)))
            if datatype != CONFIG_TO_WIRE[spec.data_type] or list(shape[1:]) != list(spec.dims):
                raise ValueError(f"input {spec.name}: got {datatype} {shape}, config says {list(spec.dims)}")
            if not 1 <= shape[0] <= self.config.max_batch_size:
                raise ValueError(f"batch {shape[0]} exceeds max_batch_size {self.config.max_batch_size}")
            feed[spec.name] = data.reshape(shape)
        values = self.session.run([o.name for o in self.config.output], feed)
        n = next(iter(feed.values())).shape[0]
        return {
            o.name: (CONFIG_TO_WIRE[o.data_type], v.reshape([n, *o.dims]))  # Triton's output reshape
            for o, v in zip(self.config.output, values)
        }


class KServeHTTPHandler(BaseHTTPRequestHandler):
    """The KServe v2 HTTP/REST subset tritonclient.http uses: health, model ready, model config, infer (JSON tensors
    or the binary tensor extension: JSON header of Inference-Header-Content-Length bytes, then raw tensor bytes)."""

    protocol_version = "HTTP/1.1"
    model: ServedModel

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not headers else "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode())

    def _model_path(self, suffix: str) -> bool:
        parts = self.path.strip("/").split("/")  # v2/models/NAME[/versions/V]/SUFFIX
        return parts[:2] == ["v2", "models"] and parts[2] == self.model.name and parts[-1] == suffix

    def do_GET(self):
        if self.path in ("/v2/health/live", "/v2/health/ready"):
            return self._send(200, b"")
        if self.path.endswith("/ready"):
            return self._send(200 if self._model_path("ready") else 400, b"")
        if self._model_path("config"):
            return self._json(200, _ints_for_dims(self.model.config_json))
        self._json(404, {"error": f"unknown path {self.path}"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not self._model_path("infer"):
            return self._json(404, {"error": "unknown model"})
        header_len = int(self.headers.get("Inference-Header-Content-Length") or len(body))
        request, binary = json.loads(body[:header_len]), body[header_len:]
        inputs, offset = {}, 0
        for t in request["inputs"]:
            dtype = NP_TYPES[t["datatype"]]
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                data = np.frombuffer(binary[offset : offset + size], dtype=dtype)
                offset += size
            else:
                data = np.asarray(t["data"], dtype=dtype)
            self.model.encodings.append("json" if size is None else "binary")
            inputs[t["name"]] = (t["datatype"], t["shape"], data)
        try:
            results = self.model.infer(inputs)
        except ValueError as exc:
            return self._json(400, {"error": str(exc)})
        wanted = request.get("outputs") or [{"name": n, "parameters": {"binary_data": True}} for n in results]
        outputs, blobs = [], []
        for o in wanted:
            datatype, value = results[o["name"]]
            entry = {"name": o["name"], "datatype": datatype, "shape": list(value.shape)}
            if (o.get("parameters") or {}).get("binary_data"):
                raw = np.ascontiguousarray(value).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = value.ravel().tolist()
            outputs.append(entry)
        header = json.dumps({"model_name": self.model.name, "outputs": outputs}).encode()
        if blobs:
            self._send(200, header + b"".join(blobs), {"Inference-Header-Content-Length": len(header)})
        else:
            self._send(200, header)


def _ints_for_dims(obj):
    """Triton's HTTP config endpoint writes int64 dims as JSON numbers (protobuf's JSON would give strings)."""
    if isinstance(obj, dict):
        return {k: ([int(d) for d in v] if k in ("dims", "shape") else _ints_for_dims(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_ints_for_dims(v) for v in obj]
    return obj


class HTTPServer:
    def __init__(self, model: ServedModel):
        handler = type("Handler", (KServeHTTPHandler,), {"model": model})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT_S)


def grpc_server(model: ServedModel):
    """A real gRPC server built on tritonclient's GRPCInferenceService definition (the service Triton implements)."""
    import grpc
    from tritonclient.grpc import service_pb2 as s
    from tritonclient.grpc import service_pb2_grpc as sg

    class Servicer(sg.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return s.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return s.ServerReadyResponse(ready=True)

        def ModelReady(self, request, context):
            return s.ModelReadyResponse(ready=request.name == model.name)

        def ModelConfig(self, request, context):
            if request.name != model.name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name}")
            return s.ModelConfigResponse(config=model.config)

        def ModelInfer(self, request, context):
            inputs = {}
            for i, t in enumerate(request.inputs):  # raw_input_contents[i] holds input i
                data = np.frombuffer(request.raw_input_contents[i], dtype=NP_TYPES[t.datatype])
                inputs[t.name] = (t.datatype, list(t.shape), data)
            try:
                results = model.infer(inputs)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            response = s.ModelInferResponse(model_name=model.name)
            for o in request.outputs or [s.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in results]:
                datatype, value = results[o.name]
                response.outputs.add(name=o.name, datatype=datatype, shape=list(value.shape))
                response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sg.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http_server(repo):
    _import_or_skip("tritonclient.http")
    model = ServedModel(repo)
    server = HTTPServer(model)
    yield server, model
    server.close()


# --- the client backend on the wire ----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_client_equals_local_onnxruntime(http_server, exported, binary, monkeypatch):
    from adtr_deploy.runtime.triton import TritonBackend

    server, model = http_server
    # Opened the way the runtime opens every backend by name: open_model(model, device, backend=..., **options).
    monkeypatch.setitem(NAMED_BACKENDS, "triton", TritonBackend)
    backend = open_model("adtr", backend="triton", url=server.url, protocol="http", timeout_s=TIMEOUT_S, binary=binary)
    assert isinstance(backend, TritonBackend)
    try:
        assert backend.spec == ModelSpec.load(exported.with_name("model.json"))  # read from the served config
        assert backend.max_batch_size == 4
        x = texture_images(6, 64, seed=11)
        model.requests.clear()
        model.encodings.clear()
        maps, scores = backend.run(x)
    finally:
        backend.close()
    # Six frames with max_batch_size 4 went out as two requests; each named, typed and shaped as the config says.
    assert model.requests == [("image", "UINT8", [4, 64, 64, 3]), ("image", "UINT8", [2, 64, 64, 3])]
    assert model.encodings == ["binary" if binary else "json"] * 2
    ref_maps, ref_scores = OnnxRuntimeBackend(exported).run(x)
    assert maps.shape == (6, 1, 64, 64) and maps.dtype == np.float32
    assert scores.shape == (6,) and scores.dtype == np.float32
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0  # real images give different scores; the comparison is not on constants
    info = backend.describe()
    assert info["backend"] == "triton" and info["instance_group"] == ["1x KIND_CPU"]


def test_grpc_client_equals_local_onnxruntime(repo, exported):
    _import_or_skip("grpc")
    from adtr_deploy.runtime.triton import TritonBackend

    model = ServedModel(repo)
    server, url = grpc_server(model)
    try:
        backend = TritonBackend("adtr", url=url, protocol="grpc", timeout_s=TIMEOUT_S)
        x = texture_images(5, 64, seed=12)
        maps, scores = backend.run(x)
        backend.close()
    finally:
        server.stop(grace=None).wait(TIMEOUT_S)
    assert model.requests == [("image", "UINT8", [4, 64, 64, 3]), ("image", "UINT8", [1, 64, 64, 3])]
    ref_maps, ref_scores = OnnxRuntimeBackend(exported).run(x)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_unreachable_server_and_unknown_model_give_clear_errors(http_server):
    from adtr_deploy.runtime.triton import TritonBackend

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BackendError, match=rf"Triton server at 127.0.0.1:{port} \(http\) is not reachable"):
        TritonBackend("adtr", url=f"127.0.0.1:{port}", protocol="http", timeout_s=2.0)
    server, _ = http_server
    with pytest.raises(BackendError, match="model 'other' is not ready"):
        TritonBackend("other", url=server.url, protocol="http", timeout_s=TIMEOUT_S)
    with pytest.raises(BackendError, match="protocol 'ws' is not supported"):
        TritonBackend("adtr", url=server.url, protocol="ws")


def test_config_without_spec_needs_a_local_model_json(repo, exported):
    _import_or_skip("tritonclient.http")
    from adtr_deploy.runtime.triton import TritonBackend

    server = HTTPServer(ServedModel(repo, serve_spec=False))
    try:
        with pytest.raises(BackendError, match="--spec"):
            TritonBackend("adtr", url=server.url, protocol="http", timeout_s=TIMEOUT_S)
        backend = TritonBackend(
            "adtr", url=server.url, protocol="http", timeout_s=TIMEOUT_S, spec_path=exported.with_name("model.json")
        )
        assert backend.spec.input_size == (64, 64)
        backend.close()
    finally:
        server.close()


def test_runtime_import_does_not_import_tritonclient():
    code = "import sys, adtr_deploy.runtime, adtr_deploy.runtime.triton; print('tritonclient' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["False"]


def test_adtr_run_cli_sends_a_folder_to_triton_and_matches_local_results(http_server, exported, tmp_path):
    """`adtr-run --backend triton` end to end: real PNG files -> runtime preprocessing -> the wire -> results.jsonl."""
    import json

    import cv2
    from click.testing import CliRunner

    from adtr_deploy.cli.run import command as run_command

    server, _model = http_server
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(texture_images(3, 64, seed=21)):
        cv2.imwrite(str(images / f"{i}.png"), img[:, :, ::-1])
    out_remote, out_local = tmp_path / "remote", tmp_path / "local"
    args = ["--source", str(images), "--quiet"]
    res = CliRunner().invoke(
        run_command, ["--backend", "triton", "--url", server.url, "--model", "adtr", "--out", str(out_remote), *args]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(run_command, ["--model", str(exported), "--out", str(out_local), *args])
    assert res.exit_code == 0, res.output

    def scores(out):
        return [json.loads(line)["score"] for line in (out / "results.jsonl").read_text().splitlines()]

    remote, local = scores(out_remote), scores(out_local)
    assert len(remote) == 3 and np.ptp(remote) > 0
    np.testing.assert_allclose(remote, local, rtol=1e-5)


@pytest.mark.parametrize("backend", ["platform", "python"])
def test_adtr_export_format_triton_writes_a_verified_repository(tmp_path, backend):
    """`adtr-export --format triton`: checkpoint -> verified ONNX -> a repository whose config parses as Triton's schema;
    with --triton-backend python, a Python-backend model.py running the runtime (served for real in
    tests/test_triton_server.py)."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from adtr_deploy.cli.export import command as export_command
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", ADTR(get_preset("tiny")).eval())
    images = tmp_path / "images"
    images.mkdir()
    import cv2

    for i, img in enumerate(texture_images(4, 64, seed=5)):
        cv2.imwrite(str(images / f"{i}.png"), img[:, :, ::-1])
    out = tmp_path / "export"
    res = CliRunner().invoke(
        export_command,
        [
            "--model",
            str(ckpt),
            "--format",
            "triton",
            "--exporter",
            "torchscript",
            "--out",
            str(out),
            "--verify-images",
            str(images),
            "--triton-name",
            "line3",
            "--triton-max-batch",
            "16",
            "--triton-backend",
            backend,
        ],
    )
    assert res.exit_code == 0, res.output
    model_dir = out / "model_repository" / "line3"
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.name == "line3" and config.max_batch_size == 16
    if backend == "platform":
        assert config.platform == "onnxruntime_onnx" and not (model_dir / "1" / "model.py").exists()
        assert "tritonserver --model-repository" in res.output
    else:
        assert config.backend == "python" and config.platform == ""
        assert (model_dir / "1" / "model.py").is_file() and (model_dir / "requirements.txt").is_file()
        assert "adtr triton serve" in res.output
    assert (model_dir / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert json.loads((out / "verification.json").read_text())["passed"] is True
