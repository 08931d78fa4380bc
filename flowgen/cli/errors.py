"""User mistakes end in ONE clear line and a non-zero exit; bugs keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException

from flowgen.errors import UserError

__all__ = ["EXIT_USER_ERROR", "UserError", "is_user_error", "run_reporting_errors"]

EXIT_USER_ERROR = 2


def _root_cause(exc: BaseException) -> BaseException:
    """Hydra wraps errors raised by a ``_target_`` constructor; the user wants the original."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def one_line(exc: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives with the
    worker's traceback in its text; the user wants the original message, its last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def is_user_error(exc: BaseException) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(exc, UserError | ValueError | FileNotFoundError | MisconfigurationException)


def run_reporting_errors(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn``; a user error prints ``error: <one line>`` to stderr and exits with status 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - filtered just below
        cause = _root_cause(exc)
        if not is_user_error(cause):
            raise
        message = one_line(cause)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
