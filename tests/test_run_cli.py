"""`adtr-run`: folders with broken files, videos, streams that drop, limits, thresholds, Ctrl-C, user errors."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.preprocess import load_image, prepare, stack_batch
from tests import runtime_fixtures as rf
from tests.test_runtime import TOL, poisoned_torch_env
from tests.test_sources import write_video

SIZE = (rf.INPUT_SIZE, rf.INPUT_SIZE)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


def run_cli(*args) -> tuple[object, list[dict], dict]:
    result = CliRunner().invoke(command, [str(a) for a in args])
    out = Path(args[list(args).index("--out") + 1])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] if out.exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return result, records, summary


def test_folder_with_broken_files_gives_every_input_a_record_and_the_good_ones_are_right(model_path, tmp_path):
    folder = tmp_path / "inspection"
    good = rf.write_images(folder, 3, seed=4) + rf.write_images(folder / "line2", 2, seed=5)
    (folder / "corrupt.png").write_bytes(good[0].read_bytes()[:200])  # a truncated PNG
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("camera 3, shift B")
    out = tmp_path / "out"
    result, records, summary = run_cli(
        "--model", model_path, "--source", folder, "--out", out, "--batch-size", "2", "--save-overlays"
    )
    assert result.exit_code == 0, result.output

    by_name = {Path(r["source"]).relative_to(folder).as_posix(): r for r in records}
    assert len(records) == 8 and len(by_name) == 8  # every input exactly once
    for name in ("corrupt.png", "zero.jpg", "readme.txt"):
        rec = by_name[name]
        assert rec["status"] == "error" and rec["score"] is None and rec["error"]
    assert "empty" in by_name["zero.jpg"]["error"] and "not an image" in by_name["readme.txt"]["error"]
    assert "not a readable image" in by_name["corrupt.png"]["error"]

    ok = [r for r in records if r["status"] == "ok"]
    ref_map, ref_score = rf.reference_outputs(stack_batch(load_image(r["source"], SIZE) for r in ok))
    np.testing.assert_allclose([r["score"] for r in ok], ref_score, atol=TOL, rtol=TOL)
    thr = rf.calibration().threshold
    assert [r["is_anomaly"] for r in ok] == [bool(s > thr) for s in ref_score]
    for r in ok:
        assert r["error"] is None and r["latency_ms"] >= 0 and r["frame"] == 0
        overlay = cv2.imread(str(out / r["overlay"]))
        assert overlay.shape[:2] == cv2.imread(r["source"]).shape[:2]

    assert summary["images"] == 8 and summary["ok"] == 5 and summary["errors"] == 3
    assert summary["anomalies"] == sum(r["is_anomaly"] for r in ok)
    assert summary["stopped"] == "end of source" and summary["throughput_fps"] > 0
    assert "8 images" in result.output


def test_video_is_processed_frame_by_frame_with_an_annotated_video_out(model_path, tmp_path, monkeypatch):
    clip = tmp_path / "line.avi"
    write_video(clip, 10, fps=10.0)
    out = tmp_path / "out"
    annotated = out / "annotated.avi"
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):  # --show without a display: a notice, and the run goes on
        monkeypatch.delenv(var, raising=False)
    result, records, summary = run_cli(
        "--model", model_path, "--source", clip, "--out", out, "--batch-size", "4", "--save-video", annotated, "--show"
    )
    assert result.exit_code == 0, result.output
    assert "--show is ignored" in result.output
    assert [r["frame"] for r in records] == list(range(10)) and all(r["status"] == "ok" for r in records)
    # reference: the same frames read independently with OpenCV and prepared by preprocess
    cap = cv2.VideoCapture(str(clip))
    frames = [cap.read()[1] for _ in range(10)]
    cap.release()
    _, ref_score = rf.reference_outputs(stack_batch(prepare(f, SIZE, bgr=True) for f in frames))
    np.testing.assert_allclose([r["score"] for r in records], ref_score, atol=TOL, rtol=TOL)
    check = cv2.VideoCapture(str(annotated))
    n, size = 0, None
    while n < 50:
        ok, img = check.read()
        if not ok:
            break
        n, size = n + 1, img.shape[:2]
    check.release()
    assert n == 10 and size == frames[0].shape[:2] and summary["video"] == str(annotated)


def test_max_frames_and_threshold_override(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 8)
    _, records, summary = run_cli("--model", model_path, "--source", clip, "--out", tmp_path / "a", "--max-frames", "3")
    assert len(records) == 3 and summary["stopped"] == "max-frames"
    scores = [r["score"] for r in records]
    # The low threshold must stay above the good images' mean score (the CLI refuses one below it: normalized scores
    # would be undefined), so it flags the frames that score above it, not necessarily all three.
    mean = json.loads((Path(model_path).parent / "model.json").read_text())["calibration"]["score_mean"]
    thr_low = max(min(scores) - 1e-4, mean + 1e-4)
    res_low, low, s_low = run_cli(
        "--model",
        model_path,
        "--source",
        clip,
        "--out",
        tmp_path / "b",
        "--max-frames",
        "3",
        "--threshold",
        thr_low,
    )
    res_high, high, s_high = run_cli(
        "--model",
        model_path,
        "--source",
        clip,
        "--out",
        tmp_path / "c",
        "--max-frames",
        "3",
        "--threshold",
        max(max(scores), mean) + 1e-4,
    )
    assert res_low.exit_code == 0 and res_high.exit_code == 0, res_low.output + res_high.output
    assert [r["is_anomaly"] for r in low] == [s > thr_low for s in scores] and [r["is_anomaly"] for r in high] == [
        False
    ] * 3
    assert s_low["threshold"] == pytest.approx(thr_low) and s_high["anomalies"] == 0


def test_stream_that_drops_is_reconnected_and_the_gap_is_in_the_results(model_path, tmp_path):
    plan = [("stream", 6, "cut"), ("stream", 600, "close")]
    with rf.MjpegServer(plan, interval_s=0.02, down_s=0.3) as server:
        out = tmp_path / "out"
        result, records, summary = run_cli(
            "--model", model_path, "--source", server.url, "--out", out, "--max-frames", "12", "--duration", "30"
        )
    assert result.exit_code == 0, result.output
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)
    frames = [r["frame"] for r in records]
    assert frames == sorted(frames) and len(set(frames)) == 12
    gapped = [r for r in records if "gap" in r]
    assert len(gapped) == 1 and gapped[0]["gap"]["duration_s"] > 0
    assert summary["reconnects"] >= 1 and summary["gaps"][0]["end"] == gapped[0]["gap"]["end"]
    assert summary["live"] is True and summary["stopped"] == "max-frames"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "{tmp}/nothing_here"], "is not an existing file or folder"),
        (["--model", "{tmp}/missing.onnx"], "does not exist"),
        (["--device", "cuda"], "CUDAExecutionProvider"),
        (["--threshold", "nan"], "not a finite number"),
        (["--keep", "5XB"], "--keep '5XB' is not an age or a size"),
        (["--keep", "-3d"], "--keep '-3d' is not an age or a size"),
    ],
)
def test_user_errors_are_one_sentence_without_a_traceback(model_path, tmp_path, args, message):
    import onnxruntime as ort

    if "--device" in args and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    images = rf.write_images(tmp_path / "imgs", 1)
    base = {"--model": str(model_path), "--source": str(images[0]), "--out": str(tmp_path / "out")}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value.format(tmp=tmp_path)
    result = CliRunner().invoke(command, [x for kv in base.items() for x in kv])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output  # no traceback
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("Error:")


def test_ctrl_c_on_a_live_stream_keeps_every_record_and_writes_the_summary_without_torch(model_path, tmp_path):
    """A real `adtr-run` process (torch made unimportable) on an endless stream, stopped with SIGINT."""
    out = tmp_path / "out"
    env = poisoned_torch_env(tmp_path)
    with rf.MjpegServer([("stream", 3000, "close")], interval_s=0.02) as server:
        cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()"]
        cmd += ["--model", str(model_path), "--source", server.url, "--out", str(out), "--duration", "60"]
        proc = rf.start_interruptible(cmd, env)
        try:
            results, t0 = out / "results.jsonl", time.monotonic()
            # Interrupt only a run that is really processing the stream: wait for its first records (generously, so a
            # slow machine cannot make the test fail; normally they come within a few seconds).
            while time.monotonic() - t0 < 120 and proc.poll() is None:
                if results.exists() and len(results.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()[1]
            assert results.exists() and len(results.read_text().splitlines()) >= 3, (
                f"adtr-run wrote no results within {time.monotonic() - t0:.0f} s"
            )
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)  # generous; the whole test normally takes under 10 s
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stderr  # Ctrl-C is how a live run normally ends
    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is a complete record
    assert len(records) >= 3 and all(r["status"] == "ok" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["images"] == len(records)
    assert "Stopped by Ctrl-C" in stdout and "torch" not in stderr


def test_thread_settings_reach_onnx_runtime_and_do_not_change_the_results(model_path, tmp_path):
    clip = tmp_path / "line.avi"
    write_video(clip, 4)
    base, records, summary = run_cli("--model", model_path, "--source", clip, "--out", tmp_path / "a")
    spun, spun_records, spun_summary = run_cli(
        "--model", model_path, "--source", clip, "--out", tmp_path / "b", "--threads", "1", "--spin"
    )
    streamed, streamed_records, streamed_summary = run_cli(
        "--model", model_path, "--source", clip, "--out", tmp_path / "d", "--streams", "2", "--batch-size", "2"
    )
    assert streamed.exit_code == 0, streamed.output
    assert streamed_summary["backend"]["streams"] == 2 and len(streamed_records) == 4
    for a, b in zip(records, streamed_records):  # frames split over two sessions come back in order
        assert (b["source"], b.get("frame")) == (a["source"], a.get("frame"))
        assert b["score"] == pytest.approx(a["score"], rel=TOL, abs=TOL)
    assert base.exit_code == 0 and spun.exit_code == 0, base.output + spun.output
    assert summary["backend"]["spinning"] is False and summary["backend"]["intra_op_threads"] is None
    assert spun_summary["backend"]["spinning"] is True and spun_summary["backend"]["intra_op_threads"] == 1
    assert len(records) == len(spun_records) == 4
    for a, b in zip(records, spun_records):  # the thread pool changes the speed, never the answer
        assert b["score"] == pytest.approx(a["score"], rel=TOL, abs=TOL)
    bad = CliRunner().invoke(
        command, ["--model", str(model_path), "--source", str(clip), "--out", str(tmp_path / "c"), "--threads", "0"]
    )
    assert bad.exit_code != 0 and "--threads" in bad.output and "Traceback" not in bad.output


def test_streams_on_a_live_stream_keep_frames_in_flight_and_record_them_in_order(model_path, tmp_path):
    with rf.MjpegServer([("stream", 600, "close")], interval_s=0.01) as server:
        result, records, summary = run_cli(
            "--model", model_path, "--source", server.url, "--out", tmp_path / "out", "--max-frames", "10",
            "--duration", "30", "--streams", "2",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(records) == 10 and all(r["status"] == "ok" for r in records)
    frames = [r["frame"] for r in records]
    assert frames == sorted(frames) and len(set(frames)) == 10  # written in source order, none twice
    assert summary["backend"]["streams"] == 2 and summary["images"] == 10 and summary["stopped"] == "max-frames"


def test_latency_histogram_is_bounded_and_its_percentiles_are_within_4_percent():
    """The summary's percentiles come from fixed log buckets (memory does not grow with the run), not from a list."""
    from adtr_deploy.runtime.runstate import LatencyHistogram

    values = np.random.default_rng(0).lognormal(mean=3.0, sigma=1.0, size=200_000)  # ms: 1 to 1000s, a long tail
    hist = LatencyHistogram()
    size = hist.counts.nbytes
    for v in values:
        hist.add(float(v))
    assert hist.counts.nbytes == size and hist.n == len(values)
    got = hist.summary()
    assert got["mean"] == pytest.approx(values.mean(), abs=1e-3)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(values, q), rel=0.04)
    assert LatencyHistogram().summary() == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_records_of_a_folder_are_read_across_segments_in_order(model_path, tmp_path):
    """A live run's closed segments and results.jsonl read as one history (outdir.read_records), a torn line skipped."""
    from adtr_deploy.runtime.outdir import read_records, result_files

    out = tmp_path / "out"
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.01) as cam:
        for _ in range(3):
            result = CliRunner().invoke(command, ["--model", str(model_path), "--source", cam.url, "--out", str(out),
                                                  "--resume", "--max-frames", "4", "-q"])  # fmt: skip
            assert result.exit_code == 0, result.output
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"run": "half a rec')  # kill -9 mid-write
    assert [p.name.startswith("results-") for p in result_files(out)] == [True, True, False]
    recs = list(read_records(out))
    runs = list(dict.fromkeys(r["run"] for r in recs))
    assert len(recs) == 12 and len(runs) == 3 and runs == sorted(runs)
    assert [r["frame"] for r in recs if r["run"] == runs[1]] == sorted(r["frame"] for r in recs if r["run"] == runs[1])
    history = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [h["run"] for h in history] == runs and all(h["images"] == 4 for h in history)
