"""What the entry points call: compose, build, run, report.

Owns: every entry point's body (train, resume, sample, evaluate, manipulate, OOD histogram, playground,
benchmark, device check), Hydra run directories, the run lock, sweeps' results, loggers and one-line errors.
May import: everything in flowgen. Nothing in flowgen imports it.
"""

import os
from datetime import datetime

from omegaconf import OmegaConf

from flowgen.checks import PATH_COMPONENT
from flowgen.config import schema, tool_schemas
from flowgen.errors import UserError


def _run_dir_name(name) -> str:
    """A run directory named by ``run_name`` when set (deterministic), else by the start time.
    Checked here, where Hydra builds the path, so that a bad name never creates a directory."""
    if name and not PATH_COMPONENT.test(str(name)):
        raise UserError(f"run_name={name} {PATH_COMPONENT.rule}")
    return str(name) if name else _START_TIME


# the start time to the millisecond, fixed once per process: runs started in the same second get
# directories of their own, and every later resolution of hydra.run.dir gives the same one
_START_TIME = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")[:-3]


if not OmegaConf.has_resolver("run_dir_name"):
    OmegaConf.register_new_resolver("run_dir_name", _run_dir_name)

# An environment variable that is set and not empty, else the default: ``FLOWGEN_LOG_DIR=`` must
# not put runs at the file system's root (oc.env would take the empty string).
if not OmegaConf.has_resolver("env_or"):
    OmegaConf.register_new_resolver("env_or", lambda name, default: os.environ.get(name) or default)

# The directory the command was started in (Hydra's ${hydra:runtime.cwd}, which is not set yet
# when a sweeper such as Optuna reads hydra.sweep.dir at start-up).
if not OmegaConf.has_resolver("launch_dir"):
    OmegaConf.register_new_resolver("launch_dir", os.getcwd, use_cache=True)

# the typed schemas the config files name in their defaults lists (flowgen/config/schema.py, tool_schemas.py)
schema.register()
tool_schemas.register()
