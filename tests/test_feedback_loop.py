"""The operator's loop scenario (issue 26, benchmarks/feedback_loop.py) at tiny size: a tiny model trained on demo
images meets a noisier line through a real MJPEG camera; the script labels the kept frames, trains on the review with
`adtr-train --feedback`, gates with `adtr promote` while `adtr-run --serve` runs, and the service takes the new version.
What is checked is the loop's mechanics (every frame recorded once, the labels, the gate's decision and the swap);
the quality figures belong to the full-size run (benchmarks/results/feedback_loop.md): a tiny 64 px model says
nothing about them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from adtr_deploy.cli.train import command as train_command
from adtr_deploy.data.demo import write_demo_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "feedback_loop.py"


def load_script():
    spec = importlib.util.spec_from_file_location("feedback_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scenario_runs_the_whole_loop_at_tiny_size(tmp_path):
    data = write_demo_dataset(
        tmp_path / "demo", ["brick"], image_size=64, num_train=16, num_test_good=2, num_per_defect=1
    )
    base = tmp_path / "base"
    res = CliRunner().invoke(
        train_command,
        ["--data", str(data), "--category", "brick", "--out", str(base), "--preset", "tiny", "--epochs", "2"]
        + ["--batch-size", "8", "--no-eval", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "result.json"
    small = ["--line-good", "14", "--line-defects", "4", "--heldout-good", "6", "--eval-good", "8"]
    small += ["--eval-defects", "4", "--live-frames", "18", "--fps", "8", "--image-size", "64"]
    small += ["--review-sample", "1", "--train-args", "--epochs 1 --batch-size 8"]
    small += ["--export-args", "--exporter torchscript --no-verify"]
    result = load_script().main(["--base", str(base), "--work", str(tmp_path / "work"), "--out", str(out), *small])

    steps = result["steps"]
    # phase 1: every camera frame recorded; with --review-sample 1 every frame is kept, so the operator labels all 18
    assert steps["1_deployed_on_shifted_line"]["frames"] == 18
    labels = steps["2_labels"]
    assert labels["defect"] == 4 and labels["false_alarm"] + labels["good"] == 14
    review = tmp_path / "work" / "run1" / "review" / "v1"
    lines = [json.loads(x) for x in (review / "review.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and len(list((review / "defect").glob("*.png"))) == 4
    # the feedback run trained on that review and says so
    from adtr_deploy.spec import ModelSpec

    spec = ModelSpec.load(tmp_path / "work" / "v2_export" / "model.json")
    fb = spec.extra["feedback"]
    assert fb["defects"] == 4 and fb["good_train"] + fb["good_calibration"] == 14
    assert fb["model_sha256"] == lines[0]["model_sha256"]
    # phase 2: no frame lost across the gate; a promotion is taken between two batches, a refusal keeps version 1
    live = steps["4_live_swap"]
    assert live["frames_sent"] == 18 and live["records"] == 18 and live["frames_dropped"] == 0 and live["errors"] == 0
    decision = steps["4_gate"]["decision"]
    assert decision in ("promoted", "refused")
    if decision == "promoted":
        assert live["swaps"] == 1 and set(live["records_per_version"]) == {"1", "2"}
        assert set(result["steps"]["5_evaluation"]) == {"v1", "v2"}
    else:
        assert live["swaps"] == 0 and set(live["records_per_version"]) == {"1"}
    assert out.is_file() and out.with_suffix(".md").is_file()
