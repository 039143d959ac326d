"""Learning from the review (issue 26, step 3): `adtr-train --init-from RUN --feedback REVIEW_DIR` continues training
on an operator's review folder. The loop is real: a tiny model trained with adtr-train, exported to ONNX, run by
adtr-run with --keep-frames on image files written with OpenCV, its kept frames labelled with `Review.label`, and the
labels trained on with adtr-train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adtr_deploy.cli.run import command as run_command
from adtr_deploy.cli.train import command as train_command
from adtr_deploy.data.feedback import CALIBRATION_SHARE, ReviewData, read_review, split_review_goods
from adtr_deploy.data.mvtec import Sample
from adtr_deploy.errors import UserError
from adtr_deploy.fileio import sha256_file
from adtr_deploy.runtime.outdir import read_records
from adtr_deploy.runtime.review import Review, review_id
from adtr_deploy.spec import ModelSpec
from adtr_deploy.train.feedback import FEEDBACK_EPOCHS, data_of
from tests.conftest import texture_images
from tests.train_data import make_mvtec, write_png

FAST = ["--preset", "tiny", "--batch-size", "8", "--quiet"]


def train(*args) -> object:
    return CliRunner().invoke(train_command, [str(a) for a in args] + FAST)


def one_error_line(result) -> str:
    """The one sentence a refused command prints (and nothing else: no traceback)."""
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict:
    """A tiny model trained and exported, a run over 10 images keeping every frame, and a review folder of its kept
    frames: 4 false alarms, 2 confirmed good, 2 defects (one with a hand-drawn mask)."""
    from adtr_deploy.export import export_checkpoint

    tmp = tmp_path_factory.mktemp("loop")
    data = make_mvtec(tmp / "data", "tex", n_train=12, n_good=2, n_masked=2, n_unmasked=0)
    base = tmp / "base"
    result = train("--data", data, "--category", "tex", "--out", base, "--epochs", 1, "--no-eval")
    assert result.exit_code == 0, result.output
    model = Path(export_checkpoint(base, "onnx", tmp / "export", verify=False, dynamo=False).path)
    frames = tmp / "frames"
    for i, img in enumerate(texture_images(10, 64, seed=11)):
        write_png(frames / f"part_{i:02d}.png", img)
    run_out = tmp / "run"
    res = CliRunner().invoke(
        run_command,
        ["--model", str(model), "--source", str(frames), "--out", str(run_out), "-q"]
        + ["--keep-frames", "flagged", "--review-sample", "1"],
    )
    assert res.exit_code == 0, res.output
    ids = sorted(review_id(r) for r in read_records(run_out))
    assert len(ids) == 10
    review = Review(run_out)
    labels = ["false_alarm"] * 4 + ["good"] * 2 + ["defect"] * 2
    entries = [review.label(rid, label, "ana") for rid, label in zip(ids, labels, strict=False)]
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:40] = 255
    stem = Path(entries[-1]["image"]).stem
    (review.dir / "ground_truth" / "defect").mkdir(parents=True)
    assert cv2.imwrite(str(review.dir / "ground_truth" / "defect" / f"{stem}_mask.png"), mask)
    return {"data": data, "base": base, "model": model, "review": review.dir, "entries": entries, "tmp": tmp}


def copy_review(loop, dest: Path) -> Path:
    return Path(shutil.copytree(loop["review"], dest))


def test_reading_a_review_folder_takes_each_ids_last_label_false_alarms_first(loop, tmp_path):
    review = read_review(loop["review"])
    entries = loop["entries"]
    assert review.model_sha256 == entries[0]["model_sha256"] and len(review.model_sha256) == 16
    assert review.file_sha256 == sha256_file(loop["review"] / "review.jsonl")
    assert [s.path.name for s in review.good] == [Path(e["image"]).name for e in entries[:6]]
    assert review.false_alarms == 4 and review.skipped == ()
    assert [s.path.name for s in review.defects] == [Path(e["image"]).name for e in entries[6:]]
    assert [s.mask is not None for s in review.defects] == [False, True]
    # A relabel (the last line of an id wins): a confirmed-good frame becomes a defect.
    folder = copy_review(loop, tmp_path / "relabelled")
    run_review = Review(loop["tmp"] / "run", folder)
    run_review.label(entries[5]["id"], "defect", "bo", relabel=True)
    again = read_review(folder)
    assert len(again.good) == 5 and len(again.defects) == 3 and again.file_sha256 != review.file_sha256


def test_missing_and_unreadable_files_are_reported_and_left_out(loop, tmp_path):
    folder = copy_review(loop, tmp_path / "damaged")
    entries = loop["entries"]
    (folder / entries[0]["image"]).unlink()
    (folder / entries[1]["image"]).write_bytes(b"not a png")
    with (folder / "review.jsonl").open("ab") as fh:
        fh.write(b'{"id": "torn')  # a line cut short
    review = read_review(folder)
    assert len(review.good) == 4 and review.false_alarms == 2 and len(review.defects) == 2
    assert len(review.skipped) == 3
    assert "is missing" in review.skipped[1] and entries[0]["id"] in review.skipped[1]
    assert "not a readable image" in review.skipped[2] and "is not a review record" in review.skipped[0]


def test_review_goods_split_a_seeded_quarter_per_label_for_calibration():
    def split(n_false: int, n_good: int, seed: int = 0):
        good = tuple(Sample(Path(f"{i}.png")) for i in range(n_false + n_good))
        review = ReviewData(Path("r"), "", "m", good, n_false, (), ())
        return split_review_goods(review, seed)

    for n_false, n_good in [(0, 1), (1, 1), (2, 0), (4, 2), (9, 3), (40, 20)]:
        train, cal = split(n_false, n_good)
        n = n_false + n_good
        expected = int(n_false * CALIBRATION_SHARE + 0.5) + int(n_good * CALIBRATION_SHARE + 0.5)
        assert len(cal) == (max(1, expected) if n >= 2 else 0), (n_false, n_good)
        assert sorted(s.path.name for s in train + cal) == sorted(f"{i}.png" for i in range(n))
        assert not {s.path for s in train} & {s.path for s in cal}
    assert split(9, 3) == split(9, 3) and split(40, 20)[1] != split(40, 20, seed=1)[1]
    # Every label is represented once it has enough images: false alarms are what the threshold must accept.
    _, cal = split(4, 4)
    assert {int(s.path.stem) < 4 for s in cal} == {True, False}


def test_feedback_training_learns_the_review_and_records_its_provenance(loop, tmp_path):
    out = tmp_path / "fed"
    # No --data / --category: the checkpoint's; confirmed defects: ADTR+ by itself.
    result = train("--init-from", loop["base"], "--feedback", loop["review"], "--out", out, "--epochs", 1)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    info, review = ckpt["info"], read_review(loop["review"])
    base = torch.load(loop["base"] / "checkpoint.pt", weights_only=True)["info"]
    fb = info["feedback"]
    train_good, cal_good = split_review_goods(review, 0)
    assert fb == {
        "review_dir": str(loop["review"].resolve()),
        "review_sha256": sha256_file(loop["review"] / "review.jsonl"),
        "model_sha256": loop["entries"][0]["model_sha256"],
        "init_from": str((loop["base"] / "checkpoint.pt").resolve()),
        "init_from_sha256": sha256_file(loop["base"] / "checkpoint.pt"),
        "good_train": len(train_good),
        "good_calibration": len(cal_good),
        "false_alarms": 4,
        "defects": 2,
        "defects_with_mask": 1,
        "left_out": 0,
        "calibration_share": CALIBRATION_SHARE,
    }
    assert len(train_good) + len(cal_good) == 6 and cal_good
    assert info["data"] == base["data"] and ckpt["mode"] == "adtr+"
    assert "review-defects" in info["adtr_plus"]["sources"] and "confetti" in info["adtr_plus"]["sources"]
    # Calibration: the data's own held-out goods plus the held-out review goods, never a defect or a trained image.
    calibrated = set(info["calibration_images"])
    assert {str(s.path) for s in cal_good} <= calibrated
    assert not calibrated & {str(s.path) for s in train_good + list(review.defects)}
    assert set(base["calibration_images"]) <= calibrated
    assert info["split"] == {
        "train_images": base["split"]["train_images"] + len(train_good),
        "calibration_images": base["split"]["calibration_images"] + len(cal_good),
    }
    assert ckpt["calibration"]["num_images"] == len(calibrated)
    # The exported model carries it: `adtr promote` reads extra["feedback"]["model_sha256"].
    from adtr_deploy.export import export_checkpoint

    model = export_checkpoint(out, "onnx", tmp_path / "export", verify=False, dynamo=False).path
    spec = ModelSpec.load(Path(model).with_name("model.json"))
    assert spec.extra["feedback"] == fb


def test_feedback_without_defects_is_plain_continued_training(loop, tmp_path):
    folder = copy_review(loop, tmp_path / "goods_only")
    lines = (folder / "review.jsonl").read_text().splitlines()
    (folder / "review.jsonl").write_text("\n".join(ln for ln in lines if '"defect"' not in ln) + "\n")
    out = tmp_path / "plain"
    result = train(
        "--init-from", loop["base"], "--feedback", folder, "--out", out, "--data", loop["data"], "--category", "tex"
    )
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["mode"] == "adtr" and "adtr_plus" not in ckpt["info"]
    assert ckpt["info"]["train"]["epochs"] == FEEDBACK_EPOCHS and ckpt["info"]["feedback"]["defects"] == 0


def _edit(folder: Path, change) -> None:
    lines = [json.loads(ln) for ln in (folder / "review.jsonl").read_text().splitlines()]
    change(lines)
    (folder / "review.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def _versioned(folder: Path) -> None:
    """The layout of a versioned model folder's review (OUT/review/v<N>/), given as its parent."""
    shutil.move(folder, folder.with_name("v2"))
    folder.mkdir()
    shutil.move(folder.with_name("v2"), folder / "v2")


