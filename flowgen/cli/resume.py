"""Which run a ``python train.py`` starts or continues, in which directory, with which configuration.

A fresh run (no ``ckpt_path``) trains in the run directory Hydra made for it, with the composed
configuration. A resume (``ckpt_path=last``, a run directory, or a ``.ckpt`` file inside one)
continues THAT run: in its own directory, from its ``last.ckpt`` (or the file given), with its
own saved ``config.yaml``. What the command line says applies on top of the saved
configuration, key by key, with the values Hydra composed (so types and checks still hold):
``key=value`` / ``+key=value`` set that key, ``~key`` deletes it, ``group=choice`` replaces
that group (``logger=csv``, ``trainer=ddp``), and a global group (``debug=fast``) sets every key
it changes. Overrides that would change the architecture or the data are refused in one line
listing the keys: the checkpoint's weights and the data order belong to the saved values.

A checkpoint file outside a run directory (no ``config.yaml`` beside its ``checkpoints/``)
continues in the new run directory, from the configuration stored inside the checkpoint.
Paths inside the old run directory follow the run directory (it may have moved), and the data
directory is this machine's (``paths.data_dir``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from flowgen.checkpoints.legacy import upgrade_run_config
from flowgen.checkpoints.reading import load_checkpoint
from flowgen.checkpoints.run_dir import CHECKPOINT_DIR, CONFIG_FILE, last_checkpoint, refuse_to_overwrite, run_dir_of
from flowgen.cli.overrides import CONFIG_DIR
from flowgen.cli.sweeps import in_multirun
from flowgen.errors import UserError

# groups whose files are `# @package _global_`: they may set any key
GLOBAL_GROUPS = ("experiment", "debug", "tuned", "hparams_search")
# keys a resume cannot change: they fix the weights' shapes and meaning, or the data the run learns
FIXED_PREFIXES = ("model.", "dequantization.", "preprocessing.")
CHANGEABLE = ("model.memory",)  # how backprop stores activations: same values and gradients
FIXED_KEYS = ("data.name", "data.path", "data.image_size", "data.channels", "data.n_bits", "data.num_levels",
              "data.num_classes", "data.hflip", "data.val_size", "data.split_seed", "data.max_items",
              "optimizer._target_", "optimizer.weight_decay_params")
RUN_KEYS = ("ckpt_path", "run_name", "overwrite")  # say how to start, not what the run is


@dataclass
class RunPlan:
    """What ``train`` runs: the configuration, the run directory, and the checkpoint to continue from."""

    cfg: DictConfig
    run_dir: Path
    ckpt: Path | None

    @property
    def is_resume(self) -> bool:
        return self.ckpt is not None


def requeued_ckpt_path(ckpt_path: str | None) -> str | None:
    """A job that can be requeued resumes from its own last.ckpt: ``ckpt_path`` defaults to ``last``
    in a submitit job (SUBMITIT_EXECUTOR is set; each sweep job has its own new run directory)
    and in a SLURM job that was requeued (SLURM_RESTART_COUNT > 0), e.g. by scripts/slurm/train.sbatch."""
    if ckpt_path is not None:
        return ckpt_path
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return "last"
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        print(f"SLURM requeued this job (restart {os.environ['SLURM_RESTART_COUNT']}): ckpt_path=last", flush=True)
        return "last"
    return None


def plan_run(cfg: DictConfig, overrides: list[str], defaults: Callable[[], DictConfig] | None = None) -> RunPlan:
    """The run that ``cfg`` (composed from ``overrides``) asks for; ``defaults()`` composes the config
    with no overrides (called only when a global group such as ``debug=fast`` continues a run)."""
    new_dir = Path(cfg.paths.output_dir)
    requested = requeued_ckpt_path(cfg.get("ckpt_path") or None)
    if requested is None:
        return _fresh(cfg, new_dir)
    if str(requested) == "last" and cfg.get("ckpt_path") == "last" and not cfg.get("run_name") \
            and not in_multirun():
        raise UserError("ckpt_path=last needs run_name=<the run's name>: without one a run gets a new timestamped "
                        "directory, which holds no checkpoint; or pass the run's directory as ckpt_path")
    if str(requested) == "last":
        ckpt = last_checkpoint(new_dir)
        if ckpt is None:
            print(f"ckpt_path=last: no checkpoint in {new_dir / 'checkpoints'} yet, starting a fresh run", flush=True)
            return _fresh(cfg, new_dir)
        run_dir = new_dir
    else:
        path = Path(str(requested)).expanduser()
        if path.is_dir() and path.name == CHECKPOINT_DIR and (path.parent / CONFIG_FILE).is_file():
            path = path.parent  # <run>/checkpoints given for <run>
        if path.is_dir():
            ckpt = last_checkpoint(path)
            if ckpt is None:
                raise UserError(f"ckpt_path={requested}: the directory holds no checkpoints/last.ckpt; pass a .ckpt "
                                "file or a run directory that has one")
            run_dir = path
        elif path.is_file():
            ckpt = path
            run_dir = run_dir_of(path) if (run_dir_of(path) / CONFIG_FILE).is_file() else new_dir
        else:
            raise UserError(f"ckpt_path={requested}: no such checkpoint file or run directory")
        run_dir = _continue_or_branch(cfg, ckpt, run_dir, new_dir)
    run_dir = run_dir.resolve()
    saved = saved_config(run_dir, ckpt)
    if saved is None:  # e.g. written by another tool: the command line is all there is to go by
        print(f"note: {ckpt} carries no run configuration; continuing it with this command line's", flush=True)
        resumed = copy.deepcopy(cfg)
    else:
        resumed = continue_config(saved, cfg, overrides, defaults, run_dir)
    resumed.ckpt_path = str(ckpt)
    if cfg.get("run_name"):
        resumed.run_name = cfg.run_name  # a branch is named by its command line
    return RunPlan(cfg=resumed, run_dir=run_dir, ckpt=ckpt)


def _continue_or_branch(cfg: DictConfig, ckpt: Path, run_dir: Path, new_dir: Path) -> Path:
    """Where a resume from ``ckpt`` writes. Its own run continues in place only from its latest state
    (its last.ckpt): from an older checkpoint it would overwrite that run's newer last.ckpt. With a
    ``run_name`` of its own, the command starts a branch: a new run directory, the old run's config."""
    if run_dir == new_dir:
        return run_dir
    if cfg.get("run_name") and cfg.run_name != run_dir.name:
        if cfg.get("train", True) and not cfg.get("overwrite", False):
            refuse_to_overwrite(new_dir)
        print(f"branching run {cfg.run_name} from {ckpt} (run {run_dir.name} stays as it is)", flush=True)
        return new_dir
    last = last_checkpoint(run_dir)
    if last is not None and last.resolve() != ckpt.resolve():
        raise UserError(f"ckpt_path={ckpt} is not the latest state of run {run_dir} (that is {last}): continuing "
                        "there would overwrite it; pass run_name=<new name> to branch a new run from this checkpoint, "
                        f"or ckpt_path={run_dir} to continue the run")
    return run_dir


