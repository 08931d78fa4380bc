"""The exception types for mistakes a user can fix, and how such a mistake is told: in one line.

The entry points (flowgen/cli/errors.py) print a ``UserError`` as ``error: <one line>`` and exit
with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line, the config, the files or the run's state that the user can fix."""


class InvalidValueError(UserError, ValueError):
    """A setting or an argument outside what it may be (a range, a choice, a shape).

    Also a ``ValueError``, so that library callers that catch the built-in type keep working."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """The error's message on one line (at most ``limit`` characters when given).

    An error raised in a DataLoader worker arrives with the worker's traceback in its text; the
    user wants the original message, its last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    text = " ".join(text.split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
