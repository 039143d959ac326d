"""The project's error type for mistakes a user can make (a wrong path, a bad option, a foreign or damaged file).

The CLI turns a UserError into one sentence (`Error: ...`, exit 1); every other exception is a bug and keeps its
traceback. UserError derives from ValueError so code (and tests) that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message is one sentence naming what is wrong and what to do."""


class MissingExtraError(UserError):
    """A command needs an optional dependency (an extra) that this install lacks."""


def require_torch(command: str, extra: str = "train") -> None:
    """Refuse with one sentence when torch is not installed (a runtime-only install), naming the extra to install."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"{command} needs PyTorch, which this install lacks (a runtime-only install); "
            f"install it with pip install 'adtr-deploy[{extra}]'"
        ) from None
