"""The gate before rollout (`adtr promote`, runtime/promote.py): real tiny ONNX exports (two seeds), real PNG images
written with OpenCV, review folders labelled by the real Review from a real adtr-run's kept frames.

Random tiny models do not tell defects from good parts, so each model's calibrated threshold is set from its own scores
(measured here through the runtime): the current model flags every reviewed part (they are what it flagged: its false
alarms and the defects it caught) and as many held-out good images as the good candidate; the candidates' thresholds
then decide what each of them flags, and every expected figure is counted from the same scores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from adtr_deploy.calibration import normalize_scores
from adtr_deploy.cli.main import cli
from adtr_deploy.cli.run import command as run_command
from adtr_deploy.fileio import sha256_file
from adtr_deploy.preprocess import read_image, resize
from adtr_deploy.runtime.backends import open_model
from adtr_deploy.runtime.modelrepo import PROMOTION, ModelRepo
from adtr_deploy.runtime.review import REVIEW_FILE, Review
from adtr_deploy.spec import Calibration, ModelSpec
from adtr_deploy.tiling import Tiling
from tests.conftest import export_tiny_onnx, texture_images
from tests.test_runtime import poisoned_torch_env

N_GOOD, N_DEFECT, N_HELD = 3, 3, 5
EPS = 1e-5  # a threshold this far below a score flags it (scores here differ by far more)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def with_defect(image: np.ndarray, rs: np.random.Generator) -> np.ndarray:
    out = image.copy()
    x, y = (int(v) for v in rs.integers(6, 38, 2))
    cv2.rectangle(out, (x, y), (x + 18, y + 14), (255, 0, 255), -1)
    return out


def scores_of(model: Path, paths: list[Path]) -> np.ndarray:
    engine = open_model(model)
    try:
        size = engine.spec.input_size
        return np.asarray(engine.run(np.stack([resize(read_image(p), size) for p in paths]))[1], np.float64)
    finally:
        engine.close()


def write_spec(folder: Path, threshold: float, **changes) -> Path:
    """model.json as adtr-export writes it (the artifact's sha256 and files), calibrated to `threshold`."""
    spec = ModelSpec.load(folder / "model.json")
    cal = Calibration(score_mean=threshold - 0.05, score_std=0.02, score_max=threshold, threshold=threshold)
    feedback = changes.pop("feedback", None)
    extra = {**spec.extra, "sha256": sha256_file(folder / "model.onnx"), "files": ["model.onnx"]}
    if feedback:
        extra["feedback"] = {"model_sha256": feedback, "review_dir": "review"}
    spec.replace(calibration=cal, extra=extra, **changes).save(folder / "model.json")
    return folder


def flagged(scores: np.ndarray, threshold: float) -> int:
    return int((np.asarray(scores, np.float32) > threshold).sum())


def run_and_review(model: Path, line: Path, out: Path, only: str | None = None) -> Path:
    """adtr-run keeps every frame (flagged ones and a 100% sample of the others); each is labelled as an operator
    would: defect_* as defects, good parts as false alarms when flagged, else good. Returns the review folder."""
    res = CliRunner().invoke(
        run_command,
        ["--model", str(model), "--source", str(line), "--out", str(out), "-q"]
        + ["--keep-frames", "flagged", "--review-sample", "1"],
    )
    assert res.exit_code == 0, res.output
    review = Review(out)
    kept = review.kept()
    assert len(kept) == N_GOOD + N_DEFECT
    for record in kept:
        defect = "defect_" in Path(record["source"]).name
        label = "defect" if defect else ("false_alarm" if record["is_anomaly"] else "good")
        if only is None or LABEL_FOLDER[label] == only:
            review.label(review_id_of(record), label, "tester")
    return review.dir


LABEL_FOLDER = {"defect": "defect", "false_alarm": "good", "good": "good"}


def review_id_of(record: dict) -> str:
    from adtr_deploy.runtime.review import review_id

    return review_id(record)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """The current model (seed 0) with its review; the candidate's graph (seed 1); images; the thresholds."""
    base = tmp_path_factory.mktemp("promote")
    for name, seed in (("current", 0), ("seed1", 1)):
        (base / name).mkdir()
        export_tiny_onnx(base / name, seed=seed)
    rs = np.random.default_rng(7)
    # held out: the good parts both models score lowest (rank sum); the others went down the line and were flagged
    pool = texture_images(N_GOOD + N_DEFECT + N_HELD, 64, seed=11)
    pool_paths = [write_png(base / "pool" / f"{i}.png", im) for i, im in enumerate(pool)]
    ranks = [np.argsort(np.argsort(scores_of(base / m, pool_paths))) for m in ("current", "seed1")]
    order = np.argsort(ranks[0] + ranks[1], kind="stable")
    held = [write_png(base / "held" / f"{i}.png", pool[j]) for i, j in enumerate(order[:N_HELD])]
    goods = pool[order[N_HELD:]]
    good_paths = [write_png(base / "line" / f"good_{i}.png", goods[i]) for i in range(N_GOOD)]
    defect_paths = [
        write_png(base / "line" / f"defect_{i}.png", with_defect(goods[N_GOOD + i], rs)) for i in range(N_DEFECT)
    ]
    sets = {"good": good_paths, "defect": defect_paths, "held": held}
    cur = {k: scores_of(base / "current", v) for k, v in sets.items()}
    cand = {k: scores_of(base / "seed1", v) for k, v in sets.items()}
    # the good candidate flags every confirmed defect; the current model flags every reviewed part and at least as many
    # held-out good images as that candidate
    t_cand = float(cand["defect"].min()) - EPS
    k = flagged(cand["held"], t_cand)
    t_cur = float(min(cur["good"].min(), cur["defect"].min(), np.sort(cur["held"])[::-1][:k].min(initial=np.inf))) - EPS
    write_spec(base / "current", t_cur)
    assert flagged(cur["held"], t_cur) < N_HELD, "the construction needs a held-out image the current model passes"
    review = run_and_review(base / "current", base / "line", base / "run_current")
    return SimpleNamespace(
        base=base, current=base / "current", held=base / "held", review=review, cur=cur, cand=cand, t_cur=t_cur,
        t_cand=t_cand, short=sha256_file(base / "current" / "model.onnx")[:16],
    )  # fmt: skip


def candidate(line, folder: Path, threshold: float, feedback: str | None = "current", **changes) -> Path:
    folder.mkdir(parents=True)
    shutil.copy2(line.base / "seed1" / "model.onnx", folder / "model.onnx")
    shutil.copy2(line.base / "seed1" / "model.json", folder / "model.json")
    return write_spec(folder, threshold, feedback=line.short if feedback == "current" else feedback, **changes)


def promote(*args) -> object:
    return CliRunner().invoke(cli, ["promote", *map(str, args)])


def refused(res, says: str) -> str:
    assert res.exit_code == 1, res.output
    sentence = res.output.strip().splitlines()[-1]
    assert sentence.startswith("Refused: ") and says in sentence, res.output
    assert sentence.count(". ") == 0 and sentence.endswith("."), sentence  # one sentence
    return sentence


@pytest.fixture(scope="module")
def promoted(line, tmp_path_factory):
    """The good candidate promoted into a new versioned folder."""
    tmp = tmp_path_factory.mktemp("promoted")
    cand = candidate(line, tmp / "cand", line.t_cand)
    models = tmp / "models" / "brick"
    res = promote(cand, "--against", line.current, "--review", line.review, "--good", line.held, "--to", models,
                  "--by", "J. Doe", "--json", tmp / "gate.json")  # fmt: skip
    return SimpleNamespace(res=res, cand=cand, models=models, gate=tmp / "gate.json")


def test_a_better_candidate_is_published_as_version_2_over_the_baseline(line, promoted):
    assert promoted.res.exit_code == 0, promoted.res.output
    repo = ModelRepo(promoted.models)
    assert repo.versions() == [1, 2] and repo.active() == 2
    assert repo.model_path(1).read_bytes() == (line.current / "model.onnx").read_bytes()
    assert repo.model_path(2).read_bytes() == (promoted.cand / "model.onnx").read_bytes()
    assert (repo.folder(2) / "model.json").read_bytes() == (promoted.cand / "model.json").read_bytes()
    assert repo.promotion(1)["decision"] == "baseline"
    record = repo.promotion(2)
    assert record["decision"] == "promoted" and record["version"] == 2 and record["by"] == "J. Doe"
    assert record["review"]["review_jsonl_sha256"] == sha256_file(line.review / REVIEW_FILE)
    assert record["against"]["sha256"] == sha256_file(line.current / "model.onnx")
    # the figures are the counts of the same scores, each model with its own threshold
    cur, cand = record["figures"]["current"], record["figures"]["candidate"]
    assert cur["defect"]["flagged"] == N_DEFECT == cand["defect"]["flagged"]
    assert cur["good"]["flagged"] == flagged(line.cur["good"], line.t_cur) == N_GOOD
    assert cand["good"]["flagged"] == flagged(line.cand["good"], line.t_cand)
    assert cur["held_out"]["flagged"] == flagged(line.cur["held"], line.t_cur)
    assert cand["held_out"]["flagged"] == flagged(line.cand["held"], line.t_cand) <= cur["held_out"]["flagged"]
    cal = {m: ModelSpec.load(f / "model.json").calibration for m, f in (("cur", line.current), ("cand", promoted.cand))}
    medians = {m: np.median(normalize_scores(np.float32(getattr(line, m)["held"]), cal[m])) for m in cal}
    assert record["shift"]["held_out"] == pytest.approx(medians["cand"] - medians["cur"], abs=1e-6)
    gate = json.loads(promoted.gate.read_text())
    assert gate["decision"] == "promoted" and gate["version"] == 2 and gate["figures"] == record["figures"]
    assert record["candidate"]["sha256"] == sha256_file(promoted.cand / "model.onnx") == gate["candidate"]["sha256"]
    out = promoted.res.output
    assert "held-out good flagged" in out and f"version 2 of {promoted.models}" in out and "version 1 is" in out


@pytest.mark.parametrize("case", ["misses_a_defect", "flags_more_held_out_goods", "flags_more_reviewed_goods"])
def test_a_regression_is_refused_in_one_sentence_and_nothing_is_written(line, tmp_path, case):
    everything = np.concatenate([line.cand["good"], line.cand["defect"], line.cand["held"]])
    if case == "misses_a_defect":  # the lowest-scoring defect passes
        threshold, says, good = float(np.sort(line.cand["defect"])[1]) - EPS, "confirmed defects", line.held
    elif case == "flags_more_held_out_goods":
        threshold, says, good = float(everything.min()) - EPS, "held-out good images", line.held
    else:  # without held-out images the reviewed good parts decide; make the current model pass one of them
        threshold, says, good = float(everything.min()) - EPS, "reviewed good parts", None
    cand = candidate(line, tmp_path / "cand", threshold)
    against = line.current
    if case == "flags_more_reviewed_goods":
        against = tmp_path / "current"
        shutil.copytree(line.current, against)
        write_spec(against, float(np.sort(line.cur["good"])[0]) + EPS)  # the lowest reviewed good part passes
        assert flagged(line.cur["good"], ModelSpec.load(against / "model.json").threshold) == N_GOOD - 1
    models = tmp_path / "models" / "brick"
    args = [cand, "--against", against, "--review", line.review, "--to", models, "--json", tmp_path / "gate.json"]
    res = promote(*args, *(["--good", good] if good else []))
    sentence = refused(res, says)
    assert not models.exists()
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert gate["decision"] == "refused" and gate["sentence"] in sentence
    if case == "misses_a_defect":
        assert gate["figures"]["candidate"]["defect"]["flagged"] == N_DEFECT - 1
        assert len(gate["missed_by_candidate"]) == 1 and gate["missed_by_candidate"][0] in sentence
    if good is None:
        assert "held-out good images: not given" in res.output


@pytest.mark.parametrize(
    "change, says",
    [
        ({"input_size": (96, 96)}, "another input size"),
        ({"backbone": "efficientnet-lite1"}, "another backbone"),
        ({"input_layout": "NCHW"}, "another input layout"),
        ({"tiling": Tiling(tile=(64, 64)).to_dict()}, "another tiling"),
    ],
)
def test_an_incompatible_candidate_is_refused(line, tmp_path, change, says):
    cand = candidate(line, tmp_path / "cand", line.t_cand, **change)
    res = promote(cand, "--against", line.current, "--review", line.review, "--to", tmp_path / "models" / "m")
    refused(res, says)
    assert not (tmp_path / "models").exists()


def test_labels_of_another_model_or_none_are_refused(line, tmp_path):
    cand = candidate(line, tmp_path / "cand", line.t_cand)
    to = tmp_path / "models" / "m"
    base = ["--against", line.current, "--to", to]
    # a review of the candidate's own model, not of the running one
    other = run_and_review(cand, line.base / "line", tmp_path / "run_cand")
    refused(promote(cand, *base, "--review", other), "labels of another model")
    # a candidate trained on the review of another model
    stray = candidate(line, tmp_path / "stray", line.t_cand, feedback="0123456789abcdef")
    refused(promote(stray, *base, "--review", line.review), "trained on the review of another model")
    # no labels at all; only good parts labelled (recall cannot be checked)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / REVIEW_FILE).write_text("")
    refused(promote(cand, *base, "--review", empty), "holds no labels")
    goods_only = run_and_review(line.current, line.base / "line", tmp_path / "run_goods", only="good")
    refused(promote(cand, *base, "--review", goods_only), "no confirmed defect")
    res = promote(cand, *base, "--review", tmp_path / "missing")
    assert res.exit_code == 1 and "Error:" in res.output and "review.jsonl" in res.output
    # held-out images from the review folder itself are what a feedback candidate was trained on
    res = promote(cand, *base, "--review", line.review, "--good", line.review / "good")
    assert res.exit_code == 1 and "lies in the review folder" in res.output, res.output
    # a label line naming a file outside its review folder
    edited = tmp_path / "edited"
    shutil.copytree(line.review, edited)
    entry = json.loads((edited / REVIEW_FILE).read_text().splitlines()[-1])
    outside = write_png(tmp_path / "elsewhere.png", texture_images(1, 64, seed=5)[0])
    with open(edited / REVIEW_FILE, "a") as fh:
        fh.write(json.dumps({**entry, "image": f"../{outside.name}"}) + "\n")
    res = promote(cand, *base, "--review", edited)
    assert res.exit_code == 1 and "a file outside" in res.output, res.output
    assert not (tmp_path / "models").exists()


def test_against_the_versioned_folder_a_second_promotion_is_version_3(line, promoted, tmp_path):
    models = tmp_path / "brick"
    shutil.copytree(promoted.models, models)
    v2 = ModelRepo(models).folder(2)
    # the first review is of version 1's model, and --to elsewhere must run the model compared against
    refused(promote(promoted.cand, "--against", models, "--review", line.review), "labels of another model")
    refused(
        promote(promoted.cand, "--against", line.current, "--review", line.review, "--to", models), "runs version 2"
    )
    # the line ran version 2 and was reviewed; a candidate trained on that review is gated against version 2
    review2 = run_and_review(v2, line.base / "line", tmp_path / "run_v2")
    cand3 = candidate(line, tmp_path / "cand3", line.t_cand, feedback=sha256_file(v2 / "model.onnx")[:16])
    # the real command in a process where torch cannot be imported: the gate is part of the torch-free runtime
    cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import cli; cli()", "promote", str(cand3)]
    cmd += ["--against", str(models), "--review", str(review2), "--good", str(line.held), "--by", "op"]
    res = subprocess.run(cmd, env=poisoned_torch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    repo = ModelRepo(models)
    assert repo.versions() == [1, 2, 3] and repo.active() == 3
    record = repo.promotion(3)
    assert record["against"]["version"] == 2 and record["to"] == str(models) and "baseline_version" not in record
    assert (repo.folder(3) / PROMOTION).is_file() and repo.promotion(1)["decision"] == "baseline"
    assert "version 3 of" in res.stdout and "(v2)" in res.stdout
