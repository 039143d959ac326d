"""The project's error type for mistakes a user can make (a wrong path, a bad option, a foreign or damaged file).

The CLI turns a UserError into one sentence (`Error: ...`, exit 1); every other exception is a bug and keeps its
traceback. UserError derives from ValueError so code (and tests) that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message is one sentence naming what is wrong and what to do."""


class MissingExtraError(UserError):
    """A command needs an optional dependency (an extra) that this install lacks."""
