"""Shared CLI helpers: turning the errors users can cause into one clear sentence instead of a traceback."""

from __future__ import annotations

import functools

import click

# Exception types whose message is already a sentence for the user (raised by our own code on bad input).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, RuntimeError)


def user_errors(func):
    """Decorator for click commands: expected errors become `Error: <sentence>` and exit code 1; Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted; everything written so far is complete and kept.", err=True)
            raise SystemExit(130) from None
        except USER_ERROR_TYPES as exc:
            msg = str(exc).strip() or type(exc).__name__
            raise click.ClickException(msg[0].upper() + msg[1:]) from None

    return wrapper
