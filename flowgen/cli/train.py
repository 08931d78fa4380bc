"""``python train.py``: build everything from the composed config, train, test, report."""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import sys
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from flowgen.build import build_module
from flowgen.checkpoints.legacy import upgrade_state_dict
from flowgen.checkpoints.reading import check_state_matches, load_checkpoint
from flowgen.checkpoints.run_dir import CONFIG_FILE
from flowgen.checkpoints.writing import AtomicCheckpointIO, remove_partial_files
from flowgen.checks import validated
from flowgen.cli.errors import UserError, one_line
from flowgen.cli.loggers import build_loggers
from flowgen.cli.resume import command_line_overrides, compose_defaults, plan_run
from flowgen.cli.run_files import remove_unused_run_dir
from flowgen.cli.run_lock import RunLock, describe_owner
from flowgen.cli.sweeps import in_multirun, sweep_objective
from flowgen.performance import keep_freed_cpu_memory
from flowgen.training import FlowModule, NonFiniteStepsError, NonFiniteWeightsError
from flowgen.training.final_checkpoint import FinalStepCheckpoint
from flowgen.training.stop_signals import StopOnSignal


def _check_labels(cfg: DictConfig, datamodule) -> None:
    wanted = cfg.model.get("num_classes")
    if wanted and not datamodule.num_classes:
        raise UserError(f"model.num_classes={wanted} needs a labelled dataset, but data={cfg.data.name} has no labels")
    if wanted and datamodule.num_classes and wanted != datamodule.num_classes:
        raise UserError(f"model.num_classes={wanted} but data={cfg.data.name} has {datamodule.num_classes} classes; "
                        "set model.num_classes=${data.num_classes}")


def _plugins() -> list:
    """Atomic checkpoint writes; under SLURM, Lightning's own SIGUSR1 auto-requeue is off because
    flowgen.training.preemption (with submitit, or the sbatch script) owns preemption."""
    plugins: list = [AtomicCheckpointIO()]
    # as Lightning does: an interactive SLURM shell (salloc/srun --pty bash) is not a SLURM launch
    if SLURMEnvironment.detect() and SLURMEnvironment.job_name() not in ("bash", "interactive"):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def scaled_learning_rate(lr: float, global_batch: int, base_batch_size: int, rule: str) -> float:
    """The learning rate for ``global_batch`` from ``lr`` tuned at ``base_batch_size``:
    ``none`` keeps it, ``linear`` multiplies it by global/base (Goyal et al. 2017), ``sqrt`` by its square root."""
    if base_batch_size < 1:
        raise UserError(f"lr_scaling.base_batch_size={base_batch_size} must be >= 1")
    ratio = global_batch / base_batch_size
    factors = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    if rule not in factors:
        raise UserError(f"lr_scaling.rule={rule} is not one of {', '.join(factors)}")
    return lr * factors[rule]


def _global_batch_and_lr(cfg: DictConfig, trainer: L.Trainer, module: FlowModule) -> None:
    """Work out the global batch and the learning rate for it; print both on rank 0."""
    per_device = cfg.data.batch_size
    devices, nodes = trainer.num_devices, trainer.num_nodes
    accumulate = trainer.accumulate_grad_batches
    total = per_device * devices * nodes * accumulate
    scaling = cfg.get("lr_scaling") or {}
    rule, base = scaling.get("rule", "none"), scaling.get("base_batch_size", per_device)
    lr = cfg.optimizer.get("lr")
    scaled = scaled_learning_rate(lr, total, base, rule) if lr is not None else None
    if scaled is not None and scaled != lr:
        module.optimizer_factory = partial(module.optimizer_factory, lr=scaled)
    how = "as given" if rule == "none" else f"{rule} scaling of optimizer.lr={lr} from batch {base}"
    if trainer.is_global_zero:
        print(f"global batch {total} = {per_device} per device x {devices} devices x {nodes} nodes x "
              f"{accumulate} accumulation; learning rate {scaled} ({how}; lr_scaling.rule=none|linear|sqrt)",
              flush=True)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it oneDNN emulates bf16."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _warn_slow_precision(trainer: L.Trainer) -> None:
    if str(trainer.precision) == "bf16-mixed" and trainer.strategy.root_device.type == "cpu" \
            and not cpu_has_fast_bf16() and trainer.is_global_zero:
        print(f"note: this CPU has no bf16 arithmetic (capability {torch.backends.cpu.get_cpu_capability()}, no "
              "AVX512-BF16/AMX): bf16-mixed runs its convolutions emulated, several times slower than 32-true",
              flush=True)


