"""`adtr demo`: the whole job end to end (data, train, export, run, eval, bench, report) on the tiny preset."""

from __future__ import annotations

import json

from click.testing import CliRunner

from adtr_deploy.cli.main import cli


def test_demo_runs_the_main_job_end_to_end_and_writes_one_report(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        cli, ["demo", "--out", str(out), "--preset", "tiny", "--epochs", "1", "--bench-seconds", "0.2", "--quick"]
    )
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    # Every step left its real product behind, and the report quotes measured figures from them.
    train = json.loads((out / "run" / "metrics.json").read_text())
    exported = json.loads((out / "eval" / "metrics.json").read_text())
    assert train["num_images"] == exported["num_images"] == 60
    # The exported model is evaluated through the runtime and agrees with the checkpoint's own evaluation. A 1-epoch
    # tiny model scores many images nearly alike, so float rounding between PyTorch and ONNX Runtime may reorder a
    # near-tied good/anomalous pair: allow two of the n_good * n_anomalous pairs to flip, nothing more.
    n_bad = exported["num_anomalous"]
    pairs = (exported["num_images"] - n_bad) * n_bad
    assert train["num_anomalous"] == n_bad and pairs > 0
    assert abs(train["image_auroc"] - exported["image_auroc"]) <= 2 / pairs + 1e-12
    assert f"{exported['image_auroc']:.3f}" in report
    records = (out / "results" / "results.jsonl").read_text().splitlines()
    assert len(records) == 60 and all(json.loads(r)["status"] == "ok" for r in records)
    bench = json.loads((out / "bench" / "report.json").read_text())
    assert any(r["runner"] == "onnxruntime-cpu" for r in bench["results"])
    assert "| onnxruntime-cpu | 1 |" in report and "![" in report
    # A second run into the same folder is refused instead of silently mixing results.
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--preset", "tiny", "--epochs", "1"])
    assert res.exit_code != 0 and "--overwrite" in res.output
