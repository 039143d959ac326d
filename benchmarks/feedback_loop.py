"""The operator's loop, scripted (issue 26): a deployed model meets a shifted line and raises false alarms; the script
plays the operator, labels what a person would, retrains from the review (ADTR+), gates the candidate and promotes it
into a running `adtr-run --serve`, which takes it without stopping.

    flock /tmp/adtr-cpu.lock python benchmarks/feedback_loop.py --base RUN_DIR [--category brick] [--shift noise-5]

RUN_DIR is the deployed model's adtr-train run (trained on the demo category's train split). The line's images are new
demo images of the same category (other seeds: never the training images), with the shift applied (default: sensor
noise of std 5 levels, what a raised camera gain gives; any name of adtr_deploy/data/shifts.py SHIFTS, or `stamp`: a
harmless printed mark on every part). Steps, each with the real command a user runs:

1. Publish the base model as version 1 of MODELS/<category> and run it over the shifted line (phase 1:
   --line-good good parts and --line-defects defective ones) with --keep-frames flagged --review-sample.
2. The operator labels every kept frame from the ground truth (`adtr review`'s API): defect or false_alarm/good.
3. `adtr-train --init-from RUN_DIR --feedback OUT/review`, `adtr-export`.
4. A live camera (MJPEG on 127.0.0.1, --fps) feeds `adtr-run --model MODELS/<category> --serve` (phase 2); while it
   runs, `adtr promote` gates the candidate against version 1 on the review and on held-out good images of the shifted
   line and publishes it; the service swaps. Frames sent by the camera against records written gives frames dropped.
5. Both versions, each at its own calibrated threshold, on a fresh evaluation set of the shifted line and of the old
   (unshifted) line: false-alarm rate, defect recall, image AUROC.

Writes benchmarks/results/feedback_loop.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.bench.camera import MjpegCamera
from adtr_deploy.bench.studies import command_line, machine, write_result
from adtr_deploy.runtime.cpu import cpu_info

RESULTS = Path(__file__).resolve().parent / "results"
# the installed `adtr` command beside this interpreter (the user's own), else the same entry point through python
_BIN = Path(sys.executable).parent / "adtr"
CLI = [str(_BIN)] if _BIN.is_file() else [sys.executable, "-c", "from adtr_deploy.cli.main import cli; cli()"]
OPERATOR = "scenario-operator"
SEEDS = {"line": 101, "heldout": 202, "eval": 303, "live": 404}
JPEG_QUALITY = 95


def adtr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `adtr ARGS` as a user would; fail the benchmark with its output if it fails (unless not `check`)."""
    cmd = [*CLI, *args]
    print("$ adtr " + " ".join(args), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(
            f"adtr {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


# -- the line's images ---------------------------------------------------------------------------------------------
def stamp(image: np.ndarray, index: int) -> np.ndarray:
    """A harmless printed mark: a dark lot code in one corner, as a new material batch might carry."""
    out = image.copy()
    h, w = out.shape[:2]
    cv2.putText(
        out, f"LOT {index % 97:02d}", (w // 20, h - h // 12), cv2.FONT_HERSHEY_SIMPLEX, h / 400, (30, 30, 30), 2
    )
    return out


def shifted(images: np.ndarray, shift: str, seed: int) -> np.ndarray:
    from adtr_deploy.data.shifts import SHIFTS, noise

    if shift == "stamp":
        return np.stack([stamp(im, i) for i, im in enumerate(images)])
    if shift.startswith("noise-"):  # seeded per set: every set gets its own noise
        return noise(images, float(shift.split("-", 1)[1]), seed=seed)
    if shift not in SHIFTS:
        raise SystemExit(f"--shift {shift!r}: choose stamp or one of {', '.join(SHIFTS)}")
    return SHIFTS[shift][1](images)


def jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[
        1
    ].tobytes()


def as_camera_sees(image: np.ndarray) -> np.ndarray:
    """The image after the camera's JPEG compression (what adtr-run decodes from the stream)."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg(image), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def make_set(
    category: str, shift: str, seed: int, n_good: int, n_defect: int, size: int = 256
) -> list[tuple[str, np.ndarray, bool]]:
    """(name, RGB image, is_defect) of new demo images (seed `seed`), shifted and through the camera's JPEG; defects
    cycle through the defect types."""
    from adtr_deploy.data.demo_synth import DEFECTS, make_sample

    kinds = list(DEFECTS)
    goods = np.stack([make_sample(category, "good", i, seed=seed, image_size=size)[0] for i in range(n_good)])
    bads = [make_sample(category, kinds[i % len(kinds)], i, seed=seed, image_size=size)[0] for i in range(n_defect)]
    goods = shifted(goods, shift, seed)
    bads = list(shifted(np.stack(bads), shift, seed + 1)) if bads else []
    items = [(f"good_{i:04d}", as_camera_sees(im), False) for i, im in enumerate(goods)]
    items += [(f"{kinds[i % len(kinds)]}_{i:04d}", as_camera_sees(im), True) for i, im in enumerate(bads)]
    order = np.random.default_rng(seed).permutation(len(items))  # defects spread among the good parts
    return [items[i] for i in order]


def write_set(items, folder: Path) -> None:
    """The images as PNG files, named by their truth (good_... or the defect type)."""
    folder.mkdir(parents=True, exist_ok=True)
    for pos, (name, image, _) in enumerate(items):
        cv2.imwrite(str(folder / f"{pos:04d}_{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def is_defect(name: str) -> bool:
    return "_good_" not in Path(name).name


# -- measuring -----------------------------------------------------------------------------------------------------
def decisions(flagged: np.ndarray, defect: np.ndarray) -> dict:
    """False-alarm rate on the good parts and recall on the defective ones (None where there are none)."""
    return {
        "false_alarm_rate": round(float(flagged[~defect].mean()), 4) if (~defect).any() else None,
        "recall": round(float(flagged[defect].mean()), 4) if defect.any() else None,
    }


def rates(scores: np.ndarray, defect: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    return {
        **decisions(scores > threshold, defect),  # runtime/postprocess.py's decision: raw score > threshold
        "auroc": round(float(roc_auc_score(defect, scores)), 4) if defect.any() and (~defect).any() else None,
        "good": int((~defect).sum()),
        "defects": int(defect.sum()),
    }


def evaluate(model_folder: Path, folder: Path) -> dict:
    """A version on a folder of the line's images, at its own calibrated threshold (the runtime, torch-free)."""
    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.recalibrate import score_folder

    engine = open_model(model_folder)
    names, scores, _ = score_folder(engine, folder)
    return rates(scores, np.array([is_defect(n) for n in names]), engine.spec.calibration.threshold)


def records(folder: Path) -> list[dict]:
    from adtr_deploy.runtime.outdir import read_records

    return list(read_records(folder))


def phase_rates(recs: list[dict], truth: list[bool]) -> dict:
    """False-alarm rate and recall of a camera run's records; record "frame" i is the camera's i-th frame."""
    ok = [r for r in recs if r.get("status") == "ok"]
    defect = np.array([truth[r["frame"]] for r in ok], dtype=bool)
    flagged = np.array([bool(r["is_anomaly"]) for r in ok], dtype=bool)
    return {**decisions(flagged, defect), "frames": len(recs)}


def run_camera(items, models: Path, out: Path, fps: float, extra: list[str], during=None) -> dict:
    """The line: `items` sent once by an MJPEG camera at `fps` into `adtr run --model MODELS/<name>` (`--max-frames`
    all of them); `during()` is called once a third has been sent. Returns the records and what was sent."""
    cam = MjpegCamera([jpeg(im) for _, im, _ in items], fps, loop=False)
    cmd = [*CLI, "run", "--model", str(models), "--source", cam.url, "--out", str(out)]
    service = subprocess.Popen(
        [*cmd, "--max-frames", str(len(items)), "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    print("$ adtr " + " ".join([*cmd[len(CLI) :], "--max-frames", str(len(items)), *extra]), flush=True)
    during_out = None
    try:
        while during is not None and cam.sent < len(items) // 3:
            if service.poll() is not None:
                raise SystemExit("adtr run stopped:\n" + service.communicate()[1][-3000:])
            time.sleep(0.2)
        if during is not None:
            during_out = during()
        if not cam.done.wait(len(items) / fps + 120):
            raise SystemExit("the camera did not finish sending")
        try:
            service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
    finally:
        cam.close()
        if service.poll() is None:
            service.kill()
    if service.returncode != 0:
        raise SystemExit(f"adtr run failed ({service.returncode}):\n{service.communicate()[1][-3000:]}")
    return {"records": records(out), "sent": cam.sent, "during": during_out}


def label_all(out: Path, truth: list[bool]) -> dict:
    """The operator: every kept frame labelled from the truth (the camera's frame i), as a person looking at it would."""
    from adtr_deploy.runtime.review import Review

    review = Review(out)
    counts = {"defect": 0, "false_alarm": 0, "good": 0}
    for item in review.listing(limit=100_000):
        if item["label"]:
            continue
        label = "defect" if truth[item["frame"]] else ("false_alarm" if item["kind"] == "flagged" else "good")
        review.label(item["id"], label, OPERATOR, via="api")
        counts[label] += 1
    return counts


# -- the scenario --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the deployed model's adtr-train run folder")
    p.add_argument("--category", default="brick")
    p.add_argument("--shift", default="noise-5")
    p.add_argument("--line-good", type=int, default=60)
    p.add_argument("--line-defects", type=int, default=12)
    p.add_argument("--heldout-good", type=int, default=24)
    p.add_argument("--eval-good", type=int, default=60)
    p.add_argument("--eval-defects", type=int, default=30)
    p.add_argument("--live-frames", type=int, default=120)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--image-size", type=int, default=256, help="pixels of the line's images (the demo's: 256)")
    p.add_argument("--review-sample", type=float, default=0.2)
    p.add_argument("--train-args", default="", help="extra adtr-train options for the feedback training")
    p.add_argument("--export-args", default="", help="extra adtr-export options (both exports)")
    p.add_argument("--work", type=Path, default=Path("/tmp/adtr_feedback_loop"))
    p.add_argument("--out", type=Path, default=RESULTS / "feedback_loop.json")
    args = p.parse_args(argv)
    work, cat = args.work, args.category
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.time()
    steps: dict[str, dict] = {}

    # 0. the line's images (new demo images, shifted, through the camera's JPEG): phase 1 (reviewed), held-out goods
    # for the gate, the live line of phase 2, the evaluation sets (shifted and the old light)
    line = make_set(cat, args.shift, SEEDS["line"], args.line_good, args.line_defects, args.image_size)
    write_set(make_set(cat, args.shift, SEEDS["heldout"], args.heldout_good, 0, args.image_size), work / "heldout_good")
    n_live_defects = args.live_frames // 6
    live = make_set(cat, args.shift, SEEDS["live"], args.live_frames - n_live_defects, n_live_defects, args.image_size)
    write_set(
        make_set(cat, args.shift, SEEDS["eval"], args.eval_good, args.eval_defects, args.image_size),
        work / "eval_shifted",
    )
    write_set(
        make_set(cat, "none", SEEDS["eval"], args.eval_good, args.eval_defects, args.image_size),
        work / "eval_unshifted",
    )

    # 1. the deployed model as version 1, on the shifted line, keeping flagged frames (and a sample) for review
    from adtr_deploy.runtime.modelrepo import ModelRepo

    v1, models = work / "v1_export", work / "models" / cat
    adtr("export", "--model", str(args.base), "--format", "onnx", "--out", str(v1), *args.export_args.split())
    ModelRepo(models).publish([v1 / "model.onnx", v1 / "model.json"], {"by": OPERATOR, "note": "the deployed model"})
    keep = ["--keep-frames", "flagged", "--review-sample", str(args.review_sample)]
    phase1 = run_camera(line, models, work / "run1", args.fps, keep)
    truth1 = [d for _, _, d in line]
    steps["1_deployed_on_shifted_line"] = phase_rates(phase1["records"], truth1)

    # 2. the operator labels what was kept (labels of version 1 land in OUT/review/v1)
    steps["2_labels"] = label_all(work / "run1", truth1)
    review = work / "run1" / "review" / "v1"

    # 3. feedback training from the review, export
    t0 = time.time()
    adtr(
        "train",
        "--init-from",
        str(args.base),
        "--feedback",
        str(review),
        "--out",
        str(work / "run2"),
        "--quiet",
        *args.train_args.split(),
    )
    steps["3_feedback_training"] = {"seconds": round(time.time() - t0, 1)}
    adtr(
        "export",
        "--model",
        str(work / "run2"),
        "--format",
        "onnx",
        "--out",
        str(work / "v2_export"),
        *args.export_args.split(),
    )

    # 4. the live line: the service runs version 1; once a third of the frames has passed, the candidate is gated and
    # promoted; the service takes it between two batches
    def gate() -> dict:
        done = adtr(
            "promote",
            str(work / "v2_export"),
            "--against",
            str(models),
            "--review",
            str(review),
            "--good",
            str(work / "heldout_good"),
            "--to",
            str(models),
            "--by",
            OPERATOR,
            "--json",
            str(work / "promote.json"),
            check=False,  # a refusal is a result of the scenario: recorded, and the line keeps version 1
        )
        if not (work / "promote.json").is_file():
            raise SystemExit(f"adtr promote failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return {**json.loads((work / "promote.json").read_text()), "said": done.stdout.strip().splitlines()[-1:]}

    serve = ["--serve", "127.0.0.1:0", "--serve-linger", "0", "--model-poll", "1"]
    phase2 = run_camera(live, models, work / "run_live", args.fps, serve, during=gate)
    steps["4_gate"] = phase2["during"]
    recs, truth2 = phase2["records"], [d for _, _, d in live]
    versions = [r.get("model_version") for r in recs]
    steps["4_live_swap"] = {
        "frames_sent": phase2["sent"],
        "records": len(recs),
        "frames_dropped": phase2["sent"] - len({r["frame"] for r in recs}),
        "errors": sum(r.get("status") != "ok" for r in recs),
        "records_per_version": {str(v): versions.count(v) for v in sorted(set(versions), key=str)},
        "swaps": sum(1 for a, b in zip(versions, versions[1:]) if a != b),
        "by_version": {
            str(v): phase_rates([r for r in recs if r.get("model_version") == v], truth2) for v in set(versions)
        },
    }

    # 5. both versions on fresh images of the shifted line and of the old line
    repo = ModelRepo(models)
    steps["5_evaluation"] = {
        f"v{v}": {s: evaluate(repo.folder(v), work / f"eval_{s}") for s in ("shifted", "unshifted")}
        for v in repo.versions()
    }
    result = {
        "command": command_line("feedback_loop.py", argv),
        "machine": machine(cpu=cpu_info()),
        "category": cat,
        "shift": args.shift,
        "seconds": round(time.time() - t_start, 1),
        "steps": steps,
    }
    write_result(result, args.out, markdown)
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def markdown(r: dict) -> str:
    s = r["steps"]
    ev = s["5_evaluation"]
    first, last = ev[min(ev)], ev[max(ev)]
    lines = [
        "# The operator's loop: review, ADTR+ feedback training, gate, rollout",
        "",
        f"`{r['command']}`",
        "",
        f"Category {r['category']}, line shift `{r['shift']}`; {r['machine']['cpus']} CPUs "
        f"({r['machine'].get('cpu', {}).get('model', '?')}: {', '.join(r['machine'].get('cpu', {}).get('flags', []))}), load "
        f"{r['machine']['loadavg_1m_at_end']:.2f} at the end; {r['seconds']:.0f} s in all.",
        "",
        "| step | false alarms | recall | notes |",
        "|---|---:|---:|---|",
        f"| 1. deployed model on the shifted line | {_pct(s['1_deployed_on_shifted_line']['false_alarm_rate'])} | "
        f"{_pct(s['1_deployed_on_shifted_line']['recall'])} | {s['1_deployed_on_shifted_line']['frames']} frames |",
        f"| 2. operator's labels | | | {s['2_labels']} |",
        f"| 3. feedback training | | | {s['3_feedback_training']['seconds']:.0f} s |",
        f"| 4. gate and live swap | | | {s['4_gate'].get('decision', s['4_gate'].get('stdout'))}; frames sent "
        f"{s['4_live_swap']['frames_sent']}, records {s['4_live_swap']['records']}, dropped "
        f"{s['4_live_swap']['frames_dropped']}, swaps {s['4_live_swap']['swaps']} |",
    ]
    for v, by in sorted(s["4_live_swap"]["by_version"].items()):
        lines.append(
            f"| 4. live line, version {v} | {_pct(by['false_alarm_rate'])} | {_pct(by['recall'])} | "
            f"{by['frames']} frames |"
        )
    promoted = len(ev) > 1
    for name, e in (("before (version 1)", first), ("after (promoted)", last))[: 1 + promoted]:
        for split in ("shifted", "unshifted"):
            m = e[split]
            lines.append(
                f"| 5. {name}, fresh {split} line | {_pct(m['false_alarm_rate'])} | {_pct(m['recall'])} | "
                f"AUROC {m['auroc']}, {m['good']} good / {m['defects']} defects |"
            )
    fa0, fa1 = first["shifted"]["false_alarm_rate"], last["shifted"]["false_alarm_rate"]
    goal = (
        promoted
        and fa1 <= fa0 / 2
        and last["shifted"]["recall"] >= first["shifted"]["recall"]
        and s["4_live_swap"]["frames_dropped"] == 0
    )
    lines += [
        "",
        f"Goal (false alarms at least halved at the same or better recall, 0 frames dropped): "
        f"{'met' if goal else 'not met'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
