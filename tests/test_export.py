"""Export: ONNX and TorchScript artifacts match the PyTorch reference on real images, carry their spec, fail loudly.

The tiny preset keeps this fast; one dynamo ONNX export and one TorchScript export are shared by the module. Real
images are scikit-image photographs written to PNG files with OpenCV and read back through the shared preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.calibration import calibrate
from adtr_deploy.export import FORMATS, PRECISIONS, export_checkpoint
from adtr_deploy.export.images import verification_images
from adtr_deploy.export.verify import batch_plan, compare
from adtr_deploy.model import ADTR, get_preset
from adtr_deploy.model.checkpoint import save_checkpoint
from adtr_deploy.preprocess import load_image
from adtr_deploy.runtime.backends import open_model
from adtr_deploy.spec import METADATA_KEY, ModelSpec
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.features import TrainingSet, fit_error_metric
from tests.conftest import texture_images

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _reference(model: ADTR, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        amap, score = model(torch.from_numpy(batch))
    return amap.numpy(), score.numpy()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def image_files(work) -> list[Path]:
    """Real photographs as PNG files: the first six are the 'calibration images' the checkpoint records."""
    folder = work / "images"
    folder.mkdir()
    paths = []
    for i, img in enumerate(texture_images(12, 64, seed=5)):
        path = folder / f"img_{i:02d}.png"
        assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model() -> ADTR:
    """The tiny preset with its Mahalanobis error fitted to its residuals on other photographs (as training does), so
    every export carries a real whitening and border standardization."""
    torch.manual_seed(0)
    m = ADTR(get_preset("tiny")).eval()
    with torch.no_grad():
        f = m.forward_features(torch.from_numpy(texture_images(8, 64, seed=1)))
    fit_error_metric(m, TrainingSet([], [], f), TrainConfig(progress=False), torch.device("cpu"))  # and the border
    return m


@pytest.fixture(scope="module")
def checkpoint(work, model, image_files) -> Path:
    """A tiny checkpoint calibrated on its own outputs; the threshold sits at the median score, so decisions split."""
    calib = image_files[:6]
    batch = np.stack([load_image(p, (64, 64)) for p in calib])
    maps, scores = _reference(model, batch)
    cal = calibrate(scores, maps)
    cal = dataclasses.replace(cal, threshold=float(np.median(scores)))
    info = {"calibration_images": [str(p) for p in calib], "data": {"kind": "folder", "root": str(work)}}
    return save_checkpoint(work / "run" / "checkpoint.pt", model, calibration=cal, info=info)


@pytest.fixture(scope="module")
def plain_checkpoint(work, model) -> Path:
    """The same weights without calibration or recorded images (verification needs --verify-images)."""
    return save_checkpoint(work / "plain" / "checkpoint.pt", model)


@pytest.fixture(scope="module")
def onnx_export(work, checkpoint):
    return export_checkpoint(checkpoint.parent, "onnx", work / "onnx", batch_max=16)  # the default: dynamo, fp32


@pytest.fixture(scope="module")
def ts_export(work, checkpoint):
    return export_checkpoint(checkpoint, "torchscript", work / "torchscript")


def test_onnx_export_is_checked_opset_17_plus_with_the_spec_inside_and_beside(onnx_export, checkpoint):
    path = onnx_export.path
    assert path.name == "model.onnx" and onnx_export.spec_path == path.with_name("model.json")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # one file
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]  # dynamic batch, static image
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]

    beside = ModelSpec.load(onnx_export.spec_path)
    embedded = ModelSpec.from_json({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    ckpt = torch.load(checkpoint, weights_only=True)
    for spec in (beside, embedded):
        assert spec.format == "onnx" and spec.precision == "fp32" and spec.preset == "tiny"
        assert (
            spec.input_size == (64, 64)
            and spec.input_layout == "NHWC"
            and spec.output_names == ("anomaly_map", "score")
        )
        assert spec.threshold == pytest.approx(ckpt["calibration"]["threshold"])
        assert spec.backbone == "efficientnet-test"
    assert beside.extra["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert {"torch", "onnx", "opset", "package"} <= set(beside.extra["versions"])
    assert beside.extra["onnx"]["exporter"] == "dynamo"


def test_the_default_onnx_export_is_the_fused_graph_and_reads_the_uint8_input_with_one_cast(onnx_export):
    model = onnx.load(str(onnx_export.path))
    users = [n.op_type for n in model.graph.node if "image" in n.input]
    assert users == ["Cast"]  # cast before permute: no graph surgery needed (TensorRT takes uint8 only so)
    fusion = ModelSpec.load(onnx_export.spec_path).extra["onnx"]["fusion"]
    assert fusion["fused"] is True and fusion["self_check_max_rel"] < 1e-4
    # tiny: 1 encoder + 1 decoder layer. Unfused: q, k, v, out per attention (3 attentions) + 2 FFN x 2 + in/out = 18
    # weighted MatMuls; fused: QKV + out (encoder), out (decoder 1: its self-attention and query are constants), one
    # K/V product, FFN x 2 per layer, in/out = 10.
    inits = {t.name for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert len(weighted) == 10
    assert onnx_export.verification["passed"] and onnx_export.verification["tolerance"] == 5e-4


def test_verification_ran_on_the_checkpoint_calibration_images_at_batch_1_and_8(onnx_export, ts_export):
    for result in (onnx_export, ts_export):
        v = json.loads((result.path.parent / "verification.json").read_text())
        assert v == json.loads(json.dumps(result.verification))
        assert v["passed"] and v["batch_sizes"] == [1, 8]
        assert "calibration images" in v["image_source"] and v["images"] == 6
        assert v["map"]["max_rel"] <= PRECISIONS["fp32"]["tolerance"]
        assert 0 < v["reference_anomalies"] < v["decisions"]  # the threshold really separates images
        assert v["decision_agreement"] == 1.0


@pytest.mark.parametrize("batch_size", [1, 4])
def test_reference_torchscript_and_onnxruntime_agree_on_maps_scores_and_decisions(
    model, onnx_export, ts_export, batch_size
):
    images = texture_images(batch_size, 64, seed=11 + batch_size)
    ref_map, ref_score = _reference(model, images)
    scale = ref_map.max() - ref_map.min()
    threshold = onnx_export.spec.threshold
    for result in (onnx_export, ts_export):
        backend = open_model(result.path, "cpu")
        amap, score = backend.run(images)
        assert amap.shape == (batch_size, 1, 64, 64) and score.shape == (batch_size,)
        assert amap.dtype == np.float32 and score.dtype == np.float32
        np.testing.assert_allclose(amap, ref_map, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-4 * scale)
        np.testing.assert_array_equal(score > threshold, ref_score > threshold)


def test_torchscript_loads_with_torch_alone_in_a_fresh_process(ts_export, model, tmp_path):
    images = texture_images(3, 64, seed=21)
    np.save(tmp_path / "x.npy", images)
    code = f"""
