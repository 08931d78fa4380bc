"""Argument checks shared by the model builders: one ``InvalidValueError`` line that names the numbers.

The rules are those of ``flowgen.checks`` (the one module of range checks, shared with the typed
schemas); these helpers phrase them for constructor arguments.
"""

from __future__ import annotations

from flowgen.checks import AT_LEAST_ONE, integer, one_of
from flowgen.errors import InvalidValueError

POSITIVE_INT = integer(AT_LEAST_ONE)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not POSITIVE_INT.test(value):
            raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not one_of(choices).test(value):
        raise InvalidValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_image_size(image_size: int, factor: int, why: str) -> None:
    check_positive(image_size=image_size)
    if image_size % factor:
        raise InvalidValueError(
            f"image_size={image_size} is not divisible by {factor}: {why}; "
            f"use an image size that is a multiple of {factor} or fewer levels"
        )
