"""The two ways a dataset on disk can let a user down: missing files, or unreadable ones.

Both messages are ONE line that names the place to look and the fix, because the CLI prints
``str(error)`` and nothing else (see DESIGN.md, "Errors").
"""

from __future__ import annotations

from pathlib import Path

from flowgen.errors import UserError, one_line


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not where they should be (and could not be downloaded)."""


class DatasetCorruptError(UserError, ValueError):
    """A dataset file exists but cannot be read: truncated, corrupt, or of the wrong format."""


def not_found(
    name: str,
    root: Path,
    folder: str,
    expected: str,
    *,
    can_download: bool,
    reason: str | None = None,
) -> DatasetNotFoundError:
    """The one-line error for files missing from ``root/folder``.

    ``expected`` lists what should be there; ``reason`` says why a download attempt failed.
    """
    what = f"{name} files not found in {root / folder} (expected {expected})"
    fix = f"place the files there or set data.root=<the directory that holds {folder}/>"
    if reason is not None:
        what += f" and the download failed ({reason})"
        fix += " or retry data.download=true with internet access"
    elif can_download:
        fix += " or set data.download=true (needs internet)"
    return DatasetNotFoundError(f"{what}: {fix}")


def corrupt(name: str, file: Path | str, exc: BaseException) -> DatasetCorruptError:
    """The one-line error for a file that is present but unreadable."""
    return DatasetCorruptError(
        f"{name}: cannot read {file} ({type(exc).__name__}: {one_line(exc, 200)}); "
        "the file is corrupt or of the wrong format: delete it and download or copy it again"
    )
