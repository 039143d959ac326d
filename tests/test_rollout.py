"""Rollout without stopping the line (runtime/rollout.py): a run over a versioned model folder takes a new version
between two batches with every frame recorded once, rolls back by API, refuses a broken version, and a restart with
--resume continues on the active version. Real tiny ONNX exports, real files, a real MJPEG camera, real HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import pytest

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.modelrepo import ModelRepo
from adtr_deploy.runtime.outdir import read_records, read_summary
from tests.conftest import export_tiny_onnx, texture_images
from tests.serve_helpers import Camera, ServedRun, get, get_json
from tests.test_runtime import poisoned_torch_env

pytest.importorskip("onnxruntime")
TOKEN = {"X-ADTR-Token": "-"}  # no token set: any value passes, but the header must be there


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[list[Path]]:
    """Three tiny exports with different weights (so different sha256): the files of versions to publish."""
    root = tmp_path_factory.mktemp("exports")
    out = []
    for seed in (1, 2, 3):
        folder = root / f"seed{seed}"
        folder.mkdir()
        onnx = export_tiny_onnx(folder, seed=seed)
        out.append([onnx, onnx.with_name("model.json")])
    return out


@pytest.fixture(scope="module")
def slow_exports(tmp_path_factory) -> list[list[Path]]:
    """Two tiny exports at 256 x 256: slow enough that a batch is still on its inference stream when the switch comes."""
    root = tmp_path_factory.mktemp("slow")
    out = []
    for seed in (1, 2):
        folder = root / f"seed{seed}"
        folder.mkdir()
        onnx = export_tiny_onnx(folder, seed=seed, size=256)
        out.append([onnx, onnx.with_name("model.json")])
    return out


def broken_export(folder: Path, exports) -> list[Path]:
    """A version whose model.onnx is not a model (a copy cut short), with a proper model.json."""
    folder.mkdir()
    data = exports[0][0].read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])
    (folder / "model.json").write_bytes(exports[0][1].read_bytes())
    return [folder / "model.onnx", folder / "model.json"]


def post(url: str, body: dict | None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(
        url, method="POST", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait(predicate, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")


def test_a_new_version_is_switched_in_between_batches_with_every_image_recorded_once_in_order(slow_exports, tmp_path):
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
    from adtr_deploy.runtime.rollout import Rollout
    from adtr_deploy.runtime.sources import open_source

    images = tmp_path / "images"
    images.mkdir()
    n = 200
    for i, img in enumerate(texture_images(n, 256, seed=5)):  # decoding takes a while: batches are in flight meanwhile
        cv2.imwrite(str(images / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    repo = ModelRepo(tmp_path / "models" / "brick")
    repo.publish(slow_exports[0], {"by": "test"})
    opened = []

    def opener(folder):
        opened.append(open_model(folder, "cpu", streams=2))  # two inference streams: batches in flight at a switch
        return opened[-1]

    rollout = Rollout(repo, opener, poll_s=0.05, log=lambda msg: None)
    backend = rollout.open_first()

    def on_record(record, counts):
        if counts["images"] == 20:  # published while the run goes on: the switch comes whenever the watcher is ready
            repo.publish(slow_exports[1], {"by": "test"})
        if counts["images"] == n - 20:  # a slow machine: hold the run until the switch, so some images are left
            wait(lambda: rollout.version == 2, 60, "version 2 running")

    options = RunOptions(workers=2, keep_frames="flagged", review_sample=1.0)  # every frame kept, for the review
    pipeline = Pipeline(backend, open_source(str(images)), tmp_path / "out", options, on_record=on_record)
    rollout.attach(pipeline)
    rollout.start()
    try:
        summary = pipeline.run()
    finally:
        rollout.close()
        pipeline.backend.close()
    records = list(read_records(tmp_path / "out"))
    # every image once, in order: frames in == records out
    assert [Path(r["source"]).name for r in records] == sorted(p.name for p in images.iterdir())
    versions = [r["model_version"] for r in records]
    first_v2 = versions.index(2)
    assert first_v2 >= 20 and versions == [1] * first_v2 + [2] * (n - first_v2), versions
    shas = {r["model_version"]: r["model_sha256"] for r in records}
    assert len(set(shas.values())) == 2
    # each record was scored by the version it names (batches in flight at the switch finished on the old model)
    from adtr_deploy.preprocess import read_image, resize

    for version in (1, 2):
        check = open_model(repo.folder(version), "cpu")
        try:
            for r in records:
                score = float(check.run(resize(read_image(r["source"]), check.spec.input_size)[None])[1][0])
                same = abs(score - r["score"]) <= 1e-5 * max(1.0, abs(score))  # batch 1 both ways
                assert same == (r["model_version"] == version), (version, score, r)
        finally:
            check.close()
    assert summary["images"] == n and summary["model_version"] == 2 and summary["model_repo"] == rollout.repo_id
    assert rollout.last_swap["from"] == 1 and rollout.last_swap["to"] == 2 and rollout.swaps == 1

    # the review keeps each version's labels apart (OUT/review/v1, v2): no refusal for "another model" after a rollout
    from adtr_deploy.runtime.review import Review, review_id

    review = Review(tmp_path / "out")
    first, last = review_id(records[0]), review_id(records[-1])
    assert review.label(first, "good", "tester")["model_version"] == 1
    assert review.label(last, "defect", "tester")["model_version"] == 2
    assert (review.dir / "v1" / "review.jsonl").is_file() and (review.dir / "v2" / "review.jsonl").is_file()
    labelled = {item["id"]: item["label"] for item in review.listing(n) if item["label"]}
    assert labelled == {first: "good", last: "defect"}


def test_rollout_in_a_served_run_rollback_broken_version_and_restart(exports, tmp_path):
    from tests.test_serve_browser import CHROMIUM, _Dom, chromium  # needs the serve extra, as this test does

    repo = ModelRepo(tmp_path / "models" / "brick")
    repo.publish(exports[0], {"by": "test"})
    out = tmp_path / "out"
    env = poisoned_torch_env(tmp_path)

    def served(camera):
        return ServedRun(
            "--model", repo.path, "--source", camera.url, "--out", out, "--serve", "127.0.0.1:0", "--timeout", "2",
            "--model-poll", "0.2", "--resume", env=env,
        )  # fmt: skip

    def model(run) -> dict:
        return get_json(run.url + "api/model")[1]

    def images(run) -> int:
        return run.status()["counts"]["images"]

    with Camera(interval_s=0.05) as camera:
        with served(camera) as run:
            run.wait_for(lambda s: s["counts"]["images"] >= 5, what="records of version 1")
            m = model(run)
            assert m["versioned"] and m["version"] == 1 and m["versions"] == [1] and m["last_swap"] is None
            assert run.status()["model"]["version"] == 1  # what the page shows

            repo.publish(exports[1], {"by": "test"})  # while it runs
            wait(lambda: model(run)["version"] == 2, 60, "version 2 running")
            seen = images(run)
            run.wait_for(lambda s: s["counts"]["images"] >= seen + 5, what="records of version 2")
            m = model(run)
            assert m["last_swap"]["from"] == 1 and m["last_swap"]["to"] == 2 and m["swaps"] == 1
            _, _, body = get(run.url + "metrics")
            assert b"adtr_model_version 2.0" in body and b"adtr_model_swaps_total 1.0" in body

            # rollback: control, so the token header is needed; v2 is revoked with who and why
            assert post(run.url + "api/model/rollback", {})[0] == 403
            code, answer = post(run.url + "api/model/rollback", {"by": "tester", "why": "false alarms"}, TOKEN)
            assert code == 200, answer
            assert answer["model"]["version"] == 1 and answer["swap"]["revoked"]["version"] == 2
            assert repo.revoked(2)["by"] == "tester" and repo.revoked(2)["why"] == "false alarms"
            code, answer = post(run.url + "api/model/rollback", {}, TOKEN)
            assert code == 409 and "no version below 1" in answer["error"]
            seen = images(run)
            run.wait_for(lambda s: s["counts"]["images"] >= seen + 5, what="records of version 1 again")

            # forward again: activate 2 (its mark removed), then roll back once more
            code, answer = post(run.url + "api/model/activate", {"version": 7}, TOKEN)
            assert code == 409 and "no version 7" in answer["error"]
            code, answer = post(run.url + "api/model/activate", {"version": 2, "by": "tester"}, TOKEN)
            assert code == 200 and answer["model"]["version"] == 2 and repo.revoked(2) is None, answer
            seen = images(run)
            run.wait_for(lambda s: s["counts"]["images"] >= seen + 5, what="records of version 2 again")
            code, answer = post(run.url + "api/model/activate", {"version": 1}, TOKEN)
            assert code == 409 and "live versions [2] lie above it" in answer["error"]
            assert post(run.url + "api/model/rollback", {"by": "tester", "why": "again"}, TOKEN)[0] == 200
            assert model(run)["version"] == 1 and repo.revoked(2)["why"] == "again"
            seen = images(run)
            run.wait_for(lambda s: s["counts"]["images"] >= seen + 5, what="records of version 1, third time")

            # a broken version 3 is refused with its sentence; version 1 keeps running
            broken = broken_export(tmp_path / "broken", exports)
            repo.publish(broken, {"by": "test"})
            m = wait(lambda: (lambda m: m if "3" in m["refused"] else None)(model(run)), 60, "version 3 refused")
            assert m["version"] == 1 and "cannot be opened" in m["refused"]["3"]["reason"]
            assert run.status()["rollout"]["refused"]["3"]["reason"] == m["refused"]["3"]["reason"]  # the page's
            if CHROMIUM is not None:  # the page itself, in a real browser: the version, the swap, the refusal
                dom = _Dom()
                dom.feed(chromium(run.url, tmp_path / "profile", "--dump-dom"))
                shown = dom.text["model"]
                assert "version1" in shown and "v2 → v1" in shown and "refused v3it cannot be opened" in shown, shown
            seen = images(run)
            run.wait_for(lambda s: s["counts"]["images"] >= seen + 5, what="records after the refusal")
            assert "version 3 refused" in run.log
        first = read_summary(out)
        records = list(read_records(out))
        frames = [r["frame"] for r in records]
        assert frames == sorted(set(frames))  # each frame once, in order
        # frames in == records out: every frame the camera delivered is recorded or counted as dropped by the source
        assert len(records) + first["dropped_frames"] == frames[-1] - frames[0] + 1
        versions = [r["model_version"] for r in records]
        changes = [(a, b) for a, b in zip(versions, versions[1:], strict=False) if a != b]
        assert changes == [(1, 2), (2, 1), (1, 2), (2, 1)] and first["model_version"] == 1

        # a restart with --resume continues the folder on the active version: here v4, published while it was down
        repo.publish(exports[2], {"by": "test"})
        with served(camera) as run:
            run.wait_for(lambda s: s["counts"]["images"] >= 5, what="records after the restart")
            m = model(run)
            assert m["version"] == 4 and m["revoked"]["2"]["by"] == "tester"
        later = [
            r for r in read_records(out) if r["run"] != first["run"] and r["run"] not in {x["run"] for x in records}
        ]
        assert later and {r["model_version"] for r in later} == {4}
        assert read_summary(out)["model_version"] == 4


def test_a_versioned_folder_is_refused_with_several_cameras(exports, tmp_path):
    from click.testing import CliRunner

    from adtr_deploy.cli.run import command

    repo = ModelRepo(tmp_path / "models" / "brick")
    repo.publish(exports[0], {"by": "test"})
    result = CliRunner().invoke(
        command, ["--model", str(repo.path), "--source", "a=0", "--source", "b=1", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "is a versioned model folder" in result.output


def test_a_plain_model_path_records_no_version_and_has_nothing_to_roll_back(exports, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(texture_images(3, 64, seed=6)):
        cv2.imwrite(str(images / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with ServedRun(
        "--model", exports[0][0], "--source", images, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        run.wait_for(lambda s: s["counts"]["images"] == 3, what="the three images")
        assert get_json(run.url + "api/model")[1]["versioned"] is False
        code, answer = post(run.url + "api/model/rollback", {}, TOKEN)
        assert code == 409 and "plain path" in answer["error"]
    assert {r["model_version"] for r in read_records(tmp_path / "out")} == {None}


def test_an_active_version_that_cannot_run_is_refused_at_start_and_another_input_size_while_running(
    exports, slow_exports, tmp_path
):
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.pipeline import Pipeline
    from adtr_deploy.runtime.rollout import Rollout
    from adtr_deploy.runtime.sources import open_source

    repo = ModelRepo(tmp_path / "models" / "brick")
    repo.publish(exports[0], {"by": "test"})
    repo.publish(broken_export(tmp_path / "broken", exports), {"by": "test"})  # v2, the active one, cannot be opened
    notes = []
    rollout = Rollout(repo, lambda folder: open_model(folder, "cpu"), poll_s=60, log=notes.append)
    backend = rollout.open_first()
    assert rollout.version == 1 and list(rollout.refused) == [2] and "cannot be opened" in rollout.refused[2]["reason"]
    assert repo.revoked(2) is None  # refused, not revoked: withdrawing a version is a person's decision

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), texture_images(1, 64)[0])
    pipeline = Pipeline(backend, open_source(str(images)), tmp_path / "out")
    rollout.attach(pipeline)
    try:
        assert repo.publish(slow_exports[0], {"by": "test"}) == 3  # a 256 x 256 model for a run at 64 x 64
        assert rollout.take(3, why="published") is None
        assert rollout.version == 1 and "input size 256x256 differs" in rollout.refused[3]["reason"]
        assert pipeline.backend is backend and any("version 3 refused" in n for n in notes)
    finally:
        rollout.close()
        backend.close()
    with pytest.raises(UserError, match="no version below 1"):
        rollout.rollback("tester", "test")
