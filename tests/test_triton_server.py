"""Triton for real: a real Triton Inference Server (2.51, the nvidia-pytriton wheel's tritonserver) serving the
Python-backend repository adtr-export writes, started by adtr-deploy's own launcher (`adtr triton serve`).

One server for the module, in explicit model-control mode, on free ports of 127.0.0.1. It serves the tiny ADTR as
`adtr`, plus two models written here that answer badly as a broken deployment would: `bad_shape` (a map of the wrong
size) and `numpy2` (a correct model in an environment with numpy 2, where Triton 2.51's stub answers empty tensors,
reproduced for real). The Python-backend environment (numpy<2, onnxruntime, adtr_deploy) is made with
`adtr triton env` in a temporary folder (or taken from $ADTR_TRITON_PYTHON_ENV). Skips, with the reason, only where
the wheel is not installed or that environment cannot be made (no package index).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adtr_deploy.export.triton import parse_config, write_triton_repository
from adtr_deploy.runtime.backends import BackendError, OnnxRuntimeBackend
from adtr_deploy.runtime.triton_env import TritonEnvError, make_env, require_env, wheel_layout
from adtr_deploy.runtime.triton_server import TritonServer, TritonServerError, free_port, port_free
from adtr_deploy.spec import ModelSpec
from tests.conftest import export_tiny_onnx, texture_images

TIMEOUT_S = 30.0
http = pytest.importorskip("tritonclient.http", exc_type=ImportError)
if wheel_layout() is None:
    pytest.skip(
        "the nvidia-pytriton wheel (Triton's server) is not installed: pip install 'adtr-deploy[triton-server]'",
        allow_module_level=True,
    )

# A model that answers wrongly: written by the test, served through the same config as the real one.
BAD_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            n = len(pb_utils.get_input_tensor_by_name(r, "image").as_numpy())
            amap = np.zeros((n, 1, SIDE, SIDE), np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("anomaly_map", amap),
                                                   pb_utils.Tensor("score", np.ones((n, 1), np.float32))]))
        return out
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ADTR exported to ONNX (dynamic batch) with its model.json, as adtr-export lays it out."""
    return export_tiny_onnx(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def python_env(tmp_path_factory):
    given = os.environ.get("ADTR_TRITON_PYTHON_ENV")
    try:
        if given:
            return require_env(given).prefix
        return make_env(tmp_path_factory.mktemp("stub-env") / "env", log=lambda m: None).prefix
    except TritonEnvError as exc:
        pytest.skip(f"no Python environment for Triton's Python backend could be made here: {exc}")


def _bad_model(repo: Path, real: Path, name: str, side: int, env: str | None = None) -> None:
    """A model folder `name` beside the real one: its config with the map's dims made variable, and BAD_MODEL."""
    text = (real / "config.pbtxt").read_text().replace('name: "adtr"', f'name: "{name}"')
    if side != 64:
        text = text.replace("dims: [ 1, 64, 64 ]", "dims: [ 1, -1, -1 ]")
    if env:
        text += f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{env}" }} }}\n'
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(text)
    (repo / name / "1" / "model.py").write_text(BAD_MODEL.replace("SIDE", str(side)))


@pytest.fixture(scope="module")
def repo(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    # a long queue delay so that concurrent single-image requests are seen to be batched
    model_dir = write_triton_repository(
        exported, root, backend="python", max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_us=100_000
    )
    _bad_model(root, model_dir, "bad_shape", side=32)
    if int(np.__version__.split(".")[0]) >= 2:  # this interpreter's numpy 2: the stub's empty answers, for real
        _bad_model(root, model_dir, "numpy2", side=64, env=sys.prefix)
        # our own model.py in that environment (the config's EXECUTION_ENV_PATH): it must refuse to load, naming numpy
        write_triton_repository(exported, root, backend="python", model_name="checked_numpy2", python_env=sys.prefix)
    return root


@pytest.fixture(scope="module")
def server(repo, python_env):
    ports = {f"{k}_port": free_port() for k in ("http", "grpc", "metrics")}
    with TritonServer(
        repo, python_env=python_env, model_control="explicit", load_models=("adtr", "bad_shape"), **ports
    ) as triton:
        yield triton


def _backend(server, protocol="http", **kw):
    from adtr_deploy.runtime.triton import TritonBackend

    url = server.http_url if protocol == "http" else server.grpc_url
    return TritonBackend(kw.pop("model", "adtr"), url=url, protocol=protocol, timeout_s=TIMEOUT_S, **kw)


# --- the repository ------------------------------------------------------------------------------------------------


def test_python_backend_repository_layout(repo, exported):
    model_dir = repo / "adtr"
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.backend == "python" and config.platform == "" and config.max_batch_size == 4
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported.read_bytes()
    assert (model_dir / "1" / "model.json").is_file() and (model_dir / "1" / "model.py").is_file()
    assert "numpy>=1.24,<2" in (model_dir / "requirements.txt").read_text().splitlines()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "gpu"}, "runs ONNX Runtime on the CPU"), ({"python_env": "relative/env"}, "absolute path")],
)
def test_python_backend_bad_options_are_one_sentence(exported, tmp_path, kwargs, match):
    from adtr_deploy.errors import UserError

    with pytest.raises(UserError, match=match):
        write_triton_repository(exported, tmp_path, backend="python", **kwargs)


