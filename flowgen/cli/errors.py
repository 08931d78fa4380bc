"""User mistakes end in ONE clear line and a non-zero exit; bugs keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from flowgen.cli.loggers import finish_wandb_run
from flowgen.cli.quiet import quiet_third_party_notices
from flowgen.errors import UserError, one_line

__all__ = ["EXIT_USER_ERROR", "UserError", "is_user_error", "one_line", "run_reporting_errors"]

EXIT_USER_ERROR = 2


def _root_cause(exc: BaseException) -> BaseException:
    """Hydra wraps errors raised by a ``_target_`` constructor; the user wants the original."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None and not _unknown_target(exc):
        exc = exc.__cause__
    return exc


def _unknown_target(exc: BaseException) -> bool:
    """A ``_target_`` that names no importable class: a config mistake (e.g. a misspelt callback class)."""
    return isinstance(exc, InstantiationException) and str(exc).startswith("Error locating target")


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake the user can fix, told in one line; anything else is a bug and keeps
    its traceback (a ValueError from inside torch included).

    The user's: flowgen's own ``UserError`` (its ``InvalidValueError`` and the dataset and checkpoint errors
    are kinds of it); a ``_target_`` that names no class; the named configuration errors of the libraries
    (OmegaConf's, Hydra's composition and override errors, Lightning's ``MisconfigurationException``); and
    the operating system's errors about the user's paths (an output path under a file, a file where a
    directory should be)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    named = (UserError | MisconfigurationException | OmegaConfBaseException | ConfigCompositionException
             | MissingConfigException | OverrideParseException)
    paths = FileNotFoundError | FileExistsError | NotADirectoryError | IsADirectoryError
    return _unknown_target(exc) or isinstance(exc, named | paths)


def _remove_unused_output_dir() -> None:
    """A task that stopped on a mistake before it wrote anything leaves no empty run directory behind
    (the one Hydra made for it: training, the playground, the benchmark)."""
    from hydra.core.hydra_config import HydraConfig

    from flowgen.cli.run_files import is_hydra_run_dir, remove_unused_run_dir

    if not HydraConfig.initialized():
        return
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    if output_dir and is_hydra_run_dir(Path(output_dir)):
        remove_unused_run_dir(Path(output_dir))


def run_reporting_errors(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn``; a user error prints ``error: <one line>`` to stderr and exits with status 2.

    Every entry point's task runs through here, so this is also where third-party start-up
    notices are silenced (flowgen/cli/quiet.py) and where a wandb run the task opened is finished,
    with the task's exit status, while the process can still print plainly."""
    quiet_third_party_notices()
    exit_code = 1
    try:
        result = fn(*args, **kwargs)
        exit_code = 0
        return result
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else 1
        raise
    except Exception as exc:  # noqa: BLE001 - filtered just below
        cause = _root_cause(exc)
        if not is_user_error(cause):
            raise
        message = one_line(cause)
        print(f"error: {message}", file=sys.stderr, flush=True)
        _remove_unused_output_dir()
        exit_code = EXIT_USER_ERROR
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        exit_code = None  # an interrupt is not delayed: wandb's own exit hook finishes the run
        raise
    finally:
        if exit_code is not None:
            finish_wandb_run(exit_code)