def _fresh(cfg: DictConfig, run_dir: Path) -> RunPlan:
    if cfg.get("train", True) and not cfg.get("overwrite", False):
        refuse_to_overwrite(run_dir)
    return RunPlan(cfg=cfg, run_dir=run_dir, ckpt=None)


def saved_config(run_dir: Path, ckpt: Path) -> dict | None:
    """The run's own configuration: its config.yaml, else the copy inside the checkpoint, else None."""
    if (run_dir / CONFIG_FILE).is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE))
        except Exception as exc:  # noqa: BLE001 - any YAML or I/O failure: the file is not usable
            raise UserError(f"{run_dir / CONFIG_FILE} cannot be read ({' '.join(str(exc).split())[:160]}); restore the "
                            "run's config.yaml, or resume from a checkpoint file (it carries its own copy)") from None
        if not isinstance(saved, dict) or "model" not in saved or "data" not in saved:
            raise UserError(f"{run_dir / CONFIG_FILE} is not a flowgen run configuration (no model and data sections)")
        return upgrade_run_config(saved)
    hparams = load_checkpoint(ckpt, mmap=True).get("hyper_parameters")
    saved = hparams.get("run_config") if isinstance(hparams, dict) else None
    return upgrade_run_config(copy.deepcopy(saved)) if isinstance(saved, dict) and saved else None


