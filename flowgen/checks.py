"""Range checks of configuration values and arguments: the one place that says which values make sense.

The schemas (``flowgen/config/schema.py``) give every user-facing key its type, and OmegaConf
refuses a wrong type or an unknown choice while Hydra composes. What a type cannot say (a
learning rate above 0, a decay inside (0, 1), finite temperatures, at least one accumulation
step) is attached to the schema field as a ``Check`` through ``checked(...)`` and verified by
``check_config`` once the configuration is composed. A failed check is one line naming the
full key, the value and the rule, e.g. ``optimizer.lr=0.0 must be > 0``. Library code that is called
without a configuration (the data module, the model builders) checks its arguments with the same rules
through ``require``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from flowgen.errors import InvalidValueError, UserError

CHECKS = "checks"  # the dataclass field metadata key that holds a field's checks


@dataclass(frozen=True)
class Check:
    """A rule a value must follow: ``test(value)`` is true for good values; ``rule`` completes
    the sentence "<key>=<value> ..." for the others."""

    test: Callable[[Any], bool]
    rule: str


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def greater_than(low: float) -> Check:
    return Check(lambda v: _number(v) and v > low, f"must be > {low:g}")


def at_least(low: float) -> Check:
    return Check(lambda v: _number(v) and v >= low, f"must be >= {low:g}")


def half_open_interval(low: float, high: float) -> Check:
    return Check(lambda v: _number(v) and low <= v < high, f"must be in [{low:g}, {high:g})")


def open_interval(low: float, high: float) -> Check:
    return Check(lambda v: _number(v) and low < v < high, f"must be strictly between {low:g} and {high:g}")


def closed_interval(low: float, high: float) -> Check:
    return Check(lambda v: _number(v) and low <= v <= high, f"must be in [{low:g}, {high:g}]")


def one_of(values: Sequence[Any]) -> Check:
    allowed = list(values)
    return Check(lambda v: v in allowed, f"is not one of {', '.join(map(str, allowed))}")


FINITE = Check(lambda v: _number(v) and math.isfinite(v), "must be a finite number")
POSITIVE = greater_than(0)
NON_NEGATIVE = at_least(0)
AT_LEAST_ONE = at_least(1)
UNIT_OPEN = open_interval(0, 1)
NOT_EMPTY = Check(lambda v: v is not None and len(v) > 0, "must not be empty")
PATH_COMPONENT = Check(
    lambda v: re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", str(v)) is not None,
    "must be a single directory name of letters, digits, '.', '_', '+' and '-' (not starting with '.')",
)
COUNT_OR_FRACTION = Check(
    lambda v: (_integer(v) and v >= 0) or (isinstance(v, float) and 0 <= v < 1),
    "must be a count >= 0 or a fraction in [0, 1)",
)
# Lightning's limit_*_batches / val_check_interval: a number of batches (int) or a fraction (float in [0, 1])
BATCHES_OR_FRACTION = Check(
    lambda v: (_integer(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
    "must be a number of batches (an int >= 0) or a fraction of the epoch (a float in [0, 1])",
)


SEED = Check(lambda v: _integer(v) and 0 <= v < 2**32, "must be in 0..4294967295 (numpy's seed range)")
DURATION = Check(lambda v: isinstance(v, str) and re.fullmatch(r"\d+(:\d+){0,3}", v) is not None,
                 "must be a duration DD:HH:MM:SS (e.g. 00:12:00:00 for 12 hours)")


def integer(check: Check) -> Check:
    """``check`` for an int (a bool or a float is refused)."""
    return Check(lambda v: _integer(v) and check.test(v), f"must be an int and {check.rule.removeprefix('must ')}")


def require(name: str, value: Any, *checks: Check) -> None:
    """An argument checked with the rules of its schema field: ``InvalidValueError`` naming it, the value
    and the rule, in one line."""
    for check in checks:
        if not check.test(value):
            raise InvalidValueError(f"{name}={_show(value)} {check.rule}")


def each(check: Check) -> Check:
    """The check applied to every element of a list."""
    return Check(lambda v: v is not None and all(check.test(x) for x in v), f"has an element that {check.rule}")


def checked(default: Any, *checks: Check, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field with a default and the checks its value must pass. Lists take a ``factory``
    instead (``default`` is then ignored); ``omegaconf.MISSING`` marks a value the config must set."""
    if factory is not None:
        return field(default_factory=factory, metadata={CHECKS: checks})
    return field(default=default, metadata={CHECKS: checks})


def check_config(cfg: DictConfig, prefix: str = "") -> None:
    """Verify every ``Check`` of every typed node of ``cfg`` (recursively), and that no required
    value (``???``) is left unset; raise ``UserError`` naming the first offending key."""
    schema = OmegaConf.get_type(cfg)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in cfg.keys():
        full_key = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{full_key} is required and has no value: set {full_key}=<value> on the command line")
        if fields and key not in fields:  # added with +key=...: typed sections take only their schema's keys
            known = ", ".join(f for f in fields if not f.startswith("_"))
            raise UserError(f"{full_key} is not a setting of {prefix.rstrip('.') or 'the top level'} "
                            f"({schema.__name__}); its keys are {known}")
        if OmegaConf.is_interpolation(cfg, key):
            continue  # a value taken from another key is checked there (and ${hydra:...} resolves only in a run)
        checks = fields[key].metadata.get(CHECKS, ()) if key in fields else ()
        value = cfg[key]
        for check in checks:
            if value is not None and not check.test(value):
                raise UserError(f"{full_key}={_show(value)} {check.rule}")
        if isinstance(value, DictConfig):
            check_config(value, f"{full_key}.")


def _show(value: Any) -> str:
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    return str(value) if not isinstance(value, str) else value


def validated(cfg: DictConfig) -> DictConfig:
    """``cfg`` checked (``check_config``), as a plain copy: enums become their strings, interpolations
    stay, so the code that uses it sees "affine", not ``Coupling.affine``."""
    check_config(cfg)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
