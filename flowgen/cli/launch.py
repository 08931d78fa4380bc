"""Running a Hydra entry point so that a mistake on the command line is ONE line.

Hydra prints a composition error over several lines (the message, the full key, the object
type, a hint about HYDRA_FULL_ERROR) with exit status 1. ``run_entry_point`` asks Hydra to
raise instead (HYDRA_FULL_ERROR=1, unless the user set it to see the full trace) and turns
every error that happened before the task started (a wrong type or value, an unknown key or
choice, an override Hydra cannot parse, a run directory that cannot be created) into
``error: <one line>`` and exit status 2. Errors raised by the task itself were already handled
by ``run_reporting_errors``; whatever reaches here from inside it is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from flowgen.cli.errors import EXIT_USER_ERROR
from flowgen.cli.overrides import refuse_unknown_choices
from flowgen.errors import UserError

_OURS = "FLOWGEN_SET_HYDRA_FULL_ERROR"  # marks HYDRA_FULL_ERROR as set by run_entry_point, not by the user
_TYPE_NAMES = {"Integer": "an integer", "Float": "a number", "String": "a string"}


def run_entry_point(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function the way ``python <entry>.py`` does, with one-line start-up errors."""
    refuse_unknown_choices()
    # our own setting is inherited by DDP workers and cluster jobs: only the user's asks for traces
    user_asked_for_traces = os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0") and _OURS not in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[_OURS] = "1"
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - sorted just below
        message = None if user_asked_for_traces or _raised_by_the_task(exc) else startup_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _raised_by_the_task(exc: BaseException) -> bool:
    """Whether the exception passed through the task function (run_reporting_errors wraps every task)."""
    return any(frame.name == "run_reporting_errors" for frame in traceback.extract_tb(exc.__traceback__))


def startup_error(exc: BaseException) -> str | None:
    """The one-line message for an error Hydra raised while composing or creating the run, else None."""
    reason = _user_error_in_chain(exc)
    if reason is not None:  # raised by flowgen's own code that Hydra called (a resolver)
        return " ".join(str(reason).split())
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return _config_error(cause, _override_of(exc))
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override: {_first_line(str(exc))} (syntax: key=value, group=choice, +key=value)"
    if isinstance(exc, MissingConfigException):
        return _first_line(str(exc))
    if isinstance(exc, OSError) and exc.filename:  # Hydra creating the run directory
        return (f"cannot create {exc.filename}: {exc.strerror}; set FLOWGEN_LOG_DIR (or paths.log_dir) "
                "to a directory you can write to")
    if isinstance(exc, HydraException | OmegaConfBaseException):
        return " ".join(str(cause).split())
    return None


def _user_error_in_chain(exc: BaseException) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _override_of(exc: BaseException) -> str | None:
    """``key=value`` as the user typed it, from Hydra's "Error merging override key=value"."""
    match = re.search(r"override '?([^'\n]+)'?", str(exc))
    return match.group(1).strip() if match else None


def _config_error(error: OmegaConfBaseException, override: str | None) -> str:
    key = error.full_key
    given = override or f"{key}={error.value}"
    text = _first_line(getattr(error, "msg", "") or str(error))
    if isinstance(error, ConfigAttributeError | ConfigKeyError):
        parent = getattr(error, "parent_node", None)
        keys = parent.keys() if parent is not None else []
        known = ", ".join(k for k in keys if not str(k).startswith("_") and k != "hydra")
        where = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return f"{given}: {where} has no key '{error.key}'" + (f"; its keys are {known}" if known else "")
    converted = re.search(r"could not be converted to (\w+)", text)
    if converted:
        return f"{given}: {key} must be {_TYPE_NAMES.get(converted.group(1), converted.group(1))}"
    if "is not a valid bool" in text:
        return f"{given}: {key} must be a boolean: true or false (also yes/no, on/off, 1/0)"
    choices = re.search(r"expected one of \[(.*)\]", text)
    if choices:
        return f"{given}: {key} must be one of {choices.group(1)}"
    if "does not support deletion" in text:
        return f"{given}: {key} cannot be removed (every run needs it); give it another value instead"
    if "is not a ListConfig, list or tuple" in text:
        return f"{given}: {key} must be a list, e.g. {key}=[a,b]"
    if "is not a valid input for <enum" in text:
        return f"{given}: {key} takes a single choice, not a list"
    return f"{given}: {text}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text