def continue_config(saved: dict, cfg: DictConfig, overrides: list[str],
                    defaults: Callable[[], DictConfig] | None, run_dir: Path) -> DictConfig:
    """``saved`` with the command line's changes applied (values from the composed ``cfg``), its paths
    moved to ``run_dir`` and this machine's data directory; refuses changes to fixed keys."""
    current = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    result = copy.deepcopy(saved)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra") or key in RUN_KEYS or key == "paths" or key.startswith("paths."):
            continue
        if (CONFIG_DIR / key).is_dir():
            if key in GLOBAL_GROUPS:
                if defaults is None:
                    raise UserError(f"{key}={override.value()} cannot be added to a resumed run here")
                base = OmegaConf.to_container(defaults(), resolve=False, enum_to_str=True)
                for changed in _changed_keys(_flatten(base), _flatten(current)):
                    _copy_key(current, result, changed)
            else:
                _copy_key(current, result, key)
        elif override.is_delete():
            _delete(result, key)
        else:
            _copy_key(current, result, key)
    _move_paths(result, saved, cfg, run_dir)
    resolved = _resolved(result)
    before, after = _flatten(saved), _flatten(resolved)
    changed = [k for k in _changed_keys(before, after) if _fixed(k)]
    replaced = {k.removesuffix("._target_") for k in changed if k.endswith("._target_")}
    changed = [k for k in changed if k.endswith("._target_") or k.rsplit(".", 1)[0] not in replaced]
    if changed:
        listed = "; ".join(f"{k}: {before.get(k, '<absent>')} -> {after.get(k, '<absent>')}" for k in changed[:6])
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(f"resuming {run_dir} cannot change the architecture or the data ({listed}{more}); "
                        "drop these overrides to continue the run, or start a new run with another run_name")
    had_ema, has_ema = saved.get("ema_decay") is not None, resolved.get("ema_decay") is not None
    if had_ema != has_ema:
        raise UserError(f"resuming {run_dir} cannot switch the EMA {'off' if had_ema else 'on'} (ema_decay: "
                        f"{saved.get('ema_decay')} -> {resolved.get('ema_decay')}): the checkpoint "
                        f"{'holds' if had_ema else 'has no'} averaged weights; another decay value is fine")
    return OmegaConf.create(result)


def _fixed(key: str) -> bool:
    if key in CHANGEABLE:
        return False
    return key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS or key in ("model", "dequantization")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changed_keys(before: dict, after: dict) -> list[str]:
    return [k for k in sorted(before.keys() | after.keys()) if before.get(k, _ABSENT) != after.get(k, _ABSENT)]


_ABSENT = object()


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _copy_key(source: dict, target: dict, key: str) -> None:
    """target[key] = source[key] (a deep copy), or delete it from target when source has none."""
    value = _lookup(source, key)
    if value is _ABSENT:
        _delete(target, key)
        return
    *parents, last = key.split(".")
    node = target
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = copy.deepcopy(value)


def _delete(tree: dict, key: str) -> None:
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def _move_paths(result: dict, saved: dict, cfg: DictConfig, run_dir: Path) -> None:
    """paths.* from this machine, output_dir = the run directory; values inside the old run
    directory or the old data directory move with them."""
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    paths["output_dir"] = str(run_dir)
    old = saved.get("paths") or {}
    moves = [(old.get("output_dir"), str(run_dir)), (old.get("data_dir"), paths["data_dir"])]
    result["paths"] = paths

    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str):
            for before, after in moves:
                if before and before != after and (value == before or value.startswith(before + "/")):
                    return after + value[len(before):]
        return value

    for key in list(result):
        if key != "paths":
            result[key] = moved(result[key])


def _resolved(tree: dict) -> dict:
    """The values the run will see (interpolations from the command line resolved)."""
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run: compare as written
        return tree


def command_line_overrides() -> list[str]:
    """The overrides this job was composed from (Hydra's ``overrides.task``); none outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def compose_defaults() -> DictConfig:
    """train.yaml composed with no overrides: what a global group such as ``debug=fast`` changes is
    the difference between it and the composed configuration."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=[])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[])
