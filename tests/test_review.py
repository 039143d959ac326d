"""Review of flagged parts (issue 26, steps 1-2): the run keeps flagged frames (--keep-frames), an operator labels them
over the API or with `adtr review`, and the labels land in a review folder in the MVTec layout with provenance.

Real parts only: the tiny exported model, image folders and a video written with OpenCV, a live MJPEG camera and a
served adtr-run on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.main import cli
from adtr_deploy.cli.run import command as run_command
from adtr_deploy.runtime.outdir import read_records
from adtr_deploy.runtime.review import Review, review_id
from adtr_deploy.runtime.segments import keeps
from tests import runtime_fixtures as rf
from tests.serve_helpers import ServedRun, get, get_json
from tests.test_serve_browser import Browser, needs_chromium
from tests.test_sources import write_video

TOKEN = "review-secret"


@pytest.fixture(scope="module")
def model() -> Path:
    return rf.onnx_model()


def run(model: Path, source: Path, out: Path, *extra: str) -> None:
    res = CliRunner().invoke(
        run_command, ["--model", str(model), "--source", str(source), "--out", str(out), "-q", *extra]
    )
    assert res.exit_code == 0, res.output


def review(*args: str):
    return CliRunner().invoke(cli, ["review", *map(str, args)])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def flagged_run(model, tmp_path_factory) -> Path:
    """An image folder run that keeps flagged frames and every passed one (--review-sample 1)."""
    tmp = tmp_path_factory.mktemp("flagged")
    rf.write_images(tmp / "imgs", 8)
    out = tmp / "out"
    run(model, tmp / "imgs", out, "--keep-frames", "flagged", "--review-sample", "1")
    return out


def test_a_run_keeps_the_original_frames_of_flagged_parts(model, flagged_run, tmp_path):
    records = list(read_records(flagged_run))
    flagged = [r for r in records if r["is_anomaly"]]
    assert flagged and len(flagged) < len(records)  # both decisions occur, so both paths are exercised
    for r in records:
        kept = flagged_run / r["original"]
        # lossless: the PNG holds exactly the pixels the run decoded from the source
        assert np.array_equal(cv2.imread(str(kept)), cv2.imread(r["source"])), r["source"]
        assert kept.with_suffix(".jpg").is_file()  # its overlay beside it
    # no sample: only the flagged ones; none: nothing kept at all (and no frames folder)
    rf.write_images(tmp_path / "imgs", 8)
    run(model, tmp_path / "imgs", tmp_path / "flagged", "--keep-frames", "flagged", "--review-sample", "0")
    got = list(read_records(tmp_path / "flagged"))
    assert [bool(r.get("original")) for r in got] == [r["is_anomaly"] for r in got]
    run(model, tmp_path / "imgs", tmp_path / "none")
    assert not any("original" in r for r in read_records(tmp_path / "none"))
    assert not (tmp_path / "none" / "frames").exists()


def test_the_review_sample_is_seeded_and_near_its_share():
    passed = [{"status": "ok", "is_anomaly": False, "run": "R", "source": "camera:0", "frame": i} for i in range(4000)]
    picks = [keeps(r, "flagged", 0.05) for r in passed]
    assert picks == [keeps(r, "flagged", 0.05) for r in passed]  # the same records every time
    assert 0.03 < sum(picks) / len(picks) < 0.07
    assert not any(keeps(r, "none", 1.0) for r in passed)
    assert keeps({"status": "ok", "is_anomaly": True}, "flagged", 0.0)
    assert not keeps({"status": "error", "is_anomaly": None}, "flagged", 1.0)


def test_cli_labels_land_in_the_review_folder_with_provenance(flagged_run, tmp_path):
    records = list(read_records(flagged_run))
    alarm = next(r for r in records if r["is_anomaly"])
    defect = [r for r in records if r["is_anomaly"]][-1]
    listed = review(flagged_run)
    assert listed.exit_code == 0 and review_id(alarm) in listed.output, listed.output
    rdir = tmp_path / "rev"
    res = review(
        flagged_run, "--record", review_id(alarm), "--label", "false_alarm", "--by", "J. Doe", "--review-dir", rdir
    )
    assert res.exit_code == 0, res.output
    res = review(flagged_run, "--record", review_id(defect), "--label", "defect", "--by", "A. Roe", "--note", "scratch",
                 "--review-dir", rdir)  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in (rdir / "review.jsonl").read_text().splitlines()]
    assert [(e["label"], e["who"]) for e in lines] == [("false_alarm", "J. Doe"), ("defect", "A. Roe")]
    for entry, record, folder in ((lines[0], alarm, "good"), (lines[1], defect, "defect")):
        assert entry["image"].startswith(folder + "/")
        assert (rdir / entry["image"]).read_bytes() == (flagged_run / record["original"]).read_bytes()
        for key in ("frame", "source", "run", "timestamp", "model_sha256", "score"):
            assert entry[key] == record[key], key
        assert entry["camera"] is None and entry["time"] and entry["via"] == "cli"
    assert lines[1]["note"] == "scratch"
    assert f"{review_id(alarm)}  flagged" in review(flagged_run, "--review-dir", rdir).output
    assert "false_alarm by J. Doe" in review(flagged_run, "--review-dir", rdir).output


def test_bad_input_gets_one_sentence_and_changes_nothing(model, flagged_run, tmp_path):
    rdir = tmp_path / "rev"
    first = next(r for r in read_records(flagged_run) if r["is_anomaly"])
    assert (
        review(
            flagged_run, "--record", review_id(first), "--label", "defect", "--by", "J", "--review-dir", rdir
        ).exit_code
        == 0
    )
    before = snapshot(rdir)

    def refused(*args, says: str) -> None:
        res = review(flagged_run, *args, "--by", "J", "--review-dir", rdir)
        assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output
        assert res.output.count("Error:") == 1
        assert snapshot(rdir) == before

    refused("--record", "no/such_frame", "--label", "defect", says="no kept frame 'no/such_frame'")
    refused("--record", review_id(first), "--label", "good", says="already labelled defect by J")
    # another model's run: the same frames, recorded under another model's sha256 (exporting a second model would only
    # make this test slower; what the check reads is the record's model_sha256)
    other = tmp_path / "other"
    rf.write_images(tmp_path / "imgs", 8)
    run(model, tmp_path / "imgs", other, "--keep-frames", "flagged", "--review-sample", "1")
    results = other / "results.jsonl"
    results.write_text(results.read_text().replace(first["model_sha256"], "0123456789abcdef"))
    theirs = next(read_records(other))
    res = review(other, "--record", review_id(theirs), "--label", "good", "--by", "J", "--review-dir", rdir)
    assert res.exit_code == 1 and "holds labels of another model" in res.output, res.output
    assert snapshot(rdir) == before
    # --relabel moves the image to the other folder and records the change
    res = review(flagged_run, "--record", review_id(first), "--label", "false_alarm", "--by", "K", "--relabel",
                 "--review-dir", rdir)  # fmt: skip
    assert res.exit_code == 0, res.output
    labels = Review(flagged_run, rdir).labels()
    assert labels[review_id(first)]["label"] == "false_alarm" and labels[review_id(first)]["relabel"] is True
    assert not list((rdir / "defect").glob("*.png")) and len(list((rdir / "good").glob("*.png"))) == 1


def test_api_labels_a_flagged_frame_with_the_token_and_lists_its_state(model, tmp_path):
    write_video(tmp_path / "line.avi", 12)
    out = tmp_path / "out"
    args = ["--model", model, "--source", tmp_path / "line.avi", "--out", out, "--serve", "127.0.0.1:0",
            "--serve-token", TOKEN, "--serve-linger", "120", "-q"]  # fmt: skip
    with ServedRun(*args) as served:
        served.wait_for(lambda s: s["state"] == "finished", what="the video's end")
        code, listing = get_json(served.url + "api/review")
        assert code == 200 and listing["items"], listing  # kept by default with --serve
        item = next(i for i in listing["items"] if i["kind"] == "flagged")
        assert item["label"] is None and all(i["is_anomaly"] for i in listing["items"] if i["kind"] == "flagged")
        code, _, png = get(served.url + "api/review/original.png?id=" + item["id"])
        record = next(r for r in read_records(out) if review_id(r) == item["id"])
        assert code == 200 and png == (out / record["original"]).read_bytes()
        assert get(served.url + "api/review/overlay.jpg?id=" + item["id"])[0] == 200
        assert b"review.js" in get(served.url + "review")[2]
        body = json.dumps({"id": item["id"], "label": "false_alarm", "by": "J. Doe", "note": "glare"}).encode()

        def post(data: bytes, token: str | None = TOKEN):
            headers = {"Content-Type": "application/json", **({"X-ADTR-Token": token} if token else {})}
            import urllib.error
            import urllib.request

            req = urllib.request.Request(served.url + "api/review", data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=20) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert post(body, token=None)[0] == 403 and post(body, token="wrong")[0] == 403
        assert not (out / "review").exists()
        code, answer = post(body)
        assert code == 200, answer
        entry = answer["review"]
        assert (entry["label"], entry["who"], entry["note"], entry["via"]) == ("false_alarm", "J. Doe", "glare", "api")
        assert (out / "review" / entry["image"]).read_bytes() == png and entry["image"].startswith("good/")
        line = json.loads((out / "review" / "review.jsonl").read_text())
        assert line == entry and line["model_sha256"] == record["model_sha256"] and line["frame"] == record["frame"]
        listed = {i["id"]: i for i in get_json(served.url + "api/review")[1]["items"]}
        assert listed[item["id"]]["label"] == "false_alarm" and listed[item["id"]]["who"] == "J. Doe"
        before = snapshot(out / "review")
        for data, says in (
            (body, "already labelled false_alarm"),
            (json.dumps({"id": "nope", "label": "defect"}).encode(), "no kept frame 'nope'"),
            (json.dumps({"id": item["id"], "label": "broken"}).encode(), "is not one of defect"),
        ):
            code, answer = post(data)
            assert code == 409 and says in answer["error"], answer
        assert post(b"[1]")[0] == 400
        assert snapshot(out / "review") == before
        assert "labelled false_alarm by J. Doe" in served.log


def test_a_line_of_cameras_labels_carry_the_camera(model, tmp_path):
    write_video(tmp_path / "a.avi", 6)
    out = tmp_path / "out"
    res = CliRunner().invoke(run_command, ["--model", str(model), "--source", f"top={tmp_path / 'a.avi'}", "--source",
                             f"side={tmp_path / 'a.avi'}", "--out", str(out), "-q", "--keep-frames", "flagged"])  # fmt: skip
    assert res.exit_code == 0, res.output
    items = Review(out).listing()
    assert {i["camera"] for i in items} == {"top", "side"} and all(i["id"].startswith(i["camera"] + ":") for i in items)
    side = next(i for i in items if i["camera"] == "side")
    res = review(out, "--record", side["id"], "--label", "defect", "--by", "J")
    assert res.exit_code == 0, res.output
    entry = Review(out).labels()[side["id"]]
    assert entry["camera"] == "side" and (out / "review" / entry["image"]).is_file()


def test_retention_removes_kept_frames_with_their_segment(model, tmp_path):
    """--keep SIZE on a live camera with every frame kept: segments close and go, their frames folders with them."""
    out = tmp_path / "out"
    keep = 200_000  # bytes: segments of about 25 KB, so a few seconds give many
    args = ["--model", model, "--out", out, "--resume", "--keep-frames", "flagged", "--review-sample", "1", "-q"]
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.02) as cam:
        cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()"]
        proc = rf.start_interruptible([*cmd, *map(str, [*args, "--source", cam.url, "--keep", f"{keep}B"])], None)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 90 and len(list(out.glob("results-*.jsonl"))) < 3:
                time.sleep(0.1)
            time.sleep(3)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    kept = list(read_records(out))
    summary = json.loads((out / "summary.json").read_text())
    assert len(kept) < summary["images"]  # old segments were removed ...
    tags = {p.stem[len("results-") :] for p in out.glob("results-*.jsonl")} | {
        Path(r["original"]).parent.name for r in kept
    }
    assert {p.name for p in (out / "frames").iterdir()} <= tags  # ... with their kept frames
    assert all((out / r["original"]).is_file() for r in kept)
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert used <= keep + 8 * 30_000, used


@needs_chromium
def test_the_review_page_in_chromium_labels_a_frame_into_the_review_folder(model, tmp_path):
    """The real page: its list shows the kept frames with overlay and original; a click on False alarm (with the token
    and a name typed in) puts the frame into review/good/ with who labelled it, and the page then shows the label."""
    write_video(tmp_path / "line.avi", 12)
    out = tmp_path / "out"
    args = ["--model", model, "--source", tmp_path / "line.avi", "--out", out, "--serve", "127.0.0.1:0",
            "--serve-token", TOKEN, "--serve-linger", "120", "-q"]  # fmt: skip
    with ServedRun(*args) as served:
        served.wait_for(lambda s: s["state"] == "finished", what="the video's end")
        browser = Browser(tmp_path / "profile")
        try:
            browser.open(served.url + "review")

            def shown(expression: str, predicate, what: str):
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60:
                    value = browser.js(expression)
                    if predicate(value):
                        return value
                    time.sleep(0.1)
                raise AssertionError(f"the review page did not show {what}; it shows {value!r}")

            first = "document.querySelector('#items li')"
            rid = shown(f"{first} && {first}.dataset.id", bool, "a kept frame")
            loaded = f"[...{first}.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0)"
            assert shown(loaded, lambda v: v == [True, True], "its overlay and original")
            browser.js("document.getElementById('token').value = " + json.dumps(TOKEN))
            browser.js("document.getElementById('by').value = 'J. Doe'")
            label = "false_alarm" if Review(out).find(rid)["is_anomaly"] else "good"
            browser.js(f"{first}.querySelector('button[data-label={label}]').click()")
            state = f"document.querySelector('#items li[data-id=\"' + {json.dumps(rid)} + '\"] .review-state')"
            assert shown(f"{state} && {state}.textContent", lambda v: v and "J. Doe" in v, "the label") == (
                f"{label} by J. Doe"
            )
        finally:
            browser.close()
    entry = Review(out).labels()[rid]
    assert (entry["who"], entry["via"], entry["label"]) == ("J. Doe", "api", label)
    record = Review(out).find(rid)
    assert (out / "review" / entry["image"]).read_bytes() == (out / record["original"]).read_bytes()
    assert entry["image"].startswith("good/")


def _docs_screenshot(target: Path) -> None:
    """The review page after a run over a video, one frame labelled (docs/images/review.png)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="adtr-review-shot-"))
    write_video(tmp / "line.avi", 24)
    out = tmp / "out"
    args = ["--model", rf.onnx_model(), "--source", tmp / "line.avi", "--out", out, "--serve", "127.0.0.1:0",
            "--serve-linger", "120", "-q"]  # fmt: skip
    with ServedRun(*args) as served:
        served.wait_for(lambda s: s["state"] == "finished", what="the video's end")
        rid = next(i["id"] for i in Review(out).listing() if i["kind"] == "flagged")
        Review(out).label(rid, "false_alarm", "J. Doe", via="api")
        browser = Browser(tmp / "profile")
        try:
            browser.open(served.url + "review")
            time.sleep(3)
            browser.screenshot(target)
        finally:
            browser.close()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1:
        _docs_screenshot(Path(sys.argv[1]))
    else:
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))
