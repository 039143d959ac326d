"""Training several categories: one run per category, a summary table with the mean, failures recorded; GPU spreading
helpers (the GPU workers themselves need GPUs and are not exercised here)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adtr_deploy.cli.train import command as train_command
from adtr_deploy.train.multi import parse_categories, parse_devices, round_robin
from tests.train_data import make_mvtec

FAST = ["--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for i, cat in enumerate(("tex", "tex2")):
        make_mvtec(root, cat, n_train=8, n_good=2, n_masked=2, n_unmasked=0, seed=i)
    make_mvtec(root, "few", n_train=3, n_good=1, n_masked=1, n_unmasked=0, seed=2)  # too few to hold out 4
    return root


def test_category_list_trains_one_run_each_and_writes_the_summary(root, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        train_command, ["--data", str(root), "--category", "tex,tex2", "--out", str(out), *FAST]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["category"] for r in summary["categories"]] == ["tex", "tex2"]
    for row in summary["categories"]:
        metrics = json.loads((out / row["category"] / "metrics.json").read_text())
        assert (out / row["category"] / "checkpoint.pt").is_file() and row["status"] == "ok"
        assert row["image_auroc"] == metrics["image_auroc"] and row["pixel_auroc"] == metrics["pixel_auroc"]
    rows = summary["categories"]
    assert summary["mean"]["image_auroc"] == pytest.approx((rows[0]["image_auroc"] + rows[1]["image_auroc"]) / 2)
    assert summary["mean"]["pixel_auroc"] == pytest.approx((rows[0]["pixel_auroc"] + rows[1]["pixel_auroc"]) / 2)
    table = (out / "summary.md").read_text()
    assert "| tex2 |" in table and "| mean |" in table and table in result.output
    assert table.count("| ok |") == 2 and table.rstrip().endswith("| 2 ok |")


def test_a_failing_category_is_recorded_and_the_others_still_run(root, tmp_path):
    out = tmp_path / "runs"
    args = ["--data", str(root), "--category", "few,tex", "--out", str(out), "--no-eval", *FAST]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 1 and "1 of 2 categories failed (few)" in result.output
    assert (out / "tex" / "checkpoint.pt").is_file() and not (out / "few" / "checkpoint.pt").exists()
    rows = {r["category"]: r for r in json.loads((out / "summary.json").read_text())["categories"]}
    assert "only 3 training images" in rows["few"]["status"]
    assert rows["tex"]["image_auroc"] is None and "no metrics.json" in rows["tex"]["status"]  # --no-eval


def test_all_means_every_category_folder_and_unknown_names_fail_clearly(root, tmp_path):
    assert parse_categories(root, "all") == ["few", "tex", "tex2"]
    assert parse_categories(root, "tex") is None  # a single category: the plain single run
    result = CliRunner().invoke(
        train_command, ["--data", str(root), "--category", "tex,nope", "--out", str(tmp_path / "o"), *FAST]
    )
    assert result.exit_code == 1 and f"Error: category folder {root / 'nope'} does not exist" in result.output
    with pytest.raises(ValueError, match="has no category folders"):
        parse_categories(tmp_path, "all")


def test_devices_get_categories_round_robin():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert round_robin(["a", "b", "c"], ["cuda:0", "cuda:1"]) == {"cuda:0": ["a", "c"], "cuda:1": ["b"]}
    with pytest.raises(ValueError, match="is not cuda:N"):
        parse_devices("cpu,cuda:1")


def test_devices_need_several_categories(root, tmp_path):
    args = ["--data", str(root), "--category", "tex", "--out", str(tmp_path / "o"), "--devices", "cuda:0"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 1 and "give --category a,b or all" in result.output
