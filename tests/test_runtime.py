"""The torch-free runtime: backends, spec checks, parity with the PyTorch reference, postprocessing, the Python API."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from adtr_deploy.preprocess import load_image, stack_batch
from adtr_deploy.runtime import BackendError, Inferencer, Postprocessor, open_model, overlay
from adtr_deploy.runtime.backends import OnnxRuntimeBackend
from adtr_deploy.spec import SpecError
from tests import runtime_fixtures as rf
from tests.conftest import texture_images

# The export's documented tolerance for fp32 artifacts (max abs difference of maps and scores).
TOL = 1e-4
SIZE = (rf.INPUT_SIZE, rf.INPUT_SIZE)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    return rf.write_images(tmp_path_factory.mktemp("imgs"), 6, seed=11)


def poisoned_torch_env(tmp_path: Path) -> dict:
    """An environment in which `import torch` fails loudly: proof that whatever runs in it never imports torch."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported by the torch-free runtime')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), str(Path.cwd()), env.get("PYTHONPATH", "")])
    return env


def test_runtime_import_and_adtr_run_help_never_import_torch(tmp_path):
    env = poisoned_torch_env(tmp_path)
    code = (
        "import sys, adtr_deploy.runtime, adtr_deploy.runtime.pipeline, adtr_deploy.runtime.sources, "
        "adtr_deploy.runtime.tensorrt, adtr_deploy.cli.run; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    script = Path(sys.executable).with_name("adtr-run")
    cmds = [[sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", "--help"]]
    if script.exists():
        cmds.append([str(script), "--help"])
    for cmd in cmds:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "--source" in res.stdout and "--save-overlays" in res.stdout


def test_runtime_matches_the_pytorch_reference_on_image_files(model_path, image_files):
    """The runtime loads and resizes the files itself; the reference runs on preprocess.load_image of the same files."""
    with Inferencer(model_path, batch_size=4) as inf:
        preds = inf.predict_batch(image_files)
        single = inf.predict(image_files[1])
    ref_map, ref_score = rf.reference_outputs(stack_batch(load_image(p, SIZE) for p in image_files))
    got_map = np.stack([p.anomaly_map for p in preds])
    assert got_map.shape == (len(image_files), *SIZE) and got_map.dtype == np.float32
    np.testing.assert_allclose(got_map, ref_map[:, 0], atol=TOL, rtol=TOL)
    np.testing.assert_allclose([p.score for p in preds], ref_score, atol=TOL, rtol=TOL)
    assert abs(single.score - ref_score[1]) < TOL
    # decisions follow the calibrated threshold from model.json, and both kinds occur on these images
    thr = rf.calibration().threshold
    assert [p.is_anomaly for p in preds] == [bool(s > thr) for s in ref_score]


def test_predict_accepts_rgb_and_bgr_arrays_like_files(model_path, image_files):
    path = image_files[0]
    bgr = cv2.imread(str(path))
    with Inferencer(model_path) as inf:
        from_file = inf.predict(path)
        from_bgr = inf.predict(bgr, bgr=True)
        from_rgb = inf.predict(np.ascontiguousarray(bgr[:, :, ::-1]))
    assert from_file.score == pytest.approx(from_bgr.score, abs=1e-6)
    assert from_file.score == pytest.approx(from_rgb.score, abs=1e-6)


def test_io_binding_gives_the_same_outputs_as_plain_runs(model_path):
    x = texture_images(3, rf.INPUT_SIZE, seed=21)
    plain = open_model(model_path)
    bound = open_model(model_path, io_binding=True)
    assert bound.describe()["io_binding"] is True
    for a, b in zip(plain.run(x), bound.run(x), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_inference_streams_split_a_batch_over_concurrent_sessions_with_the_same_outputs(model_path):
    batch = stack_batch(texture_images(5, rf.INPUT_SIZE, seed=4))
    ref_map, ref_score = rf.reference_outputs(batch)
    span = float(ref_map.max() - ref_map.min())
    with OnnxRuntimeBackend(model_path, threads=4, streams=2) as two_threads_each:
        assert len({id(s) for s in two_threads_each._streams.sessions}) == 2  # a thread pool (and weights) apiece
        np.testing.assert_allclose(two_threads_each.run(batch)[1], ref_score, atol=TOL * float(np.ptp(ref_map)))
    with OnnxRuntimeBackend(model_path, threads=2, streams=2) as streamed:
        info = streamed.describe()
        assert info["streams"] == 2 and info["intra_op_threads"] == 1  # the 2 threads shared by the 2 streams
        # one thread per stream: both streams run the one session (one copy of the weights), concurrently below
        assert [s is streamed.session for s in streamed._streams.sessions] == [True, True]
        for n in (1, 2, 5):  # 1: the first session alone; 5: parts of 3 and 2, outputs back in batch order
            amap, score = streamed.run(batch[:n])
            assert amap.shape == (n, 1, *SIZE) and score.shape == (n,)
            assert np.abs(amap - ref_map[:n]).max() <= TOL * span
            assert np.abs(score - ref_score[:n]).max() <= TOL * span
    with pytest.raises(BackendError, match="--streams"):
        OnnxRuntimeBackend(model_path, device="cuda", streams=2)
    with pytest.raises(BackendError, match="--streams"):
        OnnxRuntimeBackend(model_path, streams=0)


def test_a_spec_that_does_not_match_the_graph_is_refused(tmp_path):
    wrong_size = rf.copy_model(tmp_path / "size", rf.spec().replace(input_size=(96, 96)))
    with pytest.raises(BackendError, match="belongs to another model"):
        open_model(wrong_size)
    wrong_outputs = rf.copy_model(tmp_path / "out", rf.spec().replace(output_names=("map", "anomaly_score")))
    with pytest.raises(BackendError, match="outputs"):
        open_model(wrong_outputs)
    wrong_input = rf.copy_model(tmp_path / "in", rf.spec().replace(input_name="images"))
    with pytest.raises(BackendError, match="input 'image'"):
        open_model(wrong_input)
    # without model.json the spec embedded in the ONNX metadata is used; with neither, one sentence says what to do
    import onnx

    embedded = rf.copy_model(tmp_path / "embedded")
    (embedded.parent / "model.json").unlink()
    got = open_model(embedded).spec
    assert (got.calibration, got.input_size, got.output_names) == (rf.calibration(), SIZE, ("anomaly_map", "score"))
    graph = onnx.load(str(embedded))
    del graph.metadata_props[:]
    onnx.save(graph, str(embedded))
    with pytest.raises(SpecError, match="adtr-export"):
        open_model(embedded)


def test_a_model_file_that_is_not_a_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    rf.spec().save(tmp_path / "model.json")
    with pytest.raises(BackendError, match="not a loadable ONNX model"):
        open_model(bad)
    with pytest.raises(BackendError, match="does not exist"):
        open_model(tmp_path / "missing.onnx")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BackendError, match="unknown model type"):
        open_model(tmp_path / "weights.bin")


def test_every_kind_of_broken_onnx_file_is_not_a_loadable_model_and_other_failures_speak(model_path, tmp_path):
    """Real broken files, each a different ONNX Runtime exception (InvalidProtobuf, InvalidArgument, InvalidGraph,
    Fail), become one BackendError; failures that are not the file's (a session setting, a thread option) are not
    turned into "not a loadable ONNX model"."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from adtr_deploy.runtime.backends import is_bad_onnx_file, onnx_file_errors

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 4])

    def graph(op: str, inputs: list[str], opset: int = 17) -> onnx.ModelProto:
        g = helper.make_graph([helper.make_node(op, inputs, ["score"])], "g", [x], [y])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)

    whole = model_path.read_bytes()
    broken = {
        "text": b"not an onnx file\n",
        "empty": b"",
        "truncated": whole[: len(whole) // 2],
        "dangling": graph("Relu", ["nowhere"]).SerializeToString(),
        "unknown-op": graph("NoSuchOp", ["image"]).SerializeToString(),
        "future-opset": graph("Relu", ["image"], opset=999).SerializeToString(),
    }
    kinds = set()
    for name, data in broken.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(data)
        rf.spec().save(folder / "model.json")
        with pytest.raises(BackendError, match="is not a loadable ONNX model") as caught:
            open_model(folder / "model.onnx")
        assert str(folder / "model.onnx") in str(caught.value)
        with pytest.raises(onnx_file_errors(ort)) as raw:
            ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        kinds.add(type(raw.value).__name__)
    assert len(kinds) >= 3, kinds  # the catch is not one class under many names

    # a setting the file is innocent of: same exception classes, but not a load error of the file
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.load_model_format", "ORT")  # an .onnx file read as the ORT format
    with pytest.raises(onnx_file_errors(ort)) as setting:
        ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    assert not is_bad_onnx_file(setting.value)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op_thread_affinities", "not-a-cpu")
    with pytest.raises(Exception) as threads:
        ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    assert not isinstance(threads.value, onnx_file_errors(ort))


def test_gpu_request_on_a_machine_without_it_is_refused_or_reported(model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback cannot be provoked here")
    with pytest.raises(BackendError, match="runs on CPUExecutionProvider"):
        open_model(model_path, "cuda")
    with pytest.raises(BackendError, match="TensorrtExecutionProvider"):
        open_model(model_path, "tensorrt")
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        backend = open_model(model_path, "cuda", allow_fallback=True)
    assert backend.describe()["fallback"] and backend.providers == ["CPUExecutionProvider"]
    x = texture_images(2, rf.INPUT_SIZE)
    np.testing.assert_allclose(backend.run(x)[1], open_model(model_path).run(x)[1], atol=1e-6)
    with pytest.raises(BackendError, match="not understood"):
        open_model(model_path, "gpu0")


def test_tensorrt_provider_is_configured_with_an_engine_cache(tmp_path):
    providers = OnnxRuntimeBackend._providers("tensorrt", 1, tmp_path / "model.onnx", None, True)
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_engine_cache_enable"] is True and opts["trt_fp16_enable"] is True and opts["device_id"] == 1
    assert Path(opts["trt_engine_cache_path"]) == tmp_path / "trt_cache" and (tmp_path / "trt_cache").is_dir()
    assert [p[0] if isinstance(p, tuple) else p for p in providers[1:]] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_torchscript_backend_matches_the_reference_and_checks_its_spec(tmp_path):
    import torch

    from adtr_deploy.spec import SPEC_FILENAME

    model = rf.reference_model()
    traced = torch.jit.trace(model, torch.from_numpy(texture_images(2, rf.INPUT_SIZE)), check_trace=False)
    path = tmp_path / "model.torchscript"
    spec = rf.spec().replace(format="torchscript")
    torch.jit.save(traced, str(path), _extra_files={SPEC_FILENAME: spec.to_json()})  # embedded spec only
    x = texture_images(3, rf.INPUT_SIZE, seed=5)
    amap, score = open_model(path).run(x)
    ref_map, ref_score = rf.reference_outputs(x)
    np.testing.assert_allclose(amap, ref_map, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(score, ref_score, atol=TOL, rtol=TOL)
    spec.replace(input_size=(32, 48)).save(
        tmp_path / "model.json"
    )  # a model.json for another model wins, and is caught
    with pytest.raises(BackendError, match="belongs to another model"):
        open_model(path)


def test_tensorrt_engine_without_tensorrt_or_on_cpu_is_one_clear_sentence(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 64)
    rf.spec().replace(format="tensorrt").save(tmp_path / "model.json")
    with pytest.raises(BackendError, match="only on an NVIDIA GPU"):
        open_model(engine, "cpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="needs TensorRT"):
            open_model(engine, "cuda")


@pytest.mark.gpu
def test_tensorrt_engine_matches_the_reference_on_a_gpu(tmp_path):
    """Builds a real engine with the export and runs it through the runtime (needs tensorrt, cuda-python and a GPU)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'adtr-deploy[tensorrt]')")
    pytest.importorskip("cuda", reason="cuda-python is not installed")
    from adtr_deploy.export.tensorrt import TensorRTUnavailable, environment

    try:
        environment(0)
    except TensorRTUnavailable as exc:
        pytest.skip(f"no usable GPU: {exc}")
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", rf.reference_model(), calibration=rf.calibration())
    result = export_checkpoint(ckpt, "tensorrt", tmp_path / "export", batch_max=8)
    backend = open_model(result.path, "cuda")
    x = texture_images(5, rf.INPUT_SIZE, seed=9)
    amap, score = backend.run(x)
    ref_map, ref_score = rf.reference_outputs(x)
    np.testing.assert_allclose(amap, ref_map, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(score, ref_score, atol=1e-3, rtol=1e-3)
    backend.close()


def test_threshold_override_moves_the_decision_and_the_normalization():
    maps, scores = rf.reference_outputs(texture_images(6, rf.INPUT_SIZE, seed=31))
    cal = rf.calibration()
    default = Postprocessor(cal)
    assert [p.is_anomaly for p in default(maps, scores)] == [bool(s > cal.threshold) for s in scores]
    thr = float(np.sort(scores)[-2])  # only the highest score lies above
    preds = Postprocessor(cal, threshold=thr)(maps, scores)
    assert sum(p.is_anomaly for p in preds) == 1
    for p in preds:  # the threshold maps to 0.5 in normalized units, so the two views agree
        assert p.is_anomaly == (p.normalized_score > 0.5)
    with pytest.raises(ValueError, match="not above the mean score"):
        Postprocessor(cal, threshold=cal.score_mean - 1)


def test_overlay_is_drawn_at_the_image_size_with_the_decision_on_it():
    img = texture_images(1, 160, seed=2)[0][:120]  # 120 x 160, not the model's size
    maps, scores = rf.reference_outputs(texture_images(1, rf.INPUT_SIZE, seed=2))
    post = Postprocessor(rf.calibration())
    pred = post(maps, scores)[0]
    out = overlay(img, pred, post.heat(pred.anomaly_map))
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    plain = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    assert np.abs(out.astype(int) - plain).mean() > 5  # the heatmap is visible
    other = overlay(img, dataclasses.replace(pred, is_anomaly=not pred.is_anomaly), post.heat(pred.anomaly_map))
    assert not np.array_equal(out[:20], other[:20])  # the decision is written on the picture


def test_the_pipeline_runs_batches_on_streams_at_once_and_writes_them_in_source_order(model_path, tmp_path):
    """A backend that can run two calls at once (ONNX Runtime with 2 streams) gets two batches in flight; records come
    out in source order with the same scores as a plain run. The timing wrapper only records when each call ran."""
    import json
    import threading
    import time as _time

    from adtr_deploy.runtime import RunOptions, open_source, run_pipeline

    files = rf.write_images(tmp_path / "imgs", 8, seed=5)

    class Timed:  # the real streamed ONNX Runtime backend, each call held 0.15 s longer and its span recorded
        def __init__(self, inner):
            self.inner, self.spans, self.lock = inner, [], threading.Lock()
            self.spec, self.max_batch, self.concurrency = inner.spec, inner.max_batch, inner.concurrency

        def run(self, batch):
            start = _time.perf_counter()
            out = self.inner.run(batch)
            _time.sleep(0.15)
            with self.lock:
                self.spans.append((start, _time.perf_counter()))
            return out

        def describe(self):
            return self.inner.describe()

    results = {}
    for streams in (1, 2):
        backend = Timed(OnnxRuntimeBackend(model_path, threads=2, streams=streams))
        out = tmp_path / f"out{streams}"
        run_pipeline(backend, open_source(str(tmp_path / "imgs")), out, RunOptions(batch_size=1))
        results[streams] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        spans = sorted(backend.spans)
        overlaps = sum(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
        assert (overlaps > 0) == (streams == 2), (streams, spans)  # only the streamed run overlaps its calls
    assert [r["source"] for r in results[2]] == [r["source"] for r in results[1]] == [str(f) for f in sorted(files)]
    for a, b in zip(results[1], results[2]):
        assert b["score"] == pytest.approx(a["score"], rel=TOL, abs=TOL)
