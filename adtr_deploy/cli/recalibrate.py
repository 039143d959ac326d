"""`adtr recalibrate`: a new calibration for an exported model from frames an operator confirms as good (torch-free).

Only click is imported at module level; the runtime (ONNX Runtime, OpenCV) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from adtr_deploy.cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    required=True,
    type=click.Path(path_type=Path),
    help="The export folder, its model.json or the model file (model.onnx); model.json beside it is rewritten.",
)
@click.option(
    "--images",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder (recursive) of frames from the line that you confirm as good parts; at least 20.",
)
@click.option("--by", default=None, help="Who confirmed the frames, recorded in model.json. Default: the login name.")
@click.option(
    "--allow-flagged",
    is_flag=True,
    help="Accept frames that stand out as flagged parts (above the current threshold and more than 5 robust sigmas "
    "above the other frames' median); refused otherwise.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] or tensorrt[:N] to score the frames.")
@user_errors
def command(model: Path, images: Path, by: str | None, allow_flagged: bool, device: str) -> None:
    """Recalibrate an exported model from frames confirmed as good: the model scores them, a new calibration (mean,
    std, threshold = mean + 3 std and above every frame) is written to model.json atomically, the previous calibration
    is kept in extra.calibration_history, and extra.calibration_record says when, by whom, from how many frames and
    for which model file (sha256). A running adtr-run picks it up when restarted (or use POST /api/recalibrate).

    \b
    Example, after a lamp change made every part drift (the live view said DRIFT):
      adtr recalibrate --model export/ --images confirmed_good/ --by "J. Doe"
    """
    from adtr_deploy.runtime.recalibrate import recalibrate_export

    old, new, path = recalibrate_export(model, images, by=by, allow_flagged=allow_flagged, device=device)
    rec = new.extra["calibration_record"]
    o, n = old.calibration, new.calibration
    click.echo(
        f"{path}: calibration version {rec['version']} from {rec['frames']} frames by {rec['by']}: threshold "
        f"{o.threshold:.6g} -> {n.threshold:.6g} (good mean {o.score_mean:.6g} -> {n.score_mean:.6g}, "
        f"std {o.score_std:.6g} -> {n.score_std:.6g}); the previous calibration is kept in extra.calibration_history."
    )
