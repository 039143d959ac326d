"""TensorRT: the pure-Python parts everywhere (versions, recipes, profiles, compatibility); engine builds on a GPU only.

The engine tests skip with the reason where TensorRT or an NVIDIA GPU is missing; everything above them runs on any
machine, without TensorRT, and needs no fake TensorRT module.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.export.tensorrt import FP32_LAYER_TYPES, TRT_RECIPES, build_recipe, profile_shapes
from adtr_deploy.runtime.engine_check import (
    EngineCompatibilityError,
    TensorRTUnavailable,
    check_engine_compatible,
    compatibility_problems,
    device_index,
    parse_version,
)
from adtr_deploy.spec import ModelSpec

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_version_parsing_handles_release_and_prerelease_strings():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("11.0.0b1") == (11, 0, 0)
    assert parse_version(" 10.13.2 ") == (10, 13, 2)
    with pytest.raises(ValueError):
        parse_version("unknown")


def test_tensorrt_10_takes_fp16_from_a_builder_flag_and_11_from_an_fp16_onnx():
    weak = build_recipe("10.9.0.34", "fp16")
    assert "FP16" in weak.set_flags and not weak.strongly_typed and weak.onnx_precision == "fp32"
    assert weak.pin_fp32_layers and "PREFER_PRECISION_CONSTRAINTS" in weak.set_flags
    strong = build_recipe("11.1.0", "fp16")
    assert strong.strongly_typed and strong.onnx_precision == "fp16"
    assert not any(flag in ("FP16", "INT8") for flag in strong.set_flags)  # removed in TensorRT 11
    for version in ("10.0.1", "11.0.0"):
        fp32 = build_recipe(version, "fp32")
        assert fp32.onnx_precision == "fp32" and "TF32" in fp32.clear_flags and not fp32.set_flags


def test_unsupported_tensorrt_versions_and_precisions_are_refused_in_one_sentence():
    with pytest.raises(TensorRTUnavailable, match="TensorRT 8 is too old"):
        build_recipe("8.6.1", "fp32")
    with pytest.raises(ValueError, match="fp16, fp32, int8, not 'int8-dynamic'"):
        build_recipe("10.3.0", "int8-dynamic")
    assert {gen for gen, _ in TRT_RECIPES} == {"weak", "strong"}
    assert {"NORMALIZATION", "SOFTMAX", "REDUCE"} <= set(FP32_LAYER_TYPES)


def test_optimization_profile_spans_batch_1_to_max_with_a_clamped_optimum():
    assert profile_shapes((224, 224), 64) == {
        "min": (1, 224, 224, 3),
        "opt": (8, 224, 224, 3),
        "max": (64, 224, 224, 3),
    }
    assert profile_shapes((64, 96), 4)["opt"] == (4, 64, 96, 3)
    assert profile_shapes((64, 64), 16, batch_opt=2)["opt"][0] == 2
    with pytest.raises(ValueError, match="at least 1"):
        profile_shapes((64, 64), 0)
    with pytest.raises(ValueError, match="between 1 and"):
        profile_shapes((64, 64), 4, batch_opt=8)


def test_device_strings_map_to_cuda_indices():
    assert device_index("cuda:1") == 1 and device_index("cuda") == 0 and device_index(2) == 2
    with pytest.raises(ValueError, match="not a CUDA device"):
        device_index("cpu")


def test_engine_records_must_match_tensorrt_version_and_compute_capability():
    built = {"tensorrt_version": "10.3.0", "compute_capability": "8.6", "gpu": "NVIDIA A10"}
    assert compatibility_problems(built, {**built, "gpu": "NVIDIA RTX A6000"}) == []  # same architecture
    problems = compatibility_problems(built, {"tensorrt_version": "10.4.0", "compute_capability": "8.9"})
    assert len(problems) == 2 and "10.3.0" in problems[0] and "8.9" in problems[1]
    assert compatibility_problems({}, built)[0].startswith("the engine's model.json does not record")


def test_an_engine_spec_without_a_build_record_is_refused_before_touching_tensorrt():
    with pytest.raises(EngineCompatibilityError, match="no TensorRT build record"):
        check_engine_compatible(ModelSpec(format="tensorrt"))


def test_the_runtime_checks_engines_without_torch_or_the_exporter():
    import subprocess
    import sys

    code = (
        "import sys, adtr_deploy.runtime.engine_check, adtr_deploy.runtime.tensorrt; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tensorrt') "
        "or m.startswith(('adtr_deploy.export', 'adtr_deploy.model'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; this checks the message where it is missing")
def test_cli_tensorrt_without_tensorrt_says_what_to_install(tmp_path):
    from adtr_deploy.cli.export import command

    res = CliRunner().invoke(command, ["--model", str(tmp_path), "--format", "tensorrt", "--out", str(tmp_path / "o")])
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1
    assert "TensorRT is not installed" in lines[0] and "pip install 'adtr-deploy[tensorrt]'" in lines[0]
    assert not (tmp_path / "o").exists()


# --- engine builds: TensorRT and an NVIDIA GPU -------------------------------------------------------------------


def _gpu_reason() -> str | None:
    if not HAVE_TENSORRT:
        return "TensorRT is not installed (pip install 'adtr-deploy[tensorrt]' on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


needs_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from adtr_deploy.calibration import calibrate
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.model.checkpoint import save_checkpoint
    from tests.conftest import texture_images

    torch.manual_seed(0)
    model = ADTR(get_preset("tiny")).eval()
    with torch.no_grad():
        maps, scores = model(torch.from_numpy(texture_images(8, 64, seed=3)))
    path = tmp_path_factory.mktemp("trt") / "run" / "checkpoint.pt"
    return save_checkpoint(path, model, calibration=calibrate(scores.numpy(), maps.numpy()))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_runs_batch_1_and_8_and_matches_the_reference(tiny_checkpoint, tmp_path, precision):
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.export.tensorrt import environment
    from adtr_deploy.runtime.backends import open_model
    from tests.conftest import texture_images

    out = tmp_path / precision
    result = export_checkpoint(tiny_checkpoint, "tensorrt", out, precision=precision, batch_max=8)
    assert result.path.name == "model.engine" and result.verification["passed"], result.verification
    assert result.verification["batch_sizes"] == [1, 8]
    record = result.spec.extra["tensorrt"]
    here = environment(0)
    assert record["tensorrt_version"] == here["tensorrt_version"]
    assert record["compute_capability"] == here["compute_capability"] and record["gpu"] and record["cuda_version"]
    assert record["profile"]["max"][0] == 8 and (out / "timing.cache").stat().st_size > 0
    check_engine_compatible(result.spec)  # the machine that built it can run it

    stale = result.spec.replace(extra={**result.spec.extra, "tensorrt": {**record, "tensorrt_version": "9.0.0"}})
    with pytest.raises(EngineCompatibilityError, match="9.0.0"):
        check_engine_compatible(stale)

    backend = open_model(result.path, "cuda")
    images = texture_images(8, 64, seed=9)
    amap, score = backend.run(images)
    assert amap.shape == (8, 1, 64, 64) and score.shape == (8,) and np.isfinite(amap).all()
    v = json.loads((out / "verification.json").read_text())
    assert v["map"]["max_rel"] <= v["tolerance"]
