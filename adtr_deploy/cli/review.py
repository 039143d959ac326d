"""`adtr review`: label the flagged parts a run kept (--keep-frames) from the command line, or list them (torch-free).

Only click is imported at module level; the review module loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from adtr_deploy.cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--record", "record_id", default=None, metavar="ID", help="The review id of the kept frame to label.")
@click.option(
    "--label",
    type=click.Choice(["defect", "false_alarm", "good"]),
    default=None,
    help="defect: a confirmed defect (into defect/); false_alarm or good: a good part (into good/).",
)
@click.option("--by", default=None, help="Who labels it, recorded with the label. Default: the login name.")
@click.option("--note", default=None, help="A free note recorded with the label.")
@click.option("--relabel", is_flag=True, help="Replace an earlier label of the same record (refused otherwise).")
@click.option(
    "--review-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The review folder (MVTec layout: good/, defect/, review.jsonl). Default: OUT/review.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Frames listed.")
@user_errors
def command(
    out: Path,
    record_id: str | None,
    label: str | None,
    by: str | None,
    note: str | None,
    relabel: bool,
    review_dir: Path | None,
    limit: int,
) -> None:
    """Review the frames adtr-run kept in OUT (--keep-frames flagged): without --record, list the newest with their
    review state; with --record ID --label L, label one: its original frame is copied into the review folder (good/ for
    false alarms and good samples, defect/ for defects) and one JSON line (camera, frame, time, model sha256, score,
    label, who) is appended to review.jsonl.

    \b
    Examples:
      adtr review runs/line3                                   # what can be labelled
      adtr review runs/line3 --record 20261203T051500.123Z-0001/frame_000042 --label false_alarm --by "J. Doe"
    """
    from adtr_deploy.runtime.review import Review

    review = Review(out, review_dir)
    if record_id is None:
        if label is not None:
            raise click.UsageError("--label needs --record ID (run without both to list the frames)")
        items = review.listing(limit)
        for it in items:
            state = f"{it['label']} by {it['who']}" if it["label"] else "not reviewed"
            click.echo(f"{it['id']}  {it['kind']}  score {it['normalized_score']}  {state}")
        click.echo(f"{len(items)} kept frames listed (newest first); labels go to {review.dir}.")
        return
    if label is None:
        raise click.UsageError("give --label defect, false_alarm or good")
    if by is None:
        import getpass

        by = getpass.getuser()
    entry = review.label(record_id, label, by, note=note, relabel=relabel, via="cli")
    click.echo(f"{record_id}: {label} by {entry['who']} -> {review.folder_for(entry) / entry['image']}")
