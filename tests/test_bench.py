"""adtr-bench: the report's structure and that every figure was measured (never a timing threshold).

One benchmark run of the tiny preset (ONNX Runtime, TorchScript and the PyTorch reference, batch 1 and 2, pipeline and
profiles on, memory probes in child processes) is shared by the structure tests; tiny iteration counts keep it fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import texture_images

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

BATCH_SIZES = (1, 2)
MIN_ITERS = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, and an export folder (model.onnx, model.torchscript, model.json) that does NOT name it."""
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.checkpoint import save_checkpoint
    from adtr_deploy.model.config import get_preset
    from adtr_deploy.spec import ModelSpec

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = ADTR(cfg).eval()
    ckpt = save_checkpoint(root / "run" / "checkpoint.pt", model)
    export = root / "export"
    export.mkdir()
    spec = ModelSpec(input_size=cfg.input_size, preset="tiny", backbone=cfg.backbone, format="onnx")
    spec.save(export / "model.json")
    x = torch.from_numpy(texture_images(2, 64, seed=1))
    torch.onnx.export(  # the TorchScript-based exporter: a few seconds, where dynamo takes ten
        model,
        (x,),
        str(export / "model.onnx"),
        input_names=["image"],
        output_names=["anomaly_map", "score"],
        dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.jit.save(traced, str(export / "model.torchscript"), _extra_files={"model.json": spec.to_json()})
    images = root / "images"
    images.mkdir()
    for i, img in enumerate(texture_images(6, 96, seed=2)):  # real photographs, written as real PNG files
        assert cv2.imwrite(str(images / f"{i:02d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return {"checkpoint": ckpt, "onnx": export / "model.onnx", "images": images, "root": root}


@pytest.fixture(scope="module")
def report(exported) -> tuple[dict, Path]:
    from adtr_deploy.cli.bench import command

    out = exported["root"] / "report"
    args = [
        "--model", str(exported["onnx"]),
        "--reference", str(exported["checkpoint"]),
        "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
        "--out", str(out),
        "--warmup", "1",
        "--min-iters", str(MIN_ITERS),
        "--min-seconds", "0",
        "--images", str(exported["images"]),
        "--threads", "1",  # one thread: no OpenMP barrier stalls when other processes load the cores
        "--profile",
        "--no-memory",  # memory probes (a child process per backend) are tested on the ONNX Runtime-only run below
    ]  # fmt: skip
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), out


def test_report_times_every_backend_and_the_reference_at_every_batch_size(report):
    rep, _ = report
    runners = {r["runner"] for r in rep["results"]}
    assert runners == {"pytorch-eager", "onnxruntime-cpu", "torchscript-cpu"}
    assert sorted((r["runner"], r["batch_size"]) for r in rep["results"]) == sorted(
        (n, b) for n in runners for b in BATCH_SIZES
    )
    assert "onnxruntime-cuda" in rep["backends"]["skipped"] or rep["machine"]["gpus"]
    for key in ("cpu", "logical_cpus", "libraries", "load_average_start"):
        assert key in rep["machine"]
    assert rep["machine"]["libraries"]["onnxruntime"]


def test_latencies_are_measured_samples_and_statistics_follow_from_them(report):
    rep, _ = report
    for r in rep["results"]:
        s = np.asarray(r["samples_ms"])
        assert r["count"] == s.size >= MIN_ITERS
        assert (s > 0).all() and np.unique(s).size > 1, "samples must be real, differing measurements"
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["p50_ms"] == pytest.approx(np.percentile(s, 50), rel=1e-3)
        assert r["throughput_ips"] == pytest.approx(r["batch_size"] * s.size / (s.sum() / 1e3), rel=1e-3)
        assert r["cpu_p50_ms"] > 0 and r["cpu_per_wall"] > 0  # process CPU time of the same calls


def test_speedup_is_the_throughput_ratio_against_the_reference_of_the_same_run(report):
    rep, _ = report
    for bs in BATCH_SIZES:
        rows = {r["runner"]: r for r in rep["results"] if r["batch_size"] == bs}
        ref = rows["pytorch-eager"]
        assert ref["speedup_vs_reference"] is None
        for name in ("onnxruntime-cpu", "torchscript-cpu"):
            assert rows[name]["reference"] == "pytorch-eager"
            assert rows[name]["speedup_vs_reference"] == pytest.approx(
                rows[name]["throughput_ips"] / ref["throughput_ips"]
            )
        # every row ran the same model: outputs on the timed batch agree with the reference
        for name, a in rep["agreement"][str(bs)].items():
            assert a["max_abs_score_diff"] < 1e-4 and a["max_abs_map_diff"] < 1e-4, name


def test_flops_are_counted_twice_and_agree_and_peak_is_measured(report):
    rep, _ = report
    fl = rep["flops"]
    assert fl["torch"]["flops_per_image"] > 0 and fl["onnx"]["flops_per_image"] > 0
    assert fl["relative_difference"] < 0.01 and fl["agree"]
    assert set(fl["torch"]["by_module"]) >= {"backbone", "transformer"}
    pk = rep["matmul_peak"]
    assert pk["peak_gflops"] > 0 and pk["before"]["numpy_gflops"] > 0
    for r in rep["results"]:
        assert r["achieved_gflops"] == pytest.approx(fl["flops_per_image"] * r["throughput_ips"] / 1e9)
        assert 0 < r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / pk["peak_gflops"])
        assert r["fraction_of_peak_cpu_time"] > 0


def test_pipeline_breakdown_times_each_stage_on_real_files(report):
    rep, _ = report
    pipe = rep["pipeline"]
    assert pipe["backend"] == "onnxruntime-cpu" and pipe["source_image_shape"] == [96, 96, 3]
    assert [row["batch_size"] for row in pipe["rows"]] == list(BATCH_SIZES)
    for row in pipe["rows"]:
        stages = row["stages"]["ms_per_image"]
        assert set(stages) == {"decode", "preprocess", "inference", "postprocess"}
        assert all(v > 0 for v in stages.values())
        assert row["images_per_pass"] % row["batch_size"] == 0
        pipe_t, model_t = row["pipeline"]["throughput_ips"], row["model_only"]["throughput_ips"]
        assert pipe_t > 0 and model_t > 0
        assert row["overhead"] == pytest.approx(1 - pipe_t / model_t)
        assert -1 < row["overhead_paired"] < 1


def test_profiles_list_operator_types_of_both_engines(report):
    rep, _ = report
    for bs in BATCH_SIZES:
        entry = rep["profiles"][str(bs)]
        ort_ops = {o["op"] for o in entry["onnxruntime-cpu"]["by_op"]}
        eager_ops = {o["op"] for o in entry["pytorch-eager"]["by_op"]}
        assert any("Conv" in op for op in ort_ops)
        assert any("conv" in op for op in eager_ops)
        assert sum(o["share"] for o in entry["onnxruntime-cpu"]["by_op"]) <= 1.0 + 1e-9


def test_markdown_and_plots_are_written(report):
    rep, out = report
    md = (out / "report.md").read_text()
    for heading in ("## Latency and throughput", "## Compute", "## Pipeline", "## Profiles"):
        assert heading in md
    assert "onnxruntime-cpu" in md and "None" not in md and "nan" not in md
    for name in ("latency.png", "throughput.png", "pipeline.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 10, f"{name} is blank"
        assert name in md


def test_without_a_reference_the_ratio_is_unavailable_and_memory_is_probed_in_a_torch_free_child(exported, tmp_path):
    from adtr_deploy.bench import BenchConfig, TimingPlan, run_benchmark

    rep = run_benchmark(
        BenchConfig(
            model=exported["onnx"],
            out=tmp_path,
            batch_sizes=(1,),
            backends=("onnxruntime-cpu",),
            plan=TimingPlan(warmup=1, min_iters=3, min_seconds=0.0),
            pipeline=False,
            memory=True,
            images=exported["images"],
            peak_seconds=0.2,
        ),
        log=lambda m: None,
    )
    assert rep["reference"]["checkpoint"] is None and "unavailable" in rep["reference"]["note"]
    (row,) = rep["results"]
    assert row["runner"] == "onnxruntime-cpu" and row["speedup_vs_reference"] is None
    assert rep["flops"]["torch"] is None and rep["flops"]["onnx"]["flops_per_image"] > 0
    m = row["memory"]  # measured in a fresh child process that loaded only ONNX Runtime
    assert "error" not in m, m
    assert m["torch_imported"] is False
    assert m["baseline_mb"] > 10 and m["loaded_mb"] >= m["baseline_mb"] and m["peak_rss_mb"] >= m["loaded_mb"] - 1
    assert "## Memory" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.md").is_file() and (tmp_path / "latency.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "positive"),
        (["--backends", "onnxruntime-gpu"], "unknown backend"),
    ],
)
def test_bad_options_end_in_one_sentence(exported, tmp_path, args, message):
    from adtr_deploy.cli.bench import command

    result = CliRunner().invoke(command, ["--model", str(exported["onnx"]), "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and message.lower() in result.output.lower() and "Traceback" not in result.output


def test_missing_model_is_one_sentence(tmp_path):
    from adtr_deploy.cli.bench import command

    result = CliRunner().invoke(command, ["--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_onnx_flop_count_matches_hand_count(tmp_path):
    """Conv 3->8 k3 on 10x10 (same padding) and MatMul (2,5,8)x(8,4): 2*MACs each, batch axis pinned to 3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from adtr_deploy.bench.flops import onnx_flops

    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.ones((8, 4), np.float32), "m")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),  # (N, 10, 10, 8)
            helper.make_node("MatMul", ["t", "m"], ["y"]),  # (N, 10, 10, 4)
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, m],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    got = onnx_flops(path, batch=3)
    conv = 2 * 3 * 8 * 10 * 10 * 3 * 3 * 3
    matmul = 2 * 3 * 10 * 10 * 8 * 4
    assert got["by_op"] == {"Conv": conv, "MatMul": matmul}
    assert got["flops_per_image"] == (conv + matmul) / 3


def test_summarize_and_interleaving_count_what_they_ran():
    from adtr_deploy.bench.timing import TimingPlan, measure_interleaved, summarize

    s = summarize([0.010, 0.020, 0.030, 0.040], batch_size=4)
    assert s["p50_ms"] == pytest.approx(25.0) and s["mean_ms"] == pytest.approx(25.0)
    assert s["throughput_ips"] == pytest.approx(16 / 0.1)
    calls = {"a": 0, "b": 0}

    def make(name):
        def f():
            calls[name] += 1
            return sum(range(2000))

        return f

    plan = TimingPlan(warmup=2, min_iters=5, min_seconds=0.0, block_seconds=0.0)
    samples = measure_interleaved({"a": make("a"), "b": make("b")}, plan)
    assert len(samples["a"]) >= 5 and len(samples["b"]) >= 5
    # every call was either a warm-up, the block-length estimate, a pre-block call or a timed one
    assert calls["a"] >= 2 + 1 + len(samples["a"])


def test_spinning_and_streams_rows_time_onnx_runtime_variants_in_one_run(exported, tmp_path):
    from adtr_deploy.bench import BenchConfig, TimingPlan, run_benchmark

    rep = run_benchmark(
        BenchConfig(
            model=exported["onnx"],
            out=tmp_path,
            batch_sizes=(1,),
            backends=("onnxruntime-cpu",),
            plan=TimingPlan(warmup=1, min_iters=3, min_seconds=0.0),
            threads=2,
            spinning="both",
            streams=2,
            pipeline=False,
            memory=False,
            images=exported["images"],
            peak_seconds=0.2,
        ),
        log=lambda m: None,
    )
    rows = {r["runner"]: r for r in rep["results"]}
    streamed = "onnxruntime-cpu (2 streams)"
    assert set(rows) == {"onnxruntime-cpu", "onnxruntime-cpu (spinning)", streamed}
    assert all(r["backend"] == "onnxruntime-cpu" and r["count"] >= 3 and r["p50_ms"] > 0 for r in rows.values())
    # each timed call of the streams row runs 2 batches of 1: its images/s counts both (throughput = 2 / mean latency)
    s = rows[streamed]
    assert s["throughput_ips"] == pytest.approx(2 * 1000 / s["mean_ms"], rel=1e-6)
    assert rep["settings"]["onnxruntime_spinning"] == "both" and rep["settings"]["onnxruntime_streams"] == 2
    md = (tmp_path / "report.md").read_text()
    assert "onnxruntime-cpu (spinning)" in md and streamed in md
