"""`adtr promote`: the gate before rollout; a candidate that is no worse than the running model on the operator's review
and on held-out good images becomes the next version of a versioned model folder (torch-free).

Only click is imported at module level; the runtime (ONNX Runtime, OpenCV) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from adtr_deploy.cli.common import user_errors


def _count(fig: dict | None) -> str:
    if not fig:
        return "not given"
    if not fig["images"]:
        return "none"
    return f"{fig['flagged']}/{fig['images']} ({100 * fig['rate']:.0f}%)"


def _median(fig: dict | None) -> str:
    return "-" if not fig or fig["median_normalized"] is None else f"{fig['median_normalized']:.3f}"


def table(report: dict) -> list[str]:
    """current vs candidate, one line per figure."""
    cur, cand, shift = report["figures"]["current"], report["figures"]["candidate"], report["shift"]
    version = report["against"].get("version")
    rows = [
        ("", f"current{f' (v{version})' if version else ''}", "candidate"),
        ("threshold (raw score)", f"{cur['threshold']:.6g}", f"{cand['threshold']:.6g}"),
        ("confirmed defects flagged", _count(cur["defect"]), _count(cand["defect"])),
        ("reviewed good flagged", _count(cur["good"]), _count(cand["good"])),
        ("held-out good flagged", _count(cur.get("held_out")), _count(cand.get("held_out"))),
    ]
    for key, what in (("good", "reviewed good"), ("held_out", "held-out good")):
        if key in shift:
            rows.append((f"median normalized, {what}", _median(cur[key]), f"{_median(cand[key])} ({shift[key]:+.3f})"))
    lines = [f"{a:<34}{b:<18}{c}" for a, b, c in rows]
    if "held_out" not in cur:
        lines.append(
            "held-out good images: not given (--good DIR); false alarms were measured only on the reviewed parts, "
            "which a feedback candidate was trained on"
        )
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--against",
    required=True,
    type=click.Path(path_type=Path),
    help="The running model: its export folder (or model file), or the versioned folder MODELS/NAME (its active "
    "version is compared, and the candidate is published into it unless --to says otherwise).",
)
@click.option(
    "--review",
    "review_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The running model's review folder (good/, defect/, review.jsonl; adtr-run's OUT/review by default; OUT/review/v<N> when it ran version N of a versioned folder).",
)
@click.option(
    "--to",
    type=click.Path(path_type=Path),
    default=None,
    help="The versioned model folder MODELS/NAME to publish into (MODELS/NAME/<version>/); made when missing, and "
    "the running model becomes its version 1 first. Default: --against when that is a versioned folder.",
)
@click.option(
    "--good",
    "good_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of held-out good images neither model was trained on: false alarms on unseen parts.",
)
@click.option("--by", default=None, help="Who promotes, recorded in promotion.json. Default: the login name.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or tensorrt[:N] to score the images.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the comparison and the decision to this JSON file (also when refused).",
)
@user_errors
def command(
    candidate: Path,
    against: Path,
    review_dir: Path,
    to: Path | None,
    good_dir: Path | None,
    by: str | None,
    device: str,
    json_path: Path | None,
) -> None:
    """Gate an exported CANDIDATE against the running model and publish it as a new version.

    Both models score, each with its own calibrated threshold, the reviewed good parts and confirmed defects of
    --review and the held-out good images of --good. Refused, in one sentence, with exit code 1 and nothing published:
    a candidate that finds fewer confirmed defects, flags more held-out good images or more reviewed good parts than the
    running model; one with another input size, backbone, input layout or tiling; a review folder of another model, or
    a candidate trained on one (model.json extra.feedback); a review without labels or without a confirmed defect; a
    --to folder that runs another model. Ties pass. Promoted: MODELS/NAME/<version>/ with the model, model.json and
    promotion.json (figures, who, when, the review), the folder's new active version; a folder without versions first
    gets the running model as version 1, to roll back to.

    \b
    Example:
      adtr promote export_v2/ --against models/brick --review runs/line3/review/v1 --good heldout_good/ --by "J. Doe"
    """
    from adtr_deploy.fileio import write_json_atomic
    from adtr_deploy.runtime.promote import PromotionRefused, promote

    try:
        report = promote(candidate, against, review_dir, to=to, good_dir=good_dir, by=by, device=device)
    except PromotionRefused as refused:
        if "figures" in refused.report:
            for line in table(refused.report):
                click.echo(line)
        if json_path is not None:
            write_json_atomic(refused.report, json_path)
        click.echo(f"Refused: {refused}.", err=True)
        raise SystemExit(1) from None
    for line in table(report):
        click.echo(line)
    if json_path is not None:
        write_json_atomic(report, json_path)
    click.echo(report["sentence"][0].upper() + report["sentence"][1:] + ".")