BAD = {
    "no_review_file": (lambda f: (f / "review.jsonl").unlink(), "is not a review folder (no review.jsonl)"),
    "no_usable_label": (lambda f: [p.unlink() for p in f.rglob("*.png")], "holds no usable labels"),
    "two_models": (lambda f: _edit(f, lambda ls: ls[0].update(model_sha256="0" * 16)), "mixes labels of 2 models"),
    "escaping_file": (lambda f: _edit(f, lambda ls: ls[2].update(image="../../data/x.png")), "not a file inside"),
    "absolute_file": (lambda f: _edit(f, lambda ls: ls[2].update(image="/etc/hostname")), "not a file inside"),
    "versions_parent": (_versioned, "holds the review folders of versions v2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_review_folders_are_refused_in_one_sentence_and_nothing_is_written(loop, tmp_path, case):
    folder = copy_review(loop, tmp_path / "review")
    damage, words = BAD[case]
    damage(folder)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_review(folder)
    out = tmp_path / "out"
    line = one_error_line(train("--init-from", loop["base"], "--feedback", folder, "--out", out))
    assert words in line and not out.exists()


def test_feedback_options_that_cannot_work_are_refused(loop, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(
        train("--data", loop["data"], "--category", "tex", "--feedback", loop["review"], "--out", out)
    )
    assert "give its checkpoint or run folder with --init-from" in line
    # The review holds confirmed defects, which plain ADTR would silently ignore.
    line = one_error_line(
        train("--init-from", loop["base"], "--feedback", loop["review"], "--out", out, "--mode", "adtr")
    )
    assert "only ADTR+ learns from" in line and not out.exists()
    # A checkpoint whose data is gone asks for --data.
    ckpt = torch.load(loop["base"] / "checkpoint.pt", weights_only=True)
    ckpt["info"]["data"]["root"] = str(tmp_path / "moved_away")
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(UserError, match="is not there; give the good images with --data"):
        data_of(str(tmp_path / "moved.pt"), None, None)
    assert data_of(str(tmp_path / "moved.pt"), str(loop["data"]), "tex") == (str(loop["data"]), "tex")
    line = one_error_line(train("--init-from", tmp_path / "moved.pt", "--feedback", loop["review"], "--out", out))
    assert "give the good images with --data" in line and not out.exists()
    # A tiled model: its reviewed frames are whole images, and ADTR+ does not train on tiles.
    ckpt["info"]["tiling"] = {"scale": 1.0}
    torch.save(ckpt, tmp_path / "tiled.pt")
    line = one_error_line(train("--init-from", tmp_path / "tiled.pt", "--feedback", loop["review"], "--out", out))
    assert "is a tiled model" in line and not out.exists()


def test_review_images_copied_from_the_test_split_are_refused(loop, tmp_path):
    folder = copy_review(loop, tmp_path / "leaky")
    test_image = loop["data"] / "tex" / "test" / "good" / "000.png"
    shutil.copy(test_image, folder / loop["entries"][4]["image"])
    line = one_error_line(train("--init-from", loop["base"], "--feedback", folder, "--out", tmp_path / "out"))
    assert "byte-identical copy of the test file" in line and not (tmp_path / "out").exists()


def test_a_feedback_run_resumes_on_its_review_folder_and_refuses_one_with_new_labels(loop, tmp_path):
    folder = copy_review(loop, tmp_path / "review")
    out = tmp_path / "fed"
    result = train("--init-from", loop["base"], "--feedback", folder, "--out", out, "--epochs", 1)
    assert result.exit_code == 0, result.output
    first = torch.load(out / "checkpoint.pt", weights_only=True)["info"]
    # --resume without --data: the run's own data, and its review folder read again (the trainer checks the images).
    result = train("--out", out, "--resume", "--epochs", 2)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["train_state"]["epoch"] == 2 and ckpt["info"]["feedback"] == first["feedback"]
    assert ckpt["info"]["calibration_images"] == first["calibration_images"]
    Review(loop["tmp"] / "run", folder).label(loop["entries"][0]["id"], "good", "bo", relabel=True)
    line = one_error_line(train("--out", out, "--resume", "--epochs", 3))
    assert "has new labels since the run" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]["epoch"] == 2
