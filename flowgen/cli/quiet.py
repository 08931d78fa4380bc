"""A quiet start: silence the third-party notices that every flowgen run would otherwise print.

Each notice is matched by its own text on the exact channel its library emits it through, so
every other warning and log record of the same library still comes through:

- Lightning's adverts, ``💡 Tip: For seamless cloud logging ... [litlogger]`` (printed by every
  ``Trainer`` without a LitLogger) and ``💡 Tip: For seamless cloud uploads ... [litmodels]``
  (when Lightning adds its own checkpoint callback). They are ``rank_zero_info`` records on
  the ``lightning.pytorch.utilities.rank_zero`` logger (``lightning.fabric.utilities.rank_zero``
  and ``lightning_utilities.core.rank_zero`` before ``lightning.pytorch`` is imported), so a
  ``logging.Filter`` on those loggers drops them.
- The ``isinstance(treespec, LeafSpec)`` deprecation: a ``FutureWarning`` that torch raises
  when Lightning's own ``lightning/pytorch/utilities/_pytree.py`` builds a ``LeafSpec``; nothing
  a flowgen user can change. Ignored only when Lightning's module is the caller.
- ``ModelCheckpoint(monitor='val/bpd') could not find the monitored key``: a ``UserWarning``
  when training stops between validations (``trainer.max_steps`` mid-epoch, ``debug=fast``),
  before ``val/bpd`` exists; the best checkpoint is simply chosen at the next validation.
  Only ``val/bpd`` (the key flowgen logs) is silenced: a misspelt ``monitor`` still warns.
- ``Checkpoint directory ... exists and is not empty``: a ``UserWarning`` on every resume.
  flowgen already refuses a new run in a directory that holds checkpoints (``overwrite=true``
  to start over), so in a flowgen run the directory is only non-empty when that is intended.

Handled elsewhere, at their own source: wandb's ``The anonymous setting has no effect`` warning
(``flowgen/cli/loggers.py`` stops passing that setting) and wandb's closing lines with raw ANSI
colour codes (``loggers.finish_wandb_run``: a run finished from Python goes through wandb's
terminal check; the ``wandb-core`` service that finishes it otherwise always writes colours).
rich (Lightning's progress bar and model summary, evaluate.py's tables) needs nothing: when
stdout is not a terminal it writes no escape codes (unless ``FORCE_COLOR`` or ``TTY_COMPATIBLE``
ask for them) and no live redraw, only each bar's final state, once.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_third_party_notices"]

# Lightning's rank_zero_info goes to lightning_utilities' module-level logger, which Lightning
# re-points at its own named logger on import; filter every logger it can be.
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
_LIGHTNING_ADVERT = re.compile(r"\W*Tip: For seamless cloud .*\[(litlogger|litmodels)\]", re.DOTALL)

# (message regex matched at the start of the text, category, module regex of the caller)
_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\."),
    (r"`ModelCheckpoint\(monitor='val/bpd'\)` could not find the monitored key", UserWarning, r"lightning\."),
    (r"Checkpoint directory .* exists and is not empty", UserWarning, r"lightning\."),
)


class _DropMatching(logging.Filter):
    """Drops the log records whose message matches ``pattern``; lets every other record pass."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


_ADVERT_FILTER = _DropMatching(_LIGHTNING_ADVERT)


def quiet_third_party_notices() -> None:
    """Install the filters described in this module's docstring. Idempotent: a second call adds
    nothing (``warnings.filterwarnings`` replaces an identical entry; ``addFilter`` skips a
    filter already present)."""
    for name in _RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_ADVERT_FILTER)
    for message, category, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