# --- serving, for real ---------------------------------------------------------------------------------------------


def test_server_is_triton_251_and_ready(server):
    assert server.version == "2.51.0"
    client = http.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("adtr") and not client.is_model_ready("numpy2")  # explicit: only what we loaded
        meta = client.get_server_metadata()
        assert meta["name"] == "triton" and "model_repository" in meta["extensions"]
    finally:
        client.close()


@pytest.mark.parametrize(
    "protocol, binary", [("http", True), ("http", False), ("grpc", True)], ids=["http-binary", "http-json", "grpc"]
)
def test_served_scores_equal_local_onnxruntime(server, exported, protocol, binary):
    backend = _backend(server, protocol, binary=binary)
    try:
        assert backend.spec == ModelSpec.load(exported.with_name("model.json"))  # read from the served config
        assert backend.max_batch_size == 4 and backend.describe()["platform"] == "python"
        x = texture_images(6, 64, seed=11)  # 6 > max_batch_size: two requests
        maps, scores = backend.run(x)
    finally:
        backend.close()
    ref_maps, ref_scores = OnnxRuntimeBackend(exported).run(x)
    assert maps.shape == (6, 1, 64, 64) and scores.shape == (6,)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0


def _stats(server, model: str) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]


def test_dynamic_batching_under_concurrent_clients(server, exported):
    before = _stats(server, "adtr")
    images = texture_images(8, 64, seed=31)
    results, errors = {}, []

    def client(i):
        try:
            backend = _backend(server)
            try:
                results[i] = [backend.run(images[i : i + 1])[1][0] for _ in range(3)]
            finally:
                backend.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    assert not errors, errors
    after = _stats(server, "adtr")
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == 24  # 8 clients x 3 single-image requests
    assert executions < inferences  # the dynamic batcher ran several requests as one batch
    sizes = {int(b["batch_size"]) for b in after["batch_stats"]}
    assert max(sizes) > 1
    _, ref = OnnxRuntimeBackend(exported).run(images)
    for i in range(8):  # each client got its own image's score back, not a neighbour's from the same batch
        np.testing.assert_allclose(results[i], [ref[i]] * 3, rtol=1e-5, atol=1e-6)


def test_triton_metrics_endpoint_counts_our_requests(server):
    backend = _backend(server)
    try:
        backend.run(texture_images(2, 64, seed=3))
    finally:
        backend.close()
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="adtr"'))
    assert float(line.split()[-1]) >= 1


def test_model_control_load_unload_and_a_second_version(server, repo):
    client = http.InferenceServerClient(server.http_url)
    line = repo / "line"
    try:
        shutil.copytree(repo / "adtr", line)
        cfg = line / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "adtr"', 'name: "line"'))
        assert not client.is_model_ready("line")
        client.load_model("line")
        assert client.is_model_ready("line", "1")
        backend = _backend(server, model="line", model_version="1")
        v1 = backend.run(texture_images(1, 64, seed=4))[1]
        backend.close()
        # a second version: Triton's default policy serves the latest one after a reload
        shutil.copytree(line / "1", line / "2")
        client.load_model("line")
        assert client.is_model_ready("line", "2") and not client.is_model_ready("line", "1")
        backend = _backend(server, model="line", model_version="2")
        np.testing.assert_allclose(backend.run(texture_images(1, 64, seed=4))[1], v1, rtol=1e-6)
        backend.close()
        client.unload_model("line")
        assert not client.is_model_ready("line")
        with pytest.raises(BackendError, match="model 'line' is not ready"):
            _backend(server, model="line")
    finally:
        client.close()


# --- bad answers and failures: one sentence each ----------------------------------------------------------------------


def test_wrongly_shaped_answer_is_one_sentence(server):
    backend = _backend(server, model="bad_shape")
    try:
        with pytest.raises(BackendError) as err:
            backend.run(texture_images(2, 64, seed=1))
    finally:
        backend.close()
    msg = str(err.value)
    assert server.http_url in msg and "'bad_shape'" in msg
    assert "'anomaly_map' of shape [2, 1, 32, 32] where [2, 1, 64, 64] was expected" in msg


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="reproducing the stub's numpy 2 bug needs numpy 2")
def test_empty_answer_from_a_numpy2_stub_is_one_sentence(server):
    client = http.InferenceServerClient(server.http_url)
    try:
        client.load_model("numpy2")
    finally:
        client.close()
    for protocol, binary in (("http", True), ("grpc", True), ("http", False)):
        backend = _backend(server, protocol, model="numpy2", binary=binary)
        try:
            with pytest.raises(BackendError) as err:
                backend.run(texture_images(1, 64, seed=1))
        finally:
            backend.close()
        msg = str(err.value)
        assert "'numpy2'" in msg and (server.http_url in msg or server.grpc_url in msg), msg
        assert "\n" not in msg and "Traceback" not in msg
        if binary:  # binary tensors of size 0: tritonclient cannot reshape them
            assert "unreadable 'anomaly_map' tensor" in msg and "numpy>=2" in msg, msg
        else:  # JSON: the server itself notices the size
            assert "output tensor shape does not match size of output for 'anomaly_map'" in msg, msg


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="an environment with numpy 2 is needed")
def test_our_model_refuses_to_load_in_a_numpy2_environment(server):
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("checked_numpy2")
        assert not client.is_model_ready("checked_numpy2")
    finally:
        client.close()
    msg = str(err.value)
    assert "numpy is 2." in msg and "needs numpy<2" in msg and "adtr triton env" in msg


