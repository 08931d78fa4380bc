"""Unknown config choices on the command line, refused in one line before Hydra composes anything."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from flowgen.cli.errors import EXIT_USER_ERROR

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def unknown_choice(args: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """The message for the first ``group=choice`` whose choice has no config file, else None.

    Hydra reports these itself, over several lines with its search path; this says what was
    asked, what exists, and nothing else. Overrides Hydra cannot parse are left to Hydra.
    """
    candidates = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return None
    for override in overrides:
        group = override.key_or_group
        folder = config_dir / group
        if override.is_delete() or not folder.is_dir() or override.value() is None:
            continue
        value = override.value()
        choices = value if isinstance(value, list) else [value]
        available = sorted({p.stem for p in folder.glob("*.yaml")} | set(_plugin_choices(group)))
        for choice in choices:
            if isinstance(choice, str) and choice != "null" and choice not in available:
                return f"{group}={choice} is not a {group} config; choose one of {', '.join(available)}"
    return None


def _plugin_choices(group: str) -> list[str]:
    """Choices that Hydra and its plugins register for ``hydra/...`` groups (e.g. hydra/launcher=submitit_local)."""
    if not group.startswith("hydra/"):
        return []
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed hydra_plugins, which register their configs
    try:
        return [name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)]
    except OSError:  # a group no plugin registers
        return []


def refuse_unknown_choices(args: list[str] | None = None) -> None:
    """Exit with ``error: <one line>`` (status 2) when the command line names a config that does not exist."""
    message = unknown_choice(sys.argv[1:] if args is None else args)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
