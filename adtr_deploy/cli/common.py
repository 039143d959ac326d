"""Shared CLI helpers: turning the errors users can cause into one clear sentence instead of a traceback, and the
click settings and options several commands declare alike (declared once here, applied as decorators).

Only mistakes a user can make become a sentence: adtr_deploy.errors.UserError (and its subclasses: SpecError,
BackendError, ImageDecodeError, CheckpointError, ...) and operating-system errors about files (missing, no permission,
disk full). Any other exception, a ValueError or RuntimeError from deep inside a library included, is a bug and keeps
its traceback so it can be reported and fixed.
"""

from __future__ import annotations

import functools

import click

from adtr_deploy.errors import MissingExtraError, UserError

# every command: -h as well as --help, and help text wrapped at 110 columns
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# options that mean the same in every command that has them
workers_option = click.option(
    "--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image decoding processes."
)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
tile_option = click.option(
    "--tile",
    default=None,
    metavar="SCALE[,overlap=F][,size=N][,crops=grid|random][,score_pool=N]",
    help="Train on tiles of the model's input size cut from the images at native resolution (SCALE native or 1), "
    "resized by a factor (0.5; 2 upsamples: a finer grid for defects under 8 px, 4x the tiles), with tiles covering "
    "size=N source pixels, or auto (native unless an image needs more "
    "than 64 tiles); neighbours overlap by F of a tile (0.25). Calibration and evaluation then score whole images "
    "tiled and stitched, and adtr-export / adtr-run tile the same way (model.json). crops=random trains on as many "
    "random crops instead of the grid; score_pool=N scores the stitched map's maximum N x N mean (default: the "
    "model's score_pool). See docs/train.md#large-images-small-defects-tiling.",
)


def streams_option(help: str):
    """--streams N (ONNX Runtime CPU inference streams, runtime/streams.py); `help` says what it does in this command."""
    return click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True, help=help)


def error_sentence(exc: BaseException) -> str:
    """The one-line message for a user error. Paths stay exactly as typed (no capitalisation of the first letter)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}; check the path, its permissions and the free disk space"
    msg = str(exc).strip() or type(exc).__name__
    return msg.splitlines()[0] if len(msg.splitlines()) == 1 else " ".join(line.strip() for line in msg.splitlines())


def require_torch(command: str, extra: str = "train") -> None:
    """Refuse with one sentence when torch is not installed (a runtime-only install), naming the extra to install."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"{command} needs PyTorch, which this install lacks (a runtime-only install); "
            f"install it with pip install 'adtr-deploy[{extra}]'"
        ) from None


def user_errors(func):
    """Decorator for click commands: user errors become `Error: <sentence>` and exit code 1; Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted; everything written so far is complete and kept.", err=True)
            raise SystemExit(130) from None
        except (UserError, OSError) as exc:
            raise click.ClickException(error_sentence(exc)) from None

    return wrapper