def test_launcher_reports_load_failure_port_in_use_and_missing_binary(server, repo, python_env, tmp_path):
    ports = {f"{k}_port": free_port() for k in ("http", "grpc", "metrics")}
    with pytest.raises(TritonServerError, match=r"port \d+ \(http\) is already in use"):
        TritonServer(repo, python_env=python_env, **{**ports, "http_port": server.ports["http"]}).start()
    with pytest.raises(TritonServerError, match="is not an executable tritonserver"):
        TritonServer(repo, server=str(tmp_path / "tritonserver"), **ports).start()
    # a model that cannot load (here: its model.py is not Python) stops the server with the server's reason
    broken = tmp_path / "broken_repo"
    shutil.copytree(repo / "adtr", broken / "adtr")
    (broken / "adtr" / "1" / "model.py").write_text("this is not python\n")
    with pytest.raises(TritonServerError, match=r"model 'adtr' failed to load: .*NameError: name 'this'") as err:
        TritonServer(broken, python_env=python_env, **ports).start(timeout_s=TIMEOUT_S * 2)
    assert "\n" not in str(err.value) and "\\n" not in str(err.value) and "full log: " in str(err.value)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_adtr_triton_serve_runs_until_sigterm(repo, python_env, exported, tmp_path, sig):
    """The CLI as a user runs it: ready line, a real request through adtr-run's backend, SIGTERM (a service manager)
    or SIGINT (Ctrl-C), clean exit 0 with the server gone."""
    ports = [str(free_port()) for _ in range(3)]
    log = tmp_path / "triton.log"
    args = [str(Path(sys.executable).with_name("adtr")), "triton", "serve", str(repo), "--python-env", str(python_env)]
    args += ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--log-file", str(log)]
    args += ["--model-control", "explicit", "--load-model", "adtr"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert "Triton 2.51.0 ready" in ready and f"HTTP 127.0.0.1:{ports[0]}" in ready, proc.stderr.read()
        from adtr_deploy.runtime.triton import TritonBackend

        backend = TritonBackend("adtr", url=f"127.0.0.1:{ports[0]}", timeout_s=TIMEOUT_S)
        x = texture_images(2, 64, seed=9)
        np.testing.assert_allclose(backend.run(x)[1], OnnxRuntimeBackend(exported).run(x)[1], rtol=1e-5, atol=1e-6)
        backend.close()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Triton stopped (exit code 0)" in err
    assert port_free("127.0.0.1", int(ports[0]))  # nothing listens there any more
    assert "successfully unloaded" in log.read_text() or "Stopping" in log.read_text()


def test_adtr_triton_env_check_names_what_is_wrong():
    """This interpreter's environment, checked as the stub's: fit or not, the answer is one sentence."""
    from click.testing import CliRunner

    from adtr_deploy.cli.triton import command

    res = CliRunner().invoke(command, ["env", sys.prefix, "--check"])
    if int(np.__version__.split(".")[0]) >= 2:
        assert res.exit_code == 1 and "needs numpy<2" in res.output and "adtr triton env DIR" in res.output
    else:
        assert res.exit_code == 0 and "fit for Triton's Python backend" in res.output


def test_adtr_run_through_the_real_server_equals_a_local_run(server, exported, tmp_path):
    """`adtr-run --backend triton` end to end on PNG files: the same results.jsonl scores as running model.onnx here."""
    import cv2
    from click.testing import CliRunner

    from adtr_deploy.cli.run import command as run_command

    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(texture_images(5, 64, seed=21)):
        cv2.imwrite(str(images / f"{i}.png"), img[:, :, ::-1])
    args = ["--source", str(images), "--quiet"]
    remote = ["--backend", "triton", "--url", server.http_url, "--model", "adtr", "--out", str(tmp_path / "remote")]
    res = CliRunner().invoke(run_command, [*remote, *args])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(run_command, ["--model", str(exported), "--out", str(tmp_path / "local"), *args])
    assert res.exit_code == 0, res.output

    def scores(out):
        return [json.loads(line)["score"] for line in (out / "results.jsonl").read_text().splitlines()]

    served, local = scores(tmp_path / "remote"), scores(tmp_path / "local")
    assert len(served) == 5 and np.ptp(served) > 0
    np.testing.assert_allclose(served, local, rtol=1e-5)
