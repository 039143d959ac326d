"""The reliability corpus: bad input, interruptions and foreign files, each through the real CLI in a subprocess.

Runtime commands run in the torch-free install (`import torch` made to fail, see test_runtime.poisoned_torch_env), so
every case also proves the runtime never needs torch. One tiny exported ONNX model is built once (tests.runtime_fixtures)
and reused. Each case states what must hold; docs/runtime.md ("Reliability") lists the promises and points here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests import runtime_fixtures as rf
from tests.conftest import texture_images
from tests.test_runtime import poisoned_torch_env

ENTRY = "from adtr_deploy.cli.main import {0}_entry; {0}_entry()"
# The interpreter the commands run in. Point it at another install to run the corpus there, e.g. a Python 3.10 venv
# with numpy 1.24, opencv-python-headless, onnxruntime and click only (docs/runtime.md, "Reliability").
PYTHON = os.environ.get("ADTR_TEST_RUNTIME_PYTHON", sys.executable)


# --- helpers -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    e = poisoned_torch_env(tmp_path_factory.mktemp("env"))
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module")
def model() -> Path:
    return rf.onnx_model()


def cli(env: dict, command: str, *args, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`adtr-<command> args...` as its own process."""
    cmd = [PYTHON, "-c", ENTRY.format(command), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_sentence(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """A refused command: non-zero exit, one `Error:` line naming the problem, no traceback, nothing from torch."""
    err = res.stderr.strip()
    assert res.returncode != 0, res.stdout + err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "WARN" not in err, err  # no OpenCV/FFmpeg chatter beside the sentence
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int, h: int) -> bytes:
    """A small PNG whose header declares w x h pixels (the payload is a few compressed zero rows)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (w + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_jpeg(w: int, h: int) -> bytes:
    """A real JPEG with its SOF0 size fields rewritten to w x h."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def bomb_bmp(w: int, h: int) -> bytes:
    data = bytearray(cv2.imencode(".bmp", np.full((4, 4, 3), 128, np.uint8))[1].tobytes())
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def write(path: Path, data: bytes | np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, np.ndarray):
        assert cv2.imwrite(str(path), data)
    else:
        path.write_bytes(data)
    return path


# --- the folder corpus: one run over a folder of every kind of file a camera box collects ------------------------------

IMG = cv2.cvtColor(texture_images(1, 96, seed=21)[0], cv2.COLOR_RGB2BGR)
JPG = cv2.imencode(".jpg", IMG)[1].tobytes()
PNG = cv2.imencode(".png", IMG)[1].tobytes()

# name -> (how to make it, expected status, fragment of the error message)
CORPUS: dict[str, tuple] = {
    "empty.png": (b"", "error", "empty (0 bytes)"),
    "zero.jpg": (b"", "error", "empty (0 bytes)"),
    "truncated.png": (PNG[: len(PNG) // 2], "error", "not a readable image"),
    "truncated.jpg": (JPG[: len(JPG) // 2], "error", "truncated JPEG"),
    "header_only.jpg": (JPG[:200], "error", "truncated JPEG"),
    "bomb.png": (bomb_png(30000, 30000), "error", "declares 30000x30000 pixels"),
    "bomb.jpg": (bomb_jpeg(60000, 60000), "error", "declares 60000x60000 pixels"),
    "bomb.bmp": (bomb_bmp(40000, -40000), "error", "declares 40000x40000 pixels"),
    "random.png": (np.random.default_rng(0).bytes(3000), "error", "not a readable image"),
    "page.jpg": (b"<html><body>404 Not Found</body></html>", "error", "not a readable image"),
    "notes.txt": (b"camera 3, shift B", "error", "not an image file"),
    "Thumbs.db": (b"\0" * 64, "error", "not an image file"),
    "prüfung teil 1.png": (IMG, "ok", None),
    "UPPER.PNG": (IMG, "ok", None),
    "png_named.jpg": (PNG, "ok", None),
    "grey.png": (cv2.cvtColor(IMG, cv2.COLOR_BGR2GRAY), "ok", None),
    "deep16.png": (IMG.astype(np.uint16) * 257, "ok", None),
    "alpha.png": (cv2.cvtColor(IMG, cv2.COLOR_BGR2BGRA), "ok", None),
    "one_pixel.png": (IMG[:1, :1], "ok", None),
    "wide.jpg": (cv2.resize(IMG, (900, 30)), "ok", None),
    "hole/003.png": (IMG, "ok", None),
    "scratch/003.png": (cv2.flip(IMG, 0), "ok", None),
}


@pytest.fixture(scope="module")
def corpus_run(model, env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("camera box")  # a space in every path
    for name, (data, _, _) in CORPUS.items():
        write(folder / name, data)
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "link.png").symlink_to(folder / "UPPER.PNG")
    write(folder / ".hidden.png", b"")  # hidden files are not inputs (editors, sync tools)
    out = folder.parent / f"{folder.name} out"
    res = cli(env, "run", "--model", model, "--source", folder, "--out", out, "--batch-size", "3", "--save-overlays")
    return folder, out, res


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_gets_exactly_one_right_record(corpus_run, name):
    folder, out, res = corpus_run
    assert res.returncode == 0, res.stderr
    mine = [r for r in records(out) if r["source"] == str(folder / name)]
    assert len(mine) == 1
    _, status, message = CORPUS[name]
    assert mine[0]["status"] == status, mine[0]
    if status == "error":
        assert message in mine[0]["error"] and mine[0]["score"] is None
    else:
        assert np.isfinite(mine[0]["score"]) and (out / mine[0]["overlay"]).is_file()


def test_corpus_links_hidden_files_and_totals(corpus_run):
    """A dangling link gets an error record (it used to vanish); a link to an image is scored; hidden files are not
    inputs; the summary counts exactly the lines written; no OpenCV/FFmpeg chatter reaches the terminal."""
    folder, out, res = corpus_run
    recs = {Path(r["source"]).name: r for r in records(out)}
    assert "link to a file that does not exist" in recs["dangling.png"]["error"]
    assert recs["link.png"]["status"] == "ok" and ".hidden.png" not in recs
    assert len(records(out)) == len(CORPUS) + 2 == summary(out)["images"]
    s = summary(out)
    assert s["errors"] == sum(r["status"] == "error" for r in records(out)) and s["ok"] + s["errors"] == s["images"]
    assert "WARN" not in res.stderr and "libpng" not in res.stderr and "Traceback" not in res.stderr


def test_corpus_overlays_are_complete_and_the_demo_report_pairs_them_by_record(corpus_run):
    """Every overlay decodes whole, no temporary file is left, and the demo report's pairing uses each record's own
    overlay even where file names clash (hole/003.png, scratch/003.png)."""
    from adtr_deploy.cli.demo import _pick_overlays

    folder, out, _ = corpus_run
    files = [p for p in (out / "overlays").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")]
    assert len(files) == sum(r["status"] == "ok" for r in records(out))
    assert all(cv2.imread(str(p)) is not None for p in files)
    chosen = _pick_overlays(out / "results.jsonl", out / "overlays", 30)
    clash = {Path(r["source"]).parent.name: p for r, p in chosen if Path(r["source"]).name == "003.png"}
    assert set(clash) == {"hole", "scratch"}
    for r, p in chosen:
        assert p == out / r["overlay"]
        rel = Path(r["source"]).relative_to(folder)
        assert p.relative_to(out / "overlays").parent == rel.parent  # same folder as its own image


def test_max_pixels_option_refuses_large_images_and_files_as_records(model, env, tmp_path):
    """The limit is the user's: 96x96 images are refused at 1000 pixels; a file too large to be an image within the
    limit (a sparse 2 GB "image") is refused before it is read."""
    write(tmp_path / "in" / "a.png", IMG)
    with open(tmp_path / "in" / "huge.bmp", "wb") as fh:
        fh.truncate(2 << 30)  # sparse: no disk space used
    out = tmp_path / "out"
    res = cli(env, "run", "--model", model, "--source", tmp_path / "in", "--out", out, "--max-pixels", "1000")
    assert res.returncode == 0, res.stderr
    recs = {Path(r["source"]).name: r for r in records(out)}
    assert recs["a.png"]["status"] == "error" and "96x96 pixels" in recs["a.png"]["error"]
    assert "--max-pixels" in recs["a.png"]["error"] and "2147 MB" in recs["huge.bmp"]["error"]


def test_a_video_cut_short_gives_a_record_per_decodable_frame(model, env, tmp_path):
    """A video still being copied (cut in the middle): the frames that are there are scored, the run ends normally."""
    from tests.test_sources import write_video

    write_video(tmp_path / "full.avi", 12)
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    res = cli(env, "run", "--model", model, "--source", tmp_path / "cut.avi", "--out", out, "--batch-size", "4")
    assert res.returncode == 0 and "Traceback" not in res.stderr and "WARN" not in res.stderr, res.stderr
    recs = records(out)
    assert 1 <= len(recs) < 12 and summary(out)["images"] == len(recs)
    assert [r["frame"] for r in recs] == list(range(len(recs))) and all(r["status"] == "ok" for r in recs)


# --- refusals: one sentence, nothing touched ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rf.write_images(folder, 6, seed=8)
    return folder


REFUSALS = {
    "empty source": (["--source", ""], "--source is empty"),
    "missing source": (["--source", "{tmp}/nope"], "is not an existing file or folder"),
    "empty folder": (["--source", "{tmp}/emptydir"], "holds no files"),
    "glob matches nothing": (["--source", "{tmp}/*.png"], "matches no files"),
    "zero-byte video": (["--source", "{tmp}/empty.mp4"], "cannot be opened as a video"),
    "out is a file": (["--out", "{tmp}/file.txt"], "is a file, not a folder"),
    "overwrite and resume": (["--overwrite", "--resume"], "contradict"),
    "model missing, path kept as typed": (["--model", "exp_onnx/model.onnx"], "model file exp_onnx/model.onnx does"),
    "folder without a model": (["--model", "{tmp}/emptydir"], "holds no exported model"),
    "unknown model type": (["--model", "{tmp}/file.txt"], "unknown model type"),
    "resume a video": (["--source", "{tmp}/clip.avi", "--resume"], "--resume works for image files"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_with_one_sentence(case, model, env, images, tmp_path):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty.mp4").write_bytes(b"")
    from tests.test_sources import write_video

    write_video(tmp_path / "clip.avi", 3)
    args, fragment = REFUSALS[case]
    opts = {"--model": str(model), "--source": str(images), "--out": str(tmp_path / "out")}
    extra = []
    for i, a in enumerate(args):
        if a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            opts[a] = args[i + 1].format(tmp=tmp_path)
        elif a.startswith("--"):
            extra.append(a)
    argv = [x for kv in opts.items() for x in kv] + extra
    one_sentence(cli(env, "run", *argv, cwd=tmp_path), fragment)
    assert not (tmp_path / "out" / "results.jsonl").exists()


# --- foreign and tampered model files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_export(tmp_path_factory) -> Path:
    """A second export of the same architecture with other weights: its model.json is a plausible impostor. The export
    folder also holds a stale staging folder of a killed export, which the export must clean up."""
    import torch

    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.model.checkpoint import save_checkpoint

    work = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    ckpt = save_checkpoint(work / "checkpoint.pt", ADTR(get_preset("tiny")).eval(), calibration=rf.calibration())
    (work / "export" / ".export-onnx-999999999-abc").mkdir(parents=True)
    (work / "export" / ".export-onnx-999999999-abc" / "model.onnx").write_bytes(b"half")
    return Path(export_checkpoint(ckpt, "onnx", work / "export", verify=False, dynamo=False).path)


def test_export_removes_staging_left_by_a_killed_export(other_export):
    assert not list(other_export.parent.glob(".export-*"))


def _other_json(dest: Path, other: Path) -> None:
    shutil.copy(other.with_name("model.json"), dest / "model.json")  # same architecture, other weights


def _foreign_onnx(dest: Path, other: Path) -> None:
    shutil.copy(other, dest / "model.onnx")  # another model's graph beside our model.json


def _truncated_onnx(dest: Path, other: Path) -> None:
    data = (dest / "model.onnx").read_bytes()
    (dest / "model.onnx").write_bytes(data[: len(data) // 3])


def _not_json(dest: Path, other: Path) -> None:
    (dest / "model.json").write_text("{oops")


def _edit(change):
    def apply(dest: Path, other: Path) -> None:
        spec = json.loads((dest / "model.json").read_text())
        change(spec)
        (dest / "model.json").write_text(json.dumps(spec))

    return apply


MODEL_CASES = {
    "model.json of another model": (_other_json, "belongs to another model"),
    "onnx of another model": (_foreign_onnx, "belongs to another model"),
    "truncated model.onnx": (_truncated_onnx, "model.onnx"),
    "model.json not json": (_not_json, "not valid JSON"),
    "model.json input_size text": (_edit(lambda s: s.update(input_size="abc")), "malformed field"),
    "model.json threshold text": (_edit(lambda s: s["calibration"].update(threshold="high")), "calibration.threshold"),
    "model.json newer version": (_edit(lambda s: s.update(spec_version=99)), "upgrade adtr-deploy"),
    "recorded sha256 edited": (_edit(lambda s: s["extra"].update(sha256="0" * 64)), "another model file"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_foreign_or_tampered_model_is_refused(case, other_export, env, images, tmp_path):
    change, fragment = MODEL_CASES[case]
    path = rf.copy_model(tmp_path / "m")
    change(tmp_path / "m", other_export)
    res = cli(env, "run", "--model", path, "--source", images, "--out", tmp_path / "out")
    one_sentence(res, fragment)
    assert not (tmp_path / "out").exists()


def test_an_edited_threshold_is_still_honoured(model, env, images, tmp_path):
    """Binding model.json to its artifact must not stop a user tuning the threshold in it (documented)."""
    path = rf.copy_model(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    spec["calibration"]["threshold"] = 1e-9  # below every score
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))
    res = cli(env, "run", "--model", path, "--source", images, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert summary(tmp_path / "out")["threshold"] == 1e-9 and all(r["is_anomaly"] for r in records(tmp_path / "out"))


@pytest.mark.parametrize("where", ["file", "run folder"])
def test_training_checkpoint_given_to_adtr_run_says_how_to_export(where, model, env, images, tmp_path):
    run_dir = tmp_path / "runs" / "brick"
    run_dir.mkdir(parents=True)
    shutil.copy(model.parent.parent / "checkpoint.pt", run_dir / "checkpoint.pt")
    target = run_dir / "checkpoint.pt" if where == "file" else run_dir
    one_sentence(cli(env, "run", "--model", target, "--source", images, "--out", tmp_path / "o"), "adtr-export --model")


# --- nothing a user produced is destroyed; resume -----------------------------------------------------------------------


def test_a_second_run_never_empties_earlier_results(model, env, images, tmp_path):
    """The issue's case: a second run into the same --out whose source then fails to open used to empty results.jsonl."""
    out = tmp_path / "out"
    assert cli(env, "run", "--model", model, "--source", images, "--out", out, "-q").returncode == 0
    before = (out / "results.jsonl").read_bytes()
    one_sentence(cli(env, "run", "--model", model, "--source", tmp_path / "x.mp4", "--out", out), "already holds")
    one_sentence(cli(env, "run", "--model", model, "--source", images, "--out", out), "--resume", "--overwrite")
    (tmp_path / "x.mp4").write_bytes(b"")
    one_sentence(
        cli(env, "run", "--model", model, "--source", tmp_path / "x.mp4", "--out", out, "--overwrite"), "as a video"
    )
    assert (out / "results.jsonl").read_bytes() == before and len(before.splitlines()) == 6
    res = cli(env, "run", "--model", model, "--source", images, "--out", out, "--overwrite", "--max-frames", "2")
    assert res.returncode == 0 and len(records(out)) == 2


def test_resume_skips_recorded_inputs_and_repairs_a_torn_last_line(model, env, images, tmp_path):
    out = tmp_path / "out"
    assert cli(env, "run", "--model", model, "--source", images, "--out", out, "--max-frames", "4").returncode == 0
    first = records(out)
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"source": "half a rec')  # the process was killed mid-write
    res = cli(env, "run", "--model", model, "--source", images, "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    recs = records(out)  # every line parses again
    assert recs[:4] == first and len(recs) == 6 and len({r["source"] for r in recs}) == 6
    assert summary(out)["resumed_skipped"] == 4 and summary(out)["images"] == 2
    res = cli(env, "run", "--model", model, "--source", images, "--out", out, "--resume")
    assert res.returncode == 0 and len(records(out)) == 6  # nothing left to do


def test_resume_matches_inputs_however_the_source_path_is_typed(model, env, images, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(images, tmp_path / "imgs")
    first = cli(env, "run", "--model", model, "--source", "imgs", "--out", "out", "--max-frames", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # the same folder typed another way: absolute this time (relative records are relative to the working folder)
    res = cli(env, "run", "--model", model, "--source", tmp_path / "imgs", "--out", out, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resolved = [os.path.realpath(tmp_path / r["source"]) for r in records(out)]
    assert len(resolved) == 6 == len(set(resolved)) and summary(out)["resumed_skipped"] == 3


def test_list_file_entries_each_get_a_record(model, env, images, tmp_path):
    """A list file naming good images, a missing file, a folder and a dangling link (relative to the list)."""
    good = sorted(images.iterdir())[:2]
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "list.txt").write_text(
        "# shift B\n" + "".join(f"{p}\n" for p in good) + "missing.png\n\n" + f"{images}\n" + "dangling.png\n"
    )
    out = tmp_path / "out"
    res = cli(env, "run", "--model", model, "--source", tmp_path / "list.txt", "--out", out)
    assert res.returncode == 0, res.stderr
    status = [(Path(r["source"]).name, r["status"], r["error"] or "") for r in records(out)]
    assert [s[1] for s in status] == ["ok", "ok", "error", "error", "error"]
    assert "does not exist" in status[2][2] and "is a folder" in status[3][2] and "link" in status[4][2]


# --- interruptions ------------------------------------------------------------------------------------------------------


N_SLOW = 40


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    """40 inputs that take a while each (1000x1000 JPEG decode + resize): hard links of one file, distinct names."""
    folder = tmp_path_factory.mktemp("slow")
    big = cv2.resize(IMG, (1000, 1000))
    first = write(folder / "p000.jpg", big)
    for i in range(1, N_SLOW):
        os.link(first, folder / f"p{i:03d}.jpg")
    return folder


@pytest.mark.parametrize(
    "sig,batch",
    [(signal.SIGTERM, 4), (signal.SIGINT, 4), (signal.SIGTERM, 1), (signal.SIGKILL, 4)],
    ids=["SIGTERM-batch4", "SIGINT-batch4", "SIGTERM-batch1", "SIGKILL-batch4"],
)
def test_signal_mid_run_then_resume_gives_every_input_exactly_one_record(sig, batch, model, env, slow_folder, tmp_path):
    """SIGTERM/SIGINT: the summary counts exactly the lines written, overlays are whole; SIGKILL: no summary, but the
    records are whole lines. Either way --resume completes the run with each input recorded once."""
    out = tmp_path / "out"
    args = ["--model", model, "--source", slow_folder, "--out", out, "--batch-size", batch, "--save-overlays", "-q"]
    cmd = [PYTHON, "-c", ENTRY.format("run"), *map(str, args)]
    proc = rf.start_interruptible(cmd, env)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            if (out / "results.jsonl").exists() and len((out / "results.jsonl").read_bytes().splitlines()) >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1]
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = (out / "results.jsonl").read_bytes()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        s = summary(out)
        assert s["stopped"] == "interrupted" and s["signal"] == signal.Signals(sig).name
        assert s["images"] == len(written.splitlines()) < N_SLOW  # counted == written
        overlays = [p for p in (out / "overlays").iterdir()]
        assert not [p for p in overlays if p.name.startswith(".")]  # no half-written temporary left
        assert len(overlays) == s["ok"] and all(cv2.imread(str(p)) is not None for p in overlays)
    res = cli(env, "run", "--model", model, "--source", slow_folder, "--out", out, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    sources = [r["source"] for r in records(out)]
    assert len(sources) == N_SLOW == len(set(sources))


# --- the other commands in a runtime-only install ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,args,extra",
    [
        ("train", ["--data", "{tmp}", "--out", "{tmp}/run"], "adtr-deploy[train]"),
        ("export", ["--model", "{ckpt}", "--out", "{tmp}/exp"], "adtr-deploy[train]"),
        ("eval", ["--model", "{ckpt}", "--data", "{tmp}"], "adtr-deploy[train]"),
    ],
)
def test_torch_commands_in_a_runtime_only_install_name_the_extra(command, args, extra, model, env, tmp_path):
    ckpt = model.parent.parent / "checkpoint.pt"
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    one_sentence(cli(env, command, *argv), "needs PyTorch", extra)


def test_adtr_eval_of_an_exported_model_needs_no_torch(model, env, tmp_path):
    from tests.train_data import make_mvtec

    root = make_mvtec(tmp_path / "data", "tex", n_train=2, n_good=3, n_masked=3, n_unmasked=2)
    res = cli(env, "eval", "--model", model, "--data", root, "--category", "tex", "--out", tmp_path / "m.json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 8 and metrics["backend"] == "onnxruntime"
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["pixel_auroc"] is not None


# --- errors that are bugs keep their traceback ---------------------------------------------------------------------------


def test_only_user_errors_become_a_sentence():
    import click

    from adtr_deploy.cli.common import user_errors
    from adtr_deploy.errors import UserError

    @user_errors
    def user():
        raise UserError("exp_onnx/model.onnx is wrong; fix it")

    @user_errors
    def bug():
        raise ValueError("operands could not be broadcast together")  # e.g. from numpy or torch: a bug

    with pytest.raises(click.ClickException, match=r"^exp_onnx/model.onnx is wrong"):
        user()
    with pytest.raises(ValueError, match="broadcast"):
        bug()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file, so an unreadable file cannot be made here")
def test_unreadable_file_is_an_error_record(model, env, tmp_path):
    write(tmp_path / "in" / "a.png", IMG).chmod(0)
    out = tmp_path / "out"
    assert cli(env, "run", "--model", model, "--source", tmp_path / "in", "--out", out).returncode == 0
    assert "cannot be read" in records(out)[0]["error"]


# --- training resume honesty (needs torch; in-process) ------------------------------------------------------------------


def test_resume_applies_new_lr_and_epochs_and_survives_a_torn_log_line(tmp_path):
    """`--resume --lr/--epochs` used to keep the saved rate and schedule while the log recorded the new values; a torn
    last line in train_log.jsonl (a crash mid-write) used to break resume."""
    import torch
    from click.testing import CliRunner

    from adtr_deploy.cli.train import command as train_command
    from tests.train_data import make_mvtec

    root = make_mvtec(tmp_path / "data", "tex", n_train=12, n_good=2, n_masked=2, n_unmasked=1)
    out = tmp_path / "run"
    base = ["--data", root, "--category", "tex", "--out", out, "--preset", "tiny", "--batch-size", "4", "--quiet"]
    first = CliRunner().invoke(train_command, [*map(str, base), "--epochs", "1", "--lr", "1e-4", "--no-eval"])
    assert first.exit_code == 0, first.output
    with open(out / "train_log.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "lo')  # killed mid-write
    resumed = CliRunner().invoke(
        train_command, [*map(str, base), "--resume", "--epochs", "3", "--lr", "5e-4", "--no-eval"]
    )
    assert resumed.exit_code == 0, resumed.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # epoch 1 ran with 1e-4; from the resume on, the new schedule: 5e-4 until epoch round(0.8 * 3) = 2 is done, then
    # x0.1 (the saved schedule would have kept 1e-5). The log records the rates really applied.
    assert [r["lr"] for r in log] == pytest.approx([1e-4, 5e-4, 5e-5])
    state = torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 3 and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5)


# --- unattended on the line: restarts, one writer, retention, strict metadata, edges -------------------------------------


def service_args(model: Path, url: str, out: Path, *extra) -> list:
    """The command line of the systemd unit in docs/runtime.md ("As a service"), with a local camera and --out."""
    return [
        "--model",
        model,
        "--source",
        url,
        "--out",
        out,
        "--resume",
        "--keep",
        "30d",
        "--save-overlays",
        "-q",
        *extra,
    ]


def start_run(env: dict, args: list) -> subprocess.Popen:
    return rf.start_interruptible([PYTHON, "-c", ENTRY.format("run"), *map(str, args)], env)


def all_lines(out: Path) -> list[bytes]:
    from adtr_deploy.runtime.outdir import result_files

    return [line for path in result_files(out) for line in path.read_bytes().splitlines(keepends=True)]


def wait_for_records(proc: subprocess.Popen, out: Path, seen_runs: set, n: int = 5, timeout: float = 60) -> str:
    """Wait until this start (a run id not in `seen_runs`) has written `n` records to results.jsonl; its run id."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the run ended by itself: " + proc.communicate()[1]
        path = out / "results.jsonl"
        lines = path.read_bytes().splitlines() if path.is_file() else []
        if len(lines) >= n:
            run = json.loads(lines[0])["run"]
            if run not in seen_runs:
                return run
        time.sleep(0.05)
    raise AssertionError(f"no {n} records from a new start within {timeout} s")


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_service_command_restarted_five_times_keeps_every_record_once(model, env, tmp_path):
    """The issue's case: the documented unit's command, stopped (SIGTERM, SIGKILL, mixed) and started again into the
    same --out, as Restart=always does. Nothing lost, nothing duplicated, every start's history kept and summarized."""
    out = tmp_path / "line3"
    stops = [signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]
    runs: list[str] = []
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.02) as cam:
        for sig in stops:  # five restarts after the first start
            proc = start_run(env, service_args(model, cam.url, out))
            runs.append(wait_for_records(proc, out, set(runs)))
            code, err = stop(proc, sig)
            assert "Traceback" not in err and "Error" not in err, err
            assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), err
    lines = all_lines(out)
    assert lines and all(line.endswith(b"\n") for line in lines)  # whole lines only, kill -9 or not
    recs = [json.loads(line) for line in lines]  # every line parses
    assert len({(r["run"], r["frame"]) for r in recs}) == len(recs)  # nothing duplicated
    assert [r for r in dict.fromkeys(r["run"] for r in recs)] == runs  # every start's records kept, in order
    sha = json.loads((model.parent / "model.json").read_text())["extra"]["sha256"]
    assert {r["model_sha256"] for r in recs} == {sha[:16]}
    for rec in recs:  # each record's overlay is there (a restart never overwrote an earlier start's)
        assert (out / rec["overlay"]).is_file(), rec
    # Every start has its summary in runs.jsonl, the killed ones recounted at the next start: counts == records.
    history = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [h["run"] for h in history] == runs
    for h, sig in zip(history, stops, strict=True):
        mine = [r for r in recs if r["run"] == h["run"]]
        assert h["images"] == len(mine) and h["ok"] + h["errors"] == len(mine)
        assert h["anomalies"] == sum(bool(r["is_anomaly"]) for r in mine)
        assert h.get("recounted", False) == (sig == signal.SIGKILL) and h["running"] is False
    assert summary(out)["run"] == runs[-1] and summary(out)["stopped"] == "interrupted"
    assert len(list(out.glob("results-*.jsonl"))) == len(runs) - 1  # one closed segment per earlier start


def test_one_writer_per_out_and_the_lock_is_not_stuck_after_kill_9(model, env, tmp_path):
    out = tmp_path / "out"
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.02) as cam:
        first = start_run(env, service_args(model, cam.url, out))
        try:
            wait_for_records(first, out, set())
            second = cli(env, "run", *service_args(model, cam.url, out))
            one_sentence(second, f"is in use by another adtr-run (pid {first.pid})")
            before = (out / "results.jsonl").read_bytes()
        finally:
            first.kill()
            first.communicate()
        runs = {json.loads(line)["run"] for line in all_lines(out)}
        assert before and len(runs) == 1  # the refused run wrote nothing
        res = cli(env, "run", *service_args(model, cam.url, out, "--max-frames", "3"))
    assert res.returncode == 0, res.stderr  # the kernel released the dead run's lock
    assert summary(out)["images"] == 3


def test_resume_refuses_another_model_or_another_source(model, other_export, env, images, tmp_path):
    out = tmp_path / "out"
    assert cli(env, "run", "--model", model, "--source", images, "--out", out, "--max-frames", "2").returncode == 0
    before = (out / "results.jsonl").read_bytes()
    res = cli(env, "run", "--model", other_export, "--source", images, "--out", out, "--resume")
    one_sentence(res, "holds results of another model", "--overwrite")
    other = tmp_path / "other_images"
    shutil.copytree(images, other)
    res = cli(env, "run", "--model", model, "--source", other, "--out", out, "--resume")
    one_sentence(res, "holds results of another source", str(images))
    assert (out / "results.jsonl").read_bytes() == before


BAD_CALIBRATION = {
    "NaN threshold": ("threshold", float("nan"), "calibration.threshold is nan, not a finite number"),
    "infinite mean": ("score_mean", float("inf"), "calibration.score_mean is inf, not a finite number"),
    "negative std": ("score_std", -0.5, "calibration.score_std is -0.5, but it cannot be negative"),
    "missing map threshold": ("map_threshold", None, "lacks calibration.map_threshold"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_bad_calibration_in_model_json_is_refused_naming_the_file(case, env, images, tmp_path):
    from adtr_deploy.runtime import open_model
    from adtr_deploy.spec import SpecError

    key, value, fragment = BAD_CALIBRATION[case]
    path = rf.copy_model(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    if value is None:
        del spec["calibration"][key]
    else:
        spec["calibration"][key] = value
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))  # Python writes NaN and Infinity, as a careless edit
    with pytest.raises(SpecError) as caught:  # the runtime's own loading
        open_model(path, "cpu")
    assert str(tmp_path / "m" / "model.json") in str(caught.value) and fragment in str(caught.value)
    res = cli(env, "run", "--model", path, "--source", images, "--out", tmp_path / "out")
    one_sentence(res, str(tmp_path / "m" / "model.json"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["live", "files"])
def test_three_quick_sigints_still_leave_a_summary(kind, model, env, slow_folder, tmp_path):
    out = tmp_path / "out"
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.02) as cam:
        source = cam.url if kind == "live" else slow_folder
        proc = start_run(env, ["--model", model, "--source", source, "--out", out, "--save-overlays", "-q"])
        try:
            wait_for_records(proc, out, set(), n=3)
            for _ in range(3):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.01)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    # 0 or 130 (a signal after the summary, while the command closes, ends it as Ctrl-C does); never killed by the
    # signal mid-shutdown with a traceback, even when the stop finished before the last one arrived.
    assert proc.returncode in (0, 130) and "Traceback" not in err, err
    s = summary(out)
    assert s["stopped"] == "interrupted" and s["running"] is False and s["signal"] == "SIGINT"
    assert s["images"] == len(records(out))  # the summary counts exactly what the file holds


def test_out_inside_the_source_folder_is_refused(model, env, images, tmp_path):
    folder = tmp_path / "inspection"
    shutil.copytree(images, folder)
    one_sentence(
        cli(env, "run", "--model", model, "--source", folder, "--out", folder / "results"), "inside the source folder"
    )
    assert not (folder / "results").exists()


def test_overwrite_removes_the_replaced_runs_overlays(model, env, images, tmp_path):
    out = tmp_path / "out"
    args = ["--model", model, "--source", images, "--out", out, "--save-overlays", "-q"]
    assert cli(env, "run", *args).returncode == 0 and len(list((out / "overlays").iterdir())) == 6
    res = cli(env, "run", *args, "--overwrite", "--max-frames", "2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(Path(r["overlay"]).name for r in records(out))
    assert len(records(out)) == 2 and not (out / "runs.jsonl").read_text().count("\n") > 1


def test_keep_removes_old_segments_with_their_overlays(model, env, tmp_path):
    """--keep SIZE: segments close as they fill and the oldest go, overlays with them; --keep AGE at the next start."""
    out = tmp_path / "out"
    keep = 60_000  # bytes: segments of about 7 KB (records and overlays), so a few seconds give many
    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.02) as cam:
        args = ["--model", model, "--source", cam.url, "--out", out, "--resume", "--save-overlays", "-q"]
        proc = start_run(env, [*args, "--keep", f"{keep}B"])
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 90 and len(list(out.glob("results-*.jsonl"))) < 3:
                time.sleep(0.1)
            time.sleep(3)
        finally:
            code, err = stop(proc, signal.SIGTERM)
        assert code == 0, err
        s = summary(out)
        kept = [json.loads(line) for line in all_lines(out)]
        assert len(kept) < s["images"]  # old segments were removed ...
        used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != ".adtr-run.lock")
        assert used <= keep + 8 * 7_500, used  # ... down to the limit (plus the open segment)
        tags = {p.stem[len("results-") :] for p in out.glob("results-*.jsonl")} | {
            Path(r["overlay"]).parent.name for r in kept
        }
        assert {p.name for p in (out / "overlays").iterdir()} <= tags  # ... with their overlays
        assert all((out / r["overlay"]).is_file() for r in kept)
        # By age: every closed segment is older than 1 s at the next start, so that start removes them all.
        old = time.time() - 10
        for p in out.glob("results-*.jsonl"):
            os.utime(p, (old, old))
        res = cli(env, "run", *args, "--keep", "1s", "--max-frames", "2")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.glob("results-*.jsonl")] == [] or all(
        p.stat().st_mtime > old + 5 for p in out.glob("results-*.jsonl")
    )
    assert {p.name for p in (out / "overlays").iterdir()} == {Path(r["overlay"]).parent.name for r in records(out)} | {
        p.stem[len("results-") :] for p in out.glob("results-*.jsonl")
    }


def test_a_full_disk_gives_one_sentence_and_keeps_what_is_there(model, env, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: the kernel refuses writes beyond it, as a full disk does) on a live run: one
    sentence, every record line whole, the summary readable; the next start continues."""
    import resource

    out = tmp_path / "out"
    limit = 20_000

    def limited():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with rf.MjpegServer([("stream", 100_000, "close")], interval_s=0.01) as cam:
        args = ["--model", model, "--source", cam.url, "--out", out, "--resume"]
        cmd = [PYTHON, "-c", ENTRY.format("run"), *map(str, args)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limited)
        one_sentence(res, "is full", "--keep")
        lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
        assert lines and all(line.endswith(b"\n") for line in lines) and sum(map(len, lines)) <= limit
        recs = [json.loads(line) for line in lines]
        s = summary(out)
        assert s["images"] == len(recs) and s["stopped"].startswith("error: the disk holding")
        res = cli(env, "run", *args, "--max-frames", "3", "-q")
    assert res.returncode == 0, res.stderr
    assert len(all_lines(out)) == len(recs) + 3
