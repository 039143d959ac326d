"""The .pt2 format (torch.export + AOTInductor): export, verification, the runtime backend and its spec, on tiny.

AOTInductor compiles C++ (a minute or more on a small CPU), so one export is shared by the module.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.calibration import calibrate
from adtr_deploy.export import FORMATS, export_checkpoint
from adtr_deploy.model import ADTR, get_preset
from adtr_deploy.model.checkpoint import save_checkpoint
from adtr_deploy.preprocess import load_image
from adtr_deploy.runtime.backends import BackendError, open_model
from adtr_deploy.runtime.pt2 import Pt2Backend, read_embedded_spec
from tests.conftest import texture_images

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"),
    pytest.mark.timeout(1800),  # AOTInductor lowers and compiles C++: minutes on a small, busy CPU
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pt2")


@pytest.fixture(scope="module")
def model() -> ADTR:
    torch.manual_seed(1)
    return ADTR(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def checkpoint(work, model) -> Path:
    folder = work / "images"
    folder.mkdir()
    paths = []
    for i, img in enumerate(texture_images(10, 64, seed=7)):
        paths.append(folder / f"img_{i:02d}.png")
        assert cv2.imwrite(str(paths[-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    batch = np.stack([load_image(p, (64, 64)) for p in paths])
    with torch.no_grad():
        maps, scores = (t.numpy() for t in model(torch.from_numpy(batch)))
    cal = dataclasses.replace(calibrate(scores, maps), threshold=float(np.median(scores)))
    info = {"calibration_images": [str(p) for p in paths], "data": {"kind": "folder", "root": str(work)}}
    return save_checkpoint(work / "run" / "checkpoint.pt", model, calibration=cal, info=info)


@pytest.fixture(scope="module")
def pt2_export(work, checkpoint):
    return export_checkpoint(checkpoint, "pt2", work / "pt2", batch_max=8)


def test_pt2_export_is_verified_at_fp32_tolerance_and_carries_its_spec(pt2_export):
    v = pt2_export.verification
    assert pt2_export.path.suffix == ".pt2" and pt2_export.path.is_file()
    assert v["passed"] and v["batch_sizes"] == [1, 8] and v["tolerance"] == 5e-4
    assert v["map"]["max_rel"] <= 1e-4 and v["decision_agreement"] == 1.0
    spec = json.loads(pt2_export.spec_path.read_text())
    embedded = json.loads(read_embedded_spec(pt2_export.path))
    assert spec["format"] == embedded["format"] == "pt2" and spec["calibration"] == embedded["calibration"]
    assert embedded["extra"]["pt2"]["fusion"]["fused"] is True and embedded["extra"]["pt2"]["device"] == "cpu"


def test_pt2_runs_through_the_runtime_like_the_reference_at_any_batch(pt2_export, model, work):
    images = np.stack(texture_images(3, 64, seed=11))
    backend = open_model(pt2_export.path, "cpu")
    assert isinstance(backend, Pt2Backend)
    amap, score = backend.run(images)
    with torch.no_grad():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(images)))
    assert amap.shape == (3, 1, 64, 64) and amap.dtype == np.float32 and score.shape == (3,)
    assert np.abs(amap - ref_map).max() <= 1e-4 * (ref_map.max() - ref_map.min())
    np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-5)
    # the spec inside the archive alone is enough: without model.json beside it the package still opens
    alone = work / "alone"
    alone.mkdir()
    shutil.copy(pt2_export.path, alone / "model.pt2")
    assert open_model(alone / "model.pt2").spec.calibration == backend.spec.calibration


def test_a_cpu_package_refuses_cuda_in_one_sentence(pt2_export):
    with pytest.raises(BackendError, match="compiled for cpu, not cuda"):
        open_model(pt2_export.path, "cuda")


def test_pt2_is_a_format_row_left_out_of_all():
    row = FORMATS["pt2"]
    assert row["suffix"] == ".pt2" and row["precisions"] == ("fp32",) and row["in_all"] is False


def test_pt2_cli_refuses_precisions_it_lacks(checkpoint, work):
    from adtr_deploy.cli.export import command

    result = CliRunner().invoke(command, ["--model", str(checkpoint), "--format", "pt2", "--precision", "fp16",
                                          "--out", str(work / "bad")])  # fmt: skip
    assert result.exit_code != 0 and "supports fp32 only" in result.output


def test_adtr_bench_times_the_pt2_package_against_the_reference(pt2_export, checkpoint, work):
    from adtr_deploy.cli.bench import command

    out = work / "bench"
    args = ["--model", str(pt2_export.path), "--reference", str(checkpoint), "--backends", "pt2-cpu",
            "--batch-sizes", "1,2", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0", "--threads", "1",
            "--no-memory", "--no-pipeline", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = [r for r in report["results"] if r["backend"] == "pt2-cpu"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["count"] >= 2 and r["speedup_vs_reference"] > 0 for r in rows)
