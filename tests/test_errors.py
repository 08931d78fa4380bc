"""flowgen/errors.py and flowgen/cli/errors.py: a user's mistake ends in one line and exit status 2; a bug
(any other exception, a ValueError from inside a library included) keeps its traceback."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import ValidationError

from flowgen.checkpoints.reading import load_checkpoint
from flowgen.cli.errors import EXIT_USER_ERROR, is_user_error, run_reporting_errors
from flowgen.data.errors import DatasetCorruptError, DatasetNotFoundError
from flowgen.errors import InvalidValueError, UserError, one_line


@pytest.mark.parametrize("exc", [
    UserError("x"), InvalidValueError("x"), DatasetNotFoundError("x"), DatasetCorruptError("x"),
    MisconfigurationException("x"), ValidationError("x"), ConfigCompositionException("x"),
    FileNotFoundError("x"), IsADirectoryError("x")])
def test_the_users_mistakes_and_the_libraries_named_configuration_errors_are_one_line(exc):
    assert is_user_error(exc)


@pytest.mark.parametrize("exc", [ValueError("x"), TypeError("x"), RuntimeError("x"), KeyError("x"),
                                 ZeroDivisionError()])
def test_everything_else_is_a_bug(exc):
    assert not is_user_error(exc)


def test_a_user_error_exits_2_with_one_line_and_a_bug_keeps_its_traceback(capsys):
    def mistake():
        raise InvalidValueError("data.batch_size=0 must be an int and be >= 1\n(a second line)")

    def bug():
        raise ValueError("math domain error")

    with pytest.raises(SystemExit) as info:
        run_reporting_errors(mistake)
    assert info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: data.batch_size=0 must be an int and be >= 1 (a second line)\n"
    with pytest.raises(ValueError, match="math domain error"):
        run_reporting_errors(bug)


def test_invalid_values_are_still_value_errors_for_library_callers():
    with pytest.raises(ValueError):
        raise InvalidValueError("x")


def test_one_line_keeps_a_data_loader_workers_own_message_and_cuts_at_the_limit():
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\n"
                        "Original Traceback (most recent call last):\n"
                        '  File "x.py", line 1\nflowgen.data.errors.DatasetCorruptError: folder: cannot read a.png')
    assert one_line(worker) == "folder: cannot read a.png"
    assert one_line(ValueError("a " * 200), limit=20) == "a a a a a a a a a..."
    assert one_line(ValueError("")) == "ValueError"


def test_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "nothing.ckpt")