def train(cfg: DictConfig) -> float | None:
    """Train (and test) as configured; returns the best ``val/bpd`` (the metric sweeps minimise).

    The configuration is checked first (flowgen/config), then the run is planned: a fresh run in
    the directory Hydra made, or a resumed run in its own directory with its own saved
    configuration (flowgen/cli/resume.py). The run directory is locked for the life of the run
    (flowgen/cli/run_lock.py), and a directory that an early error left empty is removed.
    """
    new_dir = Path(cfg.paths.output_dir)
    with _removed_if_unused(new_dir):
        cfg = validated(cfg)
        _check_precision(cfg)
        _check_trains_something(cfg)
        plan = plan_run(cfg, command_line_overrides(), defaults=compose_defaults)
        if plan.run_dir.resolve() != new_dir.resolve():
            remove_unused_run_dir(new_dir)  # a resume continues elsewhere: the new directory stays unused
        with RunLock(plan.run_dir) if launching_process() else contextlib.nullcontext() as lock:
            if lock is not None and lock.taken_over:
                print(f"took over the lock of {describe_owner(lock.taken_over)}, which is no longer running",
                      flush=True)
            return _train_run(plan.cfg, plan.run_dir, plan.ckpt)


def resume_command(run_dir: Path) -> str:
    """The command that continues this run, as the user started it (``python train.py`` or a path to it),
    quoted for the shell and for Hydra's override parser."""
    value = str(run_dir)
    if not re.fullmatch(r"[\w./+-]+", value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"python {shlex.quote(sys.argv[0] or 'train.py')} {shlex.quote(f'ckpt_path={value}')}"


def _check_trains_something(cfg: DictConfig) -> None:
    """A run that would train no step: a typo more often than a wish (train=false tests a checkpoint)."""
    if not cfg.get("train", True):
        return
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if cfg.trainer.get(key) == 0:
            raise UserError(f"trainer.{key}=0 trains nothing; give it a positive value (-1 or null: no limit), "
                            "or train=false to only test a checkpoint")


def _check_precision(cfg: DictConfig) -> None:
    """Lightning runs fp16 on a CPU as bf16 with only a warning; the run's config would then say what did not run."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and str(cfg.trainer.get("precision")) in ("16-mixed", "16", "16-true"):
        raise UserError(f"trainer.precision={cfg.trainer.precision} needs a CUDA GPU (fp16 has no CPU kernels); "
                        "on the CPU use trainer.precision=bf16-mixed or 32-true")


def launching_process() -> bool:
    """The process that owns the run: global rank 0 (Lightning's DDP workers and SLURM's other tasks are not)."""
    return rank_zero_only.rank == 0


@contextlib.contextmanager
def _removed_if_unused(run_dir: Path):
    """On an error before the run wrote anything, leave no empty run directory behind."""
    try:
        yield
    except BaseException:
        remove_unused_run_dir(run_dir)
        raise


def _train_run(cfg: DictConfig, run_dir: Path, ckpt: Path | None) -> float | None:
    """Train (and test) in ``run_dir``, continuing from ``ckpt`` when given."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    if OmegaConf.select(cfg, "performance.keep_freed_cpu_memory", default=False):
        keep_freed_cpu_memory(True)  # process-wide; false leaves glibc as it is

    datamodule = instantiate(cfg.data)
    datamodule.shuffle_seed = cfg.seed  # the training order follows the run's seed, and resumes with it
    _check_labels(cfg, datamodule)
    module = build_module(cfg, datamodule.num_levels)
    if ckpt is not None:  # a readable, safe checkpoint of this architecture, before Lightning loads it
        state = load_checkpoint(ckpt, mmap=True)["state_dict"]
        check_state_matches(upgrade_state_dict(state, module.state_dict()), module, ckpt)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks.append(StopOnSignal(resume_command=resume_command(run_dir)))  # Ctrl-C, kill
    checkpointing = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.save_last]
    # the final step, also inside an epoch: val/bpd (the sweep objective) and then last.ckpt
    callbacks.append(FinalStepCheckpoint(checkpointing[0] if checkpointing else None))
    loggers = build_loggers(cfg.get("logger"), run_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=_plugins())

    if trainer.is_global_zero:
        datamodule.prepare_data()  # missing files are a one-line error before anything is written here
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    _global_batch_and_lr(cfg, trainer, module)
    _warn_slow_precision(trainer)
    if ckpt is not None and trainer.is_global_zero:
        print(f"resuming from {ckpt}", flush=True)
        for leftover in remove_partial_files(ckpt.parent):
            print(f"removed {leftover.name}, a checkpoint write that was cut short", flush=True)
    # the data module, not the data loader, carries the position in the epoch (flowgen/data/sampler.py)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # FlowModule checks pixels on the host before the transfer (its hook is meant to win over the data module's)
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")

    diverged = _fit(trainer, module, datamodule, ckpt) if cfg.get("train", True) else None
    val_bpd = test_bpd = None
    best = ""
    if diverged is None:
        val_bpd = _metric(trainer, "val/bpd")
        checkpoint_cb = trainer.checkpoint_callback
        best = getattr(checkpoint_cb, "best_model_path", "") if checkpoint_cb else ""
        if best and getattr(checkpoint_cb, "best_model_score", None) is not None:
            val_bpd = float(checkpoint_cb.best_model_score)

        if cfg.get("test", False):
            trainer.test(module, datamodule=datamodule, ckpt_path=best or (None if cfg.get("train", True) else ckpt),
                         weights_only=True)
            test_bpd = _metric(trainer, "test/bpd")

    if trainer.is_global_zero:
        _summary(run_dir, trainer, val_bpd, test_bpd, best)
    if not in_multirun():
        return val_bpd
    return sweep_objective(trainer, run_dir, val_bpd, test_bpd, diverged)


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _summary(run_dir: Path, trainer: L.Trainer, val_bpd, test_bpd, best: str) -> None:
    def fmt(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"

    samples = sorted((run_dir / "samples").glob("*.png"))
    lines = [
        f"run directory: {run_dir}",
        f"  steps: {trainer.global_step}, epochs: {trainer.current_epoch}",
        f"  val/bpd (best): {fmt(val_bpd)}   test/bpd: {fmt(test_bpd)}",
        f"  checkpoints: {run_dir / 'checkpoints'}" + (f" (best: {Path(best).name})" if best else ""),
        f"  samples: {samples[-1] if samples else 'none'}",
        f"  config: {run_dir / CONFIG_FILE}",
    ]
    print("\n".join(lines), flush=True)


def _fit(trainer: L.Trainer, module: FlowModule, datamodule, ckpt: Path | None) -> str | None:
    """``trainer.fit``. In a sweep, a trial that diverged (the NaN guard's stop, non-finite weights)
    returns the one-line reason instead of raising; any other error still ends the sweep."""
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle and run
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except (NonFiniteStepsError, NonFiniteWeightsError) as exc:
        if not in_multirun():
            raise
        return one_line(exc)
    return None