import sys, json, numpy as np, torch
extra = {{"model.json": ""}}
m = torch.jit.load({str(ts_export.path)!r}, _extra_files=extra)
amap, score = m(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
np.save({str(tmp_path / "score.npy")!r}, score.numpy())
print(json.dumps({{"spec": json.loads(extra["model.json"]), "ours": [k for k in sys.modules if k.startswith("adtr_deploy")]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ours"] == []
    assert report["spec"]["format"] == "torchscript" and report["spec"]["input_size"] == [64, 64]
    np.testing.assert_allclose(np.load(tmp_path / "score.npy"), _reference(model, images)[1], rtol=1e-5, atol=1e-5)


def test_fp16_onnx_takes_uint8_gives_float32_and_keeps_fragile_ops_in_fp32(work, checkpoint):
    """Also the TorchScript-based exporter at opset 17, simplified with onnxslim (one export for the three options)."""
    result = export_checkpoint(
        checkpoint, "onnx", work / "fp16", precision="fp16", dynamo=False, opset=17, simplify=True
    )
    assert result.spec.extra["onnx"]["exporter"] == "torchscript" and result.spec.extra["onnx"]["simplified"]
    model = onnx.load(str(result.path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert not any(n.op_type in ("Identity", "Constant") for n in model.graph.node)  # onnxslim folded them
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    assert types["image"] == onnx.TensorProto.UINT8
    assert types["anomaly_map"] == types["score"] == onnx.TensorProto.FLOAT
    fragile = [n for n in g.node if n.op_type in ("LayerNormalization", "Softmax", "ReduceSum", "Sqrt", "AveragePool")]
    assert {n.op_type for n in fragile} == {"LayerNormalization", "Softmax", "ReduceSum", "Sqrt", "AveragePool"}
    for node in fragile:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    matmuls = [n for n in g.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)  # really half precision
    # The Mahalanobis whitening (the 1x1 Conv on the residual) belongs to the map: FP32 inputs, weight and output.
    producer = {o: n for n in g.node for o in n.output}
    whitening = [n for n in g.node if n.op_type == "Conv" and producer[n.input[0]].op_type == "Sub"]
    assert len(whitening) == 1
    assert all(types[name] == onnx.TensorProto.FLOAT for name in [*whitening[0].input, *whitening[0].output])

    v = result.verification
    assert v["passed"] and v["tolerance"] == PRECISIONS["fp16"]["tolerance"] and v["batch_sizes"] == [1, 8]
    assert 0 < v["map"]["max_rel"] < 1e-2  # FP16 rounding is visible, and small
    assert result.spec.precision == "fp16" and result.spec.extra["onnx"]["fp16"]["fp32_nodes"] > 0


def test_failed_verification_publishes_nothing_and_the_cli_exits_non_zero(work, checkpoint, monkeypatch):
    from adtr_deploy.cli.export import command

    out = work / "failing"
    monkeypatch.setitem(PRECISIONS["fp32"], "tolerance", 1e-12)  # ONNX Runtime is not bit-exact with torch
    res = CliRunner().invoke(command, ["--model", str(checkpoint), "--format", "onnx", "--exporter", "torchscript",
                                       "--out", str(out)])  # fmt: skip
    assert res.exit_code != 0 and "verification failed" in res.output.lower() and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == ["verification.json"]  # no model, no spec, no staging folder
    v = json.loads((out / "verification.json").read_text())
    assert v["passed"] is False and v["published"] is False


def test_an_interrupted_export_leaves_no_half_written_artifact(work, plain_checkpoint, monkeypatch):
    import adtr_deploy.export.torchscript as ts

    out = work / "interrupted"
    good = export_checkpoint(plain_checkpoint, "torchscript", out, verify=False)
    before = good.path.read_bytes()

    def crash(model, path, **kwargs):
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "export_torchscript", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(plain_checkpoint, "torchscript", out, verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.torchscript", "verification.json"]
    assert good.path.read_bytes() == before  # the previous, complete export is untouched


def test_cli_export_without_verification_images_says_so_in_one_sentence_and_writes_nothing(work, plain_checkpoint):
    """No --verify-images and no recorded images: one sentence naming what to pass (export never falls back to the demo
    data or a test split)."""
    from adtr_deploy.cli.export import command

    out = work / "cli-no-images"
    res = CliRunner().invoke(
        command, ["--model", str(plain_checkpoint.parent), "--format", "torchscript", "--out", str(out)]
    )
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "records none" in lines[0] and "--verify-images" in lines[0] and "--no-verify" in lines[0]
    assert not out.exists()


def test_cli_exports_torchscript_verified_on_given_images_without_calibration_images(
    work, plain_checkpoint, image_files
):
    from adtr_deploy.cli.export import command

    out = work / "cli-given"
    args = ["--model", str(plain_checkpoint.parent), "--format", "torchscript", "--out", str(out)]
    res = CliRunner().invoke(command, [*args, "--verify-images", str(image_files[0].parent)])
    assert res.exit_code == 0, res.output
    assert "12 images from" in res.output and "PASS" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.torchscript", "verification.json"]


def test_verify_images_takes_a_folder_or_a_glob_of_real_files(image_files):
    folder = image_files[0].parent
    images, source = verification_images((64, 64), verify_images=str(folder))
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 10
    images, source = verification_images((32, 32), verify_images=str(folder / "img_0*.png"))
    assert images.shape == (10, 32, 32, 3) and "10 images" in source  # img_00 .. img_09, resized
    with pytest.raises(ValueError, match="matches no readable image"):
        verification_images((64, 64), verify_images=str(folder / "*.jpg"))


def test_int8_verification_uses_other_train_good_images_never_the_test_split(tmp_path):
    """With every held-out image used to calibrate INT8, verification reads the checkpoint's other train/good images;
    with none left it refuses in one sentence. The test split beside them is never read."""
    root = tmp_path / "data" / "cat"
    images = texture_images(7, 48, seed=3)
    paths = {}
    for i, (split, img) in enumerate(zip(["train/good"] * 4 + ["test/good", "test/hole", "held"], images)):
        paths[i] = root / split / f"{i}.png"
        paths[i].parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(paths[i]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    info = {
        "calibration_images": [str(paths[6])],
        "data": {"kind": "mvtec", "root": str(root.parent), "category": "cat"},
    }
    ckpt = {"info": info}
    batch, source = verification_images((48, 48), checkpoint=ckpt, avoid=(str(paths[6]), str(paths[0])))
    assert "3 train/good images" in source and batch.shape == (3, 48, 48, 3)
    expected = np.stack([load_image(paths[i], (48, 48)) for i in (1, 2, 3)])
    np.testing.assert_array_equal(batch, expected)  # train/good 1-3 in order: no test image, no calibrated one
    with pytest.raises(ValueError, match="besides the INT8 calibration images.*--verify-images"):
        verification_images((48, 48), checkpoint=ckpt, avoid=tuple(str(paths[i]) for i in (0, 1, 2, 3, 6)))


def test_cli_rejects_foreign_newer_and_corrupt_checkpoints_in_one_sentence(work, checkpoint):
    from adtr_deploy.cli.export import command

    bad = work / "bad"
    bad.mkdir()
    torch.save({"weights": torch.zeros(2)}, bad / "foreign.pt")
    newer = torch.load(checkpoint, weights_only=True)
    newer["format_version"] = 99
    torch.save(newer, bad / "newer.pt")
    (bad / "corrupt.pt").write_bytes(checkpoint.read_bytes()[:5000])
    expected = {"foreign.pt": "not an adtr-deploy checkpoint", "newer.pt": "newer", "corrupt.pt": "not a readable"}
    for name, phrase in expected.items():
        res = CliRunner().invoke(command, ["--model", str(bad / name), "--format", "onnx", "--out", str(bad / "o")])
        lines = res.output.strip().splitlines()
        assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), res.output
        assert phrase in lines[0]
    assert not (bad / "o").exists()


def test_unsupported_format_precision_pairs_are_refused_before_any_work(work, checkpoint):
    with pytest.raises(ValueError, match="supports fp32 only"):
        export_checkpoint(checkpoint, "torchscript", work / "x", precision="fp16")
    with pytest.raises(ValueError, match="opset 18"):
        export_checkpoint(checkpoint, "onnx", work / "x", opset=17)  # dynamo cannot go below 18
    with pytest.raises(ValueError, match="too old"):
        export_checkpoint(checkpoint, "onnx", work / "x", opset=13, dynamo=False)
    assert not (work / "x").exists()


def test_formats_table_says_what_each_format_supports():
    assert set(FORMATS) == {"onnx", "torchscript", "pt2", "tensorrt", "openvino"}
    for row in FORMATS.values():
        assert {"filename", "suffix", "exporter", "dynamic_batch", "precisions", "needs_gpu"} <= set(row)
        assert set(row["precisions"]) <= set(PRECISIONS)
    assert FORMATS["tensorrt"]["needs_gpu"] and not FORMATS["onnx"]["needs_gpu"]


def test_compare_counts_only_decision_flips_away_from_the_threshold():
    ref_map = np.linspace(0, 1, 2 * 16).reshape(2, 1, 4, 4).astype(np.float32)
    ref_score = np.array([0.5, 0.9], np.float32)
    near = compare(ref_map, ref_score, ref_map, ref_score + [0.00002, 0], threshold=0.50001, tolerance=1e-4)
    assert near["passed"] and near["decision_flips"] == 1 and near["unexplained_flips"] == 0
    far = compare(ref_map, ref_score, ref_map, np.array([0.5, 0.7], np.float32), threshold=0.8, tolerance=0.05)
    assert not far["passed"] and far["unexplained_flips"] == 1
    worse = compare(ref_map, ref_score, ref_map + 0.02, ref_score, threshold=0.8, tolerance=1e-2)
    assert not worse["passed"] and "anomaly maps" in worse["reason"]
    nan = compare(ref_map, ref_score, ref_map * np.nan, ref_score, threshold=0.8, tolerance=1e-2)
    assert not nan["passed"]


def test_batch_plan_runs_batch_1_and_full_batches_even_with_few_images():
    assert [len(b) for b in batch_plan(3, 8)] == [1, 8]
    assert [len(b) for b in batch_plan(16, 8)] == [1, 8, 8]
    assert [len(b) for b in batch_plan(5, 4)] == [1, 4, 4]


@pytest.mark.gpu
def test_onnx_on_the_cuda_execution_provider_matches_the_reference(model, onnx_export):
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and an NVIDIA GPU (pip install 'adtr-deploy[gpu]')")
    backend = open_model(onnx_export.path, "cuda")
    for n in (1, 8):
        images = texture_images(n, 64, seed=40 + n)
        ref_map, ref_score = _reference(model, images)
        amap, score = backend.run(images)
        scale = ref_map.max() - ref_map.min()
        np.testing.assert_allclose(
            amap, ref_map, rtol=0, atol=1e-3 * scale
        )  # cuDNN may use TF32-free but other kernels
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-3 * scale)


@pytest.mark.e2e
def test_tiny_lite0_with_real_weights_exports_to_all_cpu_formats_within_tolerance(tmp_path, image_files):
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny-lite0")).eval()
    maps, scores = _reference(model, texture_images(8, 64, seed=3))
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, calibration=calibrate(scores, maps))
    results = export_checkpoint(
        ckpt.parent,
        "all",
        tmp_path / "export",
        dynamo=False,
        verify_images=str(image_files[0].parent / "img_0[0-7].png"),
    )  # dynamo export is tested above on the tiny preset
    assert {r.format for r in results} >= {"onnx", "torchscript"}
    for r in results:
        assert r.verification["passed"], r.verification["reason"]
        assert r.verification["images"] == 8 and r.verification["batch_sizes"] == [1, 8]
        assert r.spec.preset == "tiny-lite0" and r.path.parent.name == r.format
    summary = json.loads((tmp_path / "export" / "verification.json").read_text())
    assert all(summary[r.format]["passed"] for r in results)
