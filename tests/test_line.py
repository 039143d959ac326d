"""Many cameras in one process (issue 25): a real `adtr-run` over 2 videos and 2 loopback MJPEG cameras, one cut and
back, one added and one removed over the API; the shared batcher on a real ONNX Runtime session; the line file's
refusals; the Python API."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.cli.run import command
from adtr_deploy.errors import UserError
from adtr_deploy.runtime import outdir
from adtr_deploy.runtime.backends import open_model
from adtr_deploy.runtime.batcher import Batcher
from adtr_deploy.runtime.line import Line
from adtr_deploy.runtime.pipeline import RunOptions
from tests import runtime_fixtures as rf
from tests.conftest import texture_images
from tests.serve_helpers import ServedRun, WebhookReceiver, get, get_json
from tests.test_sources import write_video


@pytest.fixture(scope="module")
def model_path() -> Path:
    return rf.onnx_model()


def post(url: str, body: dict | None = None, token: str = "-") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"X-ADTR-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def camera_records(out: Path, name: str) -> list[dict]:
    return list(outdir.read_records(out / name))


def test_four_cameras_one_cut_and_back_one_added_one_removed_records_complete_per_camera(model_path, tmp_path):
    write_video(tmp_path / "a.avi", 12)
    write_video(tmp_path / "b.avi", 8)
    # cam "up" is cut after 25 frames, answers 503 for a second, then streams again; "side" streams steadily.
    with (
        rf.MjpegServer([("stream", 25, "cut"), ("stream", 100000, "close")], interval_s=0.04, down_s=1.0) as up,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as side,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as extra,
        WebhookReceiver() as hook,
    ):
        line_file = tmp_path / "line.json"
        cameras = [
            {"name": "a", "source": str(tmp_path / "a.avi"), "save_overlays": True},
            {"name": "b", "source": str(tmp_path / "b.avi"), "threshold": 1e9},
            {"name": "up", "source": up.url},
            {"name": "side", "source": side.url},
        ]
        line_file.write_text(json.dumps({"name": "line3", "cameras": cameras}))
        out = tmp_path / "out"
        args = ["--model", model_path, "--line", line_file, "--out", out, "--serve", "127.0.0.1:0", "--timeout", "1",
                "--sink", f"webhook:{hook.url}"]  # fmt: skip
        with ServedRun(*args, "--max-batch", "4", "--max-wait-ms", "20", "--serve-linger", "0") as run:
            status = _wait(run, lambda s: _cam(s, "up")["counts"].get("images", 0) > 30, "camera up back after its cut")
            assert {c["name"] for c in status["cameras"]} == {"a", "b", "up", "side"}
            code, added = post(run.url + "api/cameras", {"name": "late", "source": extra.url})
            assert code == 200, added
            code, again = post(run.url + "api/cameras", {"name": "late", "source": extra.url})
            assert code == 409 and "already on the line" in again["error"]
            code, bad = post(run.url + "api/cameras", {"name": "x", "source": extra.url, "fps": 5})
            assert code == 409 and "camera 'x' has an unknown key 'fps'" in bad["error"]
            assert get(run.url + "api/cameras/side/remove", method="POST")[0] == 403  # control needs X-ADTR-Token
            code, removed = post(run.url + "api/cameras/side/remove")
            assert code == 200, removed
            _wait(run, lambda s: _cam(s, "late")["counts"].get("images", 0) >= 5, "the added camera records")
            saved = json.loads(line_file.read_text())  # the line file keeps the change for a restart
            assert [c["name"] for c in saved["cameras"]] == ["a", "b", "up", "late"]
            assert saved["cameras"][1]["threshold"] == 1e9 and saved["cameras"][0]["save_overlays"] is True
            # the page grid, one camera's own page and its status, labelled metrics
            assert b"line.js" in get(run.url)[2]
            assert b"app.js" in get(run.url + "cam/up/")[2]
            up_status = get_json(run.url + "cam/up/api/status")[1]
            assert up_status["camera"]["name"] == "up" and up_status["drift"]["window"] == 100  # its own drift monitor
            code, ready = get_json(run.url + "cam/up/readyz")
            assert code == 200 and ready["camera"] == "up" and ready["ready"]
            assert get(run.url + "cam/nosuch/readyz")[0] == 404
            # each camera's MJPEG stream: two frames of camera "up", as a dashboard or VLC gets them
            from tests.test_serve import connect, read_mjpeg_part

            with connect(run.url) as sock:
                sock.sendall(b"GET /cam/up/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                stream = sock.makefile("rb")
                assert b"200" in stream.readline()
                frames = [read_mjpeg_part(stream) for _ in range(2)]
                assert all(f.startswith(b"\xff\xd8") for f in frames)
            metrics = get(run.url + "metrics")[2].decode()
            assert 'adtr_images_total{camera="up"}' in metrics and 'adtr_line_state{camera="late"' in metrics
            _wait(run, lambda s: _cam(s, "a")["line"]["state"] == "FINISHED", "video a finished")
        assert run.proc.returncode == 0, run.log
        anomalies = {m["camera"] for m in hook.messages if m["event"] == "anomaly"}  # sink messages name the camera
        assert "up" in anomalies and "b" not in anomalies and all(m["line"] == "line3" for m in hook.messages)
        overlays = [m["overlay_path"] for m in hook.messages if m["camera"] == "a" and m["event"] == "anomaly"]
        assert overlays and all(Path(p).is_file() and out / "a" / "overlays" in Path(p).parents for p in overlays)

    summary = json.loads((out / "line-summary.json").read_text())
    assert summary["states"]["side"] == "removed" and summary["cameras"]["side"]["stopped"] == "removed"
    assert summary["states"]["a"] == summary["states"]["b"] == "finished"
    assert summary["batching"]["default"]["images"] > summary["batching"]["default"]["batches"]  # batches of several

    for name, n in (("a", 12), ("b", 8)):  # every frame of each video exactly once, in order
        recs = camera_records(out, name)
        assert [r["frame"] for r in recs] == list(range(n)) and {r["camera"] for r in recs} == {name}
    assert not any(r["is_anomaly"] for r in camera_records(out, "b"))  # its own threshold
    for name in ("up", "side", "late"):  # live: order kept, each camera's records its own, summary equals records
        recs = camera_records(out, name)
        frames = [r["frame"] for r in recs]
        assert recs and frames == sorted(set(frames)) and {r["camera"] for r in recs} == {name}
        cam_summary = json.loads((out / name / "summary.json").read_text())
        assert cam_summary["images"] == len(recs) and not cam_summary["running"]
    gaps = [r["gap"] for r in camera_records(out, "up") if "gap" in r]
    assert gaps and gaps[0]["end"] is not None  # the cut is recorded on the first frame after it
    everything = Counter(r["camera"] for r in outdir.read_records(out))  # the readers understand the layout
    assert set(everything) == {"a", "b", "up", "side", "late"}


def _cam(status: dict, name: str) -> dict:
    return next((c for c in status["cameras"] if c["name"] == name), {"counts": {}, "line": {}})


def _wait(run: ServedRun, predicate, what: str, timeout: float = 120) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = get_json(run.url + "api/status")[1]
        if predicate(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s; last status: {status}\n{run.log}")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            {"cameras": [{"name": "top", "source": "x.avi", "treshold": 1}]},
            "camera 'top' has an unknown key 'treshold'",
        ),
        ({"cameras": [{"name": "top", "source": "V"}, {"name": "top", "source": "V"}]}, "'top' is given twice"),
        ({"cameras": [{"name": "top", "source": "/no/such/file.avi"}]}, "camera 'top': --source /no/such/file.avi"),
        ({"cameras": [{"name": "top", "source": "http://127.0.0.1:9/none.mjpg"}]}, "camera 'top': cannot open"),
        ({"cameras": [{"name": "spool", "source": "V"}]}, "camera name 'spool' cannot be used"),
        ({"cams": []}, "unknown key 'cams'"),
    ],
)
def test_a_bad_line_file_is_refused_at_start_in_one_sentence_naming_the_camera(model_path, tmp_path, line, expected):
    write_video(tmp_path / "v.avi", 2)
    text = json.dumps(line).replace('"V"', json.dumps(str(tmp_path / "v.avi")))
    (tmp_path / "line.json").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--model", str(model_path), "--line", str(tmp_path / "line.json"),
                                          "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "cameras.json").exists()


@pytest.mark.parametrize("streams", [1, 2])  # with 2 inference streams, 2 batches run at once
def test_the_batcher_runs_cameras_together_and_gives_each_its_own_rows(model_path, streams):
    backend = open_model(model_path, "cpu", threads=streams, streams=streams)
    batcher = Batcher(backend, max_batch=4, max_wait_ms=50)
    assert batcher.workers == streams
    images = texture_images(4, rf.INPUT_SIZE, seed=9)
    expected = [backend.run(images[i : i + 1]) for i in range(4)]
    results: dict[int, list] = {i: [] for i in range(4)}

    def camera(i: int) -> None:
        client = batcher.client(f"cam{i}")
        for _ in range(6):
            results[i].append(client.run(images[i : i + 1]))

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batcher.close()
    backend.close()
    for i in range(4):
        assert len(results[i]) == 6
        for amap, score in results[i]:
            np.testing.assert_allclose(score, expected[i][1], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(amap, expected[i][0], rtol=1e-3, atol=1e-3)
    stats = batcher.stats()
    assert stats["images"] == 24 and stats["batches"] < 24  # some calls held frames of several cameras


def test_a_silent_camera_does_not_hold_the_others_beyond_the_wait_bound(model_path):
    backend = open_model(model_path, "cpu", threads=1)
    batcher = Batcher(backend, max_batch=8, max_wait_ms=300)
    image = texture_images(1, rf.INPUT_SIZE, seed=2)
    dead, alive = batcher.client("dead"), batcher.client("alive")
    t0 = time.perf_counter()
    dead.run(image)  # alone: it went at once (no camera was expected)
    alive.run(image)  # "dead" was just answered, so it is expected back: "alive" waits for it, but at most the bound
    waited = time.perf_counter() - t0
    time.sleep(1.2)  # "dead" has been silent for longer than the bound: nobody waits for it any more
    t1 = time.perf_counter()
    for _ in range(3):
        alive.run(image)
    quick = (time.perf_counter() - t1) / 3
    batcher.close()
    backend.close()
    assert waited >= 0.25  # it did wait for the other camera (its next frame could have joined) ...
    assert quick < waited / 2  # ... and no longer once that camera fell silent (nor for itself)


def test_python_api_one_inferencer_many_sources_and_a_restart_keeps_the_line(model_path, tmp_path):
    from adtr_deploy.runtime import Inferencer
    from adtr_deploy.runtime.linefile import load_line, save_line

    write_video(tmp_path / "a.avi", 6)
    write_video(tmp_path / "b.avi", 4)
    other = rf.copy_model(tmp_path / "station2")  # a second model: its own batcher, loaded once
    out = tmp_path / "out"
    with Inferencer(model_path) as inf:
        cameras = [{"name": "a", "source": str(tmp_path / "a.avi")},
                   {"name": "b", "source": str(tmp_path / "b.avi"), "model": str(other)}]  # fmt: skip
        line = Line(inf, cameras, out, max_batch=4)
        summary = line.run()
        assert summary["states"] == {"a": "finished", "b": "finished"}
        assert set(summary["batching"]) == {"default", str(other)}
        # a restart from the line as saved (here through a YAML line file) runs the same cameras into the same folders
        _, saved = load_line(out / "cameras.json")
        save_line(tmp_path / "line.yaml", "line3", saved)
        name, again_cameras = load_line(tmp_path / "line.yaml")
        assert name == "line3" and again_cameras == saved
        again = Line(inf, again_cameras, out, RunOptions(overwrite=True)).run()  # a video is run anew
        assert again["cameras"]["a"]["images"] == 6
    assert Counter(r["camera"] for r in outdir.read_records(out)) == {"a": 6, "b": 4}


def test_a_camera_added_while_its_source_is_down_is_recorded_and_retried_while_the_others_go_on(model_path, tmp_path):
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as steady,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as late,
    ):
        late.down_until = time.time() + 3.0  # it answers 503 for 3 s: the first opening fails
        line = Line(model_path, {"steady": steady.url}, tmp_path / "out", RunOptions(), timeout_s=1.0)
        runner = threading.Thread(target=line.run, daemon=True)
        runner.start()
        try:
            _until(lambda: line.cameras.get("steady") and line.cameras["steady"].state == "running", "steady runs")
            camera = line.add({"name": "late", "source": late.url})
            _until(lambda: camera.state == "retrying", "the failure recorded")
            assert camera.failures >= 1 and "503" in camera.error
            before = line.cameras["steady"].pipeline.counts["images"]
            _until(lambda: camera.pipeline is not None and camera.pipeline.counts["images"] >= 3, "late records")
            assert line.cameras["steady"].pipeline.counts["images"] > before  # the others went on meanwhile
        finally:
            line.stop()
            runner.join(60)
    recs = camera_records(tmp_path / "out", "late")
    assert recs and [r["frame"] for r in recs] == sorted({r["frame"] for r in recs})


def test_resume_of_a_line_refuses_another_source_or_a_video_at_start_naming_the_camera(model_path, tmp_path):
    write_video(tmp_path / "v.avi", 3)
    out = tmp_path / "out"
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as one,
        rf.MjpegServer([("stream", 10, "close")]) as two,
    ):
        Line(model_path, {"top": one.url}, out).run(duration=1.5)
        with pytest.raises(UserError, match=r"camera 'top': --resume: .* holds results of another source"):
            Line(model_path, {"top": two.url}, out, RunOptions(resume=True)).start()
    with pytest.raises(UserError, match=r"camera 'v': --resume continues image files and live sources"):
        Line(model_path, {"v": str(tmp_path / "v.avi")}, out, RunOptions(resume=True)).start()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["top"]  # nothing written by the refusals


def _until(predicate, what: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _warm_tiles(run: ServedRun, names: list[str]) -> dict:
    """Ask each camera for its frame (a viewer makes frames be drawn) until every tile has one."""

    def drawn(status: dict) -> bool:
        for name in names:
            get(run.url + f"cam/{name}/frame.jpg")
        return all(_cam(status, n).get("frame_seq", 0) >= 1 for n in names)

    return _wait(run, drawn, "a drawn frame on every tile")


def test_a_browser_shows_the_grid_with_each_cameras_state_and_frame(model_path, tmp_path):
    from tests.test_serve_browser import CHROMIUM, chromium

    if CHROMIUM is None:
        pytest.skip("no headless browser: install the Debian package chromium (apt-get install chromium)")
    write_video(tmp_path / "v.avi", 400, fps=25.0)
    with rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as cam:
        args = ["--model", model_path, "--source", f"top={cam.url}", "--source", f"side={tmp_path / 'v.avi'}"]
        with ServedRun(*args, "--out", tmp_path / "out", "--serve", "127.0.0.1:0", "--serve-linger", "0") as run:
            status = _warm_tiles(run, ["top", "side"])
            dom = chromium(run.url, tmp_path / "profile", "--dump-dom")
            single = chromium(run.url + "cam/top/", tmp_path / "profile", "--dump-dom")
    for tile in status["cameras"]:
        assert f">{tile['name']}<" in dom and f'alt="latest frame of {tile["name"]}" src="blob:' in dom
    states = {t["line"]["state"] for t in status["cameras"]}
    assert any(f'class="line-state">{s}<' in dom for s in states)
    assert 'id="frame"' in single and 'src="blob:' in single  # the camera's own page under /cam/top/ shows frames


def _docs_screenshot(target: Path) -> None:
    """The docs picture of the grid: four cameras, one of them paused."""
    import shutil
    import tempfile

    from tests.test_serve_browser import screenshot

    work = Path(tempfile.mkdtemp(prefix="adtr-line-shot-"))
    try:
        write_video(work / "station1.avi", 3000, fps=25.0, size=(360, 480))
        write_video(work / "station2.avi", 3000, fps=25.0, size=(360, 480))
        with (
            rf.MjpegServer([("stream", 100000, "close")]) as top,
            rf.MjpegServer([("stream", 100000, "close")]) as side,
        ):
            sources = {
                "top": top.url,
                "side": side.url,
                "station1": work / "station1.avi",
                "station2": work / "station2.avi",
            }
            args = [a for name, src in sources.items() for a in ("--source", f"{name}={src}")]
            with ServedRun("--model", rf.onnx_model(), *args, "--out", work / "out", "--serve", "127.0.0.1:0") as run:
                _warm_tiles(run, list(sources))
                post(run.url + "api/cameras/station2/pause")
                time.sleep(1.5)
                screenshot(run.url, target, work / "profile")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_several_unnamed_sources_are_cam1_cam2_and_the_terminal_gets_a_line_per_camera(model_path, tmp_path):
    write_video(tmp_path / "v1.avi", 5)
    write_video(tmp_path / "v2.avi", 3)
    out = tmp_path / "out"
    args = ["--model", model_path, "--source", tmp_path / "v1.avi", "--source", tmp_path / "v2.avi", "--out", out]
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "cam1: 5 images" in result.output and "cam2: 3 images" in result.output
    assert Counter(r["camera"] for r in outdir.read_records(out)) == {"cam1": 5, "cam2": 3}
    again = CliRunner().invoke(command, [str(a) for a in args])  # the same folder again: refused, as for one camera
    assert again.exit_code == 1 and "already holds the results of an earlier line" in again.output


def test_a_line_killed_with_sigkill_is_recounted_per_camera_by_the_next_start_with_resume(model_path, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    run = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", "--model", str(model_path)]
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as top,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as side,
    ):
        cams = ["--source", f"top={top.url}", "--source", f"side={side.url}", "--out", str(out), "--resume", "-q"]
        first = subprocess.Popen(run + cams, stderr=subprocess.PIPE, text=True)
        _until(lambda: all(len(camera_records(out, n)) >= 5 for n in ("top", "side")), "records of both cameras")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed = {n: len(camera_records(out, n)) for n in ("top", "side")}
        second = subprocess.run(run + cams + ["--duration", "2"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
    for name in ("top", "side"):
        history = [json.loads(line) for line in (out / name / "runs.jsonl").read_text().splitlines()]
        assert [h["stopped"] for h in history] == ["killed", "duration"] and history[0]["recounted"]
        assert history[0]["images"] >= killed[name] - 1  # the recount: every whole record the killed start wrote
        records = camera_records(out, name)
        assert len(records) == history[0]["images"] + history[1]["images"]  # nothing lost, nothing counted twice


def test_a_dead_camera_is_no_signal_on_its_own_tile_and_metrics_while_the_others_inspect(model_path, tmp_path):
    ready = ("OK", "ALARM", "DRIFT")
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as steady,
        rf.MjpegServer([("stream", 15, "cut"), ("stream", 100000, "close")], interval_s=0.04, down_s=5.0) as flaky,
    ):
        args = ["--model", model_path, "--source", f"steady={steady.url}", "--source", f"flaky={flaky.url}"]
        with ServedRun(*args, "--out", tmp_path / "out", "--serve", "127.0.0.1:0", "--timeout", "1") as run:
            down = _wait(run, lambda s: _cam(s, "flaky")["line"].get("state") == "NO SIGNAL", "flaky is NO SIGNAL")
            assert _cam(down, "steady")["line"]["state"] in ready
            metrics = get(run.url + "metrics")[2].decode()
            assert 'adtr_source_up{camera="flaky"} 0.0' in metrics and 'adtr_source_up{camera="steady"} 1.0' in metrics
            assert get(run.url + "cam/flaky/readyz")[0] == 503 and get(run.url + "cam/steady/readyz")[0] == 200
            assert get(run.url + "readyz")[0] == 200  # the line inspects while one camera does
            _wait(run, lambda s: _cam(s, "flaky")["line"].get("state") in ready, "flaky back")


def test_recalibrating_from_one_camera_applies_to_every_camera_of_that_model(tmp_path):
    model = rf.copy_model(tmp_path / "export")  # its model.json gets rewritten
    before = json.loads(model.with_name("model.json").read_text())["calibration"]["threshold"]
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.03) as top,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.03) as side,
    ):
        args = ["--model", model, "--source", f"top={top.url}", "--source", f"side={side.url}", "--drift-window", "20"]
        with ServedRun(*args, "--out", tmp_path / "out", "--serve", "127.0.0.1:0") as run:
            _wait(run, lambda s: _cam(s, "top")["counts"].get("ok", 0) >= 25, "25 good frames of top")
            code, result = post(
                run.url + "cam/top/api/recalibrate", {"frames": 20, "by": "J. Doe", "allow_flagged": True}
            )
            assert code == 200, result
            assert result["camera"] == "top" and sorted(result["applied_to"]) == ["side", "top"]
            new = result["calibration"]["threshold"]
            written = json.loads(model.with_name("model.json").read_text())
            assert written["calibration"]["threshold"] == new != before
            assert written["extra"]["calibration_record"]["by"] == "J. Doe"
            for name in ("top", "side"):  # both cameras judge by it now
                status = get_json(run.url + f"cam/{name}/api/status")[1]
                assert status["model"]["threshold"] == new
                assert status["drift"]["calibration"]["threshold"] == new
            code, refused = post(run.url + "cam/top/api/recalibrate", {"frames": 20, "camera": "x"})
            assert code == 409 and "unknown field 'camera'" in refused["error"]


def test_a_camera_that_fails_is_named_in_the_exit_status_and_the_others_complete(model_path, tmp_path):
    import resource
    import subprocess
    import sys

    write_video(tmp_path / "long.avi", 120)  # about 40 KB of records: past the file-size limit below
    write_video(tmp_path / "short.avi", 4)
    out, limit = tmp_path / "out", 20_000

    def limited():  # the kernel refuses writes beyond `limit` bytes per file, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cams = ["--source", f"long={tmp_path / 'long.avi'}", "--source", f"short={tmp_path / 'short.avi'}"]
    cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()", "--model", str(model_path)]
    res = subprocess.run(cmd + cams + ["--out", str(out), "-q"], capture_output=True, text=True, timeout=300,
                         preexec_fn=limited)  # fmt: skip
    assert res.returncode == 1 and "Error: camera 'long' failed (the disk holding" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert [r["frame"] for r in camera_records(out, "short")] == [0, 1, 2, 3]
    long = camera_records(out, "long")
    assert long and json.loads((out / "long" / "summary.json").read_text())["images"] == len(long)


def test_a_slow_camera_never_holds_a_fast_one(model_path, tmp_path):
    """The issue's bound: a frame waits at most --max-wait-ms for others; a camera sending a frame every 2 s must not
    make the other camera's frames wait for it (they would be ~2000 ms late)."""
    with (
        rf.MjpegServer([("stream", 100000, "close")], interval_s=0.04) as fast,
        rf.MjpegServer([("stream", 100000, "close")], interval_s=2.0) as slow,
    ):
        line = Line(model_path, {"fast": fast.url, "slow": slow.url}, tmp_path / "out", max_batch=8, max_wait_ms=10)
        line.run(duration=5)
    latencies = [r["latency_ms"] for r in camera_records(tmp_path / "out", "fast") if r["status"] == "ok"]
    assert len(latencies) > 20 and len(camera_records(tmp_path / "out", "slow")) >= 2
    assert float(np.percentile(latencies, 99)) < 1000  # far below the slow camera's 2000 ms between frames


if __name__ == "__main__":
    import sys

    _docs_screenshot(Path(sys.argv[1]))
