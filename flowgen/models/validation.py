"""Argument checks shared by the model builders: one clear ValueError that names the numbers."""

from __future__ import annotations


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_image_size(image_size: int, factor: int, why: str) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by {factor}: {why}; "
            f"use an image size that is a multiple of {factor} or fewer levels"
        )
