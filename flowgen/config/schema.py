"""Typed schemas of ``python train.py``'s configuration (Hydra structured configs).

Each YAML file of a config group names its schema first in its defaults list
(``defaults: [glow_schema, _self_]``), and ``train.yaml`` starts from ``train_schema``. Hydra
then composes onto typed nodes: a wrong type (``seed=abc``), an unknown choice
(``model.coupling=splines``), a misspelt key (``model.stpes=4``) or a bool given as ``no``
(which becomes False, not the truthy string "no") is settled at composition, naming the full
key. Range checks (``checked(...)``) are in ``flowgen/checks.py``.

The choices of the enums come from the registries of the code that uses them (e.g.
``flowgen.models.glow.PERMUTATIONS``), so a new option is one registry entry, not two.
Keys for Lightning's and wandb's own classes list the arguments flowgen's configs use plus
the common ones a user may add; anything else needs a schema field first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from flowgen.checks import (
    AT_LEAST_ONE,
    BATCHES_OR_FRACTION,
    COUNT_OR_FRACTION,
    DURATION,
    FINITE,
    NON_NEGATIVE,
    NOT_EMPTY,
    PATH_COMPONENT,
    POSITIVE,
    SEED,
    UNIT_OPEN,
    at_least,
    checked,
    closed_interval,
    each,
    half_open_interval,
    one_of,
    open_interval,
)
from flowgen.data.registry import DATASETS
from flowgen.data.splits import SPLITS
from flowgen.flows.flow_matching import OBJECTIVES
from flowgen.flows.memory import MEMORY_MODES
from flowgen.flows.ode import ODE_SOLVERS, PROBE_KINDS, TRACE_ESTIMATORS
from flowgen.flows.velocity import VELOCITY_NETS
from flowgen.models.glow import PERMUTATIONS
from flowgen.models.tarflow import INVERSE_METHODS, TARFLOW_MEMORY_MODES
from flowgen.performance import COMPILE_MODES
from flowgen.sample_quality import SAMPLE_METRICS
from flowgen.training.schedules import SCHEDULES
from flowgen.transforms import AFFINE_SCALES, TRANSFORMS

# Lightning's precision names (what Trainer(precision=...) accepts), without importing its connector
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")


def choices(name: str, values) -> type[Enum]:
    """An enum whose members are named by their values (``Coupling.affine.value == "affine"``) and
    print as them, so an interpolation such as ``glow_${data.name}`` reads ``glow_digits``."""
    enum = Enum(name, {v: v for v in values}, type=str)
    enum.__str__ = lambda self: self.value
    enum.__format__ = lambda self, spec: format(self.value, spec)
    return enum


Coupling = choices("Coupling", TRANSFORMS)
Permutation = choices("Permutation", PERMUTATIONS)
MemoryMode = choices("MemoryMode", MEMORY_MODES)
AffineScale = choices("AffineScale", AFFINE_SCALES)
InverseMethod = choices("InverseMethod", INVERSE_METHODS)
TarFlowMemoryMode = choices("TarFlowMemoryMode", TARFLOW_MEMORY_MODES)
VelocityNet = choices("VelocityNet", VELOCITY_NETS)
CNFObjective = choices("CNFObjective", OBJECTIVES)
TraceEstimator = choices("TraceEstimator", TRACE_ESTIMATORS)
ProbeKind = choices("ProbeKind", PROBE_KINDS)
ODESolver = choices("ODESolver", ODE_SOLVERS)
Schedule = choices("Schedule", SCHEDULES)
CompileMode = choices("CompileMode", COMPILE_MODES)
LrScalingRule = choices("LrScalingRule", ("none", "linear", "sqrt"))
Dataset = choices("Dataset", DATASETS)
ClipAlgorithm = choices("ClipAlgorithm", ("norm", "value"))
MonitorMode = choices("MonitorMode", ("min", "max"))
LoggingInterval = choices("LoggingInterval", ("step", "epoch"))
SampleMetric = choices("SampleMetric", SAMPLE_METRICS)

POSITIVE_FINITE = (POSITIVE, FINITE)

# ---------------------------------------------------------------- models


@dataclass
class GlowConfig:
    _target_: str = "flowgen.models.Glow"
    in_channels: int = checked(MISSING, AT_LEAST_ONE)
    image_size: int = checked(MISSING, AT_LEAST_ONE)
    scales: int = checked(3, AT_LEAST_ONE)  # L: squeeze, steps, split; 2**L must divide the image size
    steps: int = checked(32, AT_LEAST_ONE)
    hidden_channels: int = checked(512, AT_LEAST_ONE)
    coupling: Coupling = Coupling.affine
    spline_bins: int = checked(8, at_least(2))
    spline_bound: float = checked(3.0, *POSITIVE_FINITE)
    permutation: Permutation = Permutation.lu
    num_classes: int | None = checked(None, at_least(2))
    learn_top: bool = True
    learn_split_prior: bool = True
    memory: MemoryMode = MemoryMode.standard


@dataclass
class RealNVPConfig:
    _target_: str = "flowgen.models.RealNVP"
    in_channels: int = checked(MISSING, AT_LEAST_ONE)
    image_size: int = checked(MISSING, AT_LEAST_ONE)
    scales: int = checked(2, AT_LEAST_ONE)
    hidden_channels: int = checked(64, AT_LEAST_ONE)
    num_blocks: int = checked(8, NON_NEGATIVE)
    coupling: Coupling = Coupling.affine
    spline_bins: int = checked(8, at_least(2))
    spline_bound: float = checked(3.0, *POSITIVE_FINITE)
    actnorm: bool = True
    learn_prior: bool = False
    num_classes: int | None = checked(None, at_least(2))
    memory: MemoryMode = MemoryMode.standard


@dataclass
class TarFlowConfig:
    _target_: str = "flowgen.models.TarFlow"
    in_channels: int = checked(MISSING, AT_LEAST_ONE)
    image_size: int = checked(MISSING, AT_LEAST_ONE)
    patch_size: int = checked(2, AT_LEAST_ONE)
    width: int = checked(64, AT_LEAST_ONE)
    num_blocks: int = checked(4, AT_LEAST_ONE)
    layers_per_block: int = checked(2, AT_LEAST_ONE)
    num_heads: int = checked(4, AT_LEAST_ONE)
    mlp_ratio: int = checked(4, AT_LEAST_ONE)
    num_classes: int | None = checked(None, at_least(2))
    transform: Coupling = Coupling.affine
    affine_scale: AffineScale = AffineScale.exp
    spline_bins: int = checked(8, at_least(2))
    spline_bound: float = checked(3.0, *POSITIVE_FINITE)
    noise_std: float = checked(0.0, NON_NEGATIVE, FINITE)
    label_drop: float = checked(0.0, half_open_interval(0, 1))
    guidance: float = checked(0.0, FINITE)
    guidance_annealed: bool = False
    inverse_method: InverseMethod = InverseMethod.sequential
    jacobi_segments: int = checked(1, AT_LEAST_ONE)
    jacobi_max_iterations: int | None = checked(None, AT_LEAST_ONE)
    jacobi_tolerance: float = checked(1e-5, NON_NEGATIVE, FINITE)
    denoise: bool | None = None
    memory: TarFlowMemoryMode = TarFlowMemoryMode.standard


@dataclass
class CNFConfig:
    _target_: str = "flowgen.models.CNF"
    in_channels: int = checked(MISSING, AT_LEAST_ONE)
    image_size: int = checked(MISSING, AT_LEAST_ONE)
    velocity: VelocityNet = VelocityNet.unet
    width: int = checked(32, AT_LEAST_ONE)
    resolutions: int = checked(2, AT_LEAST_ONE)  # unet: the image size must divide by 2^(resolutions-1)
    blocks: int = checked(1, AT_LEAST_ONE)
    hidden: int = checked(256, AT_LEAST_ONE)
    depth: int = checked(3, AT_LEAST_ONE)
    num_classes: int | None = checked(None, at_least(2))
    label_drop: float = checked(0.0, half_open_interval(0, 1))
    objective: CNFObjective = CNFObjective.likelihood
    trace: TraceEstimator = TraceEstimator.hutchinson
    probe: ProbeKind = ProbeKind.rademacher
    probes: int = checked(1, AT_LEAST_ONE)
    eval_trace: TraceEstimator = TraceEstimator.exact
    eval_probes: int = checked(16, at_least(2))
    solver: ODESolver = ODESolver.dopri5
    rtol: float = checked(1e-5, *POSITIVE_FINITE)
    atol: float = checked(1e-5, *POSITIVE_FINITE)
    step_size: float | None = checked(None, POSITIVE, closed_interval(0, 1))
    adjoint: bool = False
    kinetic_energy: float = checked(0.0, NON_NEGATIVE, FINITE)
    jacobian_norm: float = checked(0.0, NON_NEGATIVE, FINITE)
    data_scale: float = checked(1.0, *POSITIVE_FINITE)


# ---------------------------------------------------------------- data, dequantization, optimizer


@dataclass
class DataConfig:
    _target_: str = "flowgen.data.ImageDataModule"
    name: Dataset = MISSING
    root: str = MISSING
    path: str | None = None  # data=folder: the image directory (required there: the data module checks it)
    image_size: int = checked(MISSING, AT_LEAST_ONE)
    channels: int = checked(MISSING, one_of((1, 3)))
    n_bits: int | None = checked(None, closed_interval(1, 8))
    num_levels: int | None = checked(None, at_least(2))
    num_classes: int | None = checked(None, at_least(2))
    batch_size: int = checked(64, AT_LEAST_ONE)
    eval_batch_size: int | None = checked(None, AT_LEAST_ONE)
    num_workers: int = checked(0, NON_NEGATIVE)
    pin_memory: bool = False
    hflip: bool = False
    val_size: Any = checked(0, COUNT_OR_FRACTION)
    split_seed: int = 0
    download: bool = True
    max_items: int | None = checked(None, AT_LEAST_ONE)


@dataclass
class UniformDequantizationConfig:
    _target_: str = "flowgen.dequantization.UniformDequantization"
    noise_std: float = checked(0.0, NON_NEGATIVE, FINITE)


@dataclass
class VariationalDequantizationConfig:
    _target_: str = "flowgen.dequantization.VariationalDequantization"
    channels: int = checked(MISSING, AT_LEAST_ONE)
    hidden_channels: int = checked(32, AT_LEAST_ONE)
    num_couplings: int = checked(4, AT_LEAST_ONE)
    feature_channels: int = checked(16, AT_LEAST_ONE)
    num_blocks: int = checked(1, AT_LEAST_ONE)


@dataclass
class OptimizerConfig:
    """Any torch.optim class taking lr, betas, eps and weight_decay (Adam, Adamax, AdamW ...)."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = checked(1e-3, *POSITIVE_FINITE)
    betas: list[float] = checked(None, each(half_open_interval(0, 1)), factory=lambda: [0.9, 0.999])
    eps: float = checked(1e-8, *POSITIVE_FINITE)
    weight_decay: float = checked(0.0, NON_NEGATIVE, FINITE)
    # glob patterns of the parameter names weight_decay applies to (the rest get none); null = every parameter
    weight_decay_params: list[str] | None = checked(None, NOT_EMPTY)


# ---------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """lightning.pytorch.Trainer's arguments (the ones flowgen's configs set and the usual additions)."""

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str | None = None
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: Any = 1  # an int, "auto", or a list of device indices
    num_nodes: int = checked(1, AT_LEAST_ONE)
    precision: str = checked("32-true", one_of(PRECISIONS))
    min_epochs: int | None = checked(None, NON_NEGATIVE)
    max_epochs: int | None = checked(None, at_least(-1))
    min_steps: int | None = checked(None, at_least(-1))
    max_steps: int = checked(-1, at_least(-1))
    max_time: str | None = checked(None, DURATION)  # "DD:HH:MM:SS"
    gradient_clip_val: float | None = checked(None, NON_NEGATIVE, FINITE)
    gradient_clip_algorithm: ClipAlgorithm | None = None
    accumulate_grad_batches: int = checked(1, AT_LEAST_ONE)
    check_val_every_n_epoch: int | None = checked(1, AT_LEAST_ONE)
    limit_train_batches: Any = checked(None, BATCHES_OR_FRACTION)
    limit_val_batches: Any = checked(None, BATCHES_OR_FRACTION)
    limit_test_batches: Any = checked(None, BATCHES_OR_FRACTION)
    val_check_interval: Any = checked(None, BATCHES_OR_FRACTION, POSITIVE)
    overfit_batches: Any = checked(0.0, BATCHES_OR_FRACTION)
    log_every_n_steps: int | None = checked(None, AT_LEAST_ONE)
    num_sanity_val_steps: int | None = checked(None, at_least(-1))
    deterministic: Any = None  # true, false or "warn"
    benchmark: bool | None = None
    sync_batchnorm: bool = False
    fast_dev_run: Any = False
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    detect_anomaly: bool = False
    profiler: str | None = None
    reload_dataloaders_every_n_epochs: int = checked(0, NON_NEGATIVE)


# ---------------------------------------------------------------- loggers


@dataclass
class CSVLoggerConfig:
    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = MISSING
    name: str | None = "csv"
    version: Any = None
    prefix: str = ""
    flush_logs_every_n_steps: int = checked(100, AT_LEAST_ONE)


@dataclass
class TensorBoardLoggerConfig:
    _target_: str = "lightning.pytorch.loggers.TensorBoardLogger"
    save_dir: str = MISSING
    name: str | None = "tensorboard"
    version: Any = None
    default_hp_metric: bool = False
    log_graph: bool = False
    prefix: str = ""


@dataclass
class WandbLoggerConfig:
    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    project: str | None = "flowgen"
    name: str | None = None
    save_dir: str = MISSING
    offline: bool = False
    id: str | None = None
    log_model: Any = False  # false, true or "all"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    entity: str | None = None
    notes: str | None = None
    job_type: str | None = None
    prefix: str = ""
    quiet: bool = True  # flowgen's, not wandb.init's: wandb's own start-up and end-of-run summary lines off


# ---------------------------------------------------------------- callbacks


@dataclass
class ModelCheckpointConfig:
    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str | None = None
    filename: str | None = None
    monitor: str | None = None
    mode: MonitorMode = MonitorMode.min
    save_last: Any = None  # true, false or "link"
    save_top_k: int = checked(1, at_least(-1))
    save_weights_only: bool = False
    every_n_train_steps: int | None = checked(None, NON_NEGATIVE)
    every_n_epochs: int | None = checked(None, NON_NEGATIVE)
    save_on_train_epoch_end: bool | None = None
    auto_insert_metric_name: bool = True
    verbose: bool = False


@dataclass
class SampleGridConfig:
    _target_: str = "flowgen.training.samples.SampleGrid"
    dirpath: str = MISSING
    every_n_steps: int = checked(500, AT_LEAST_ONE)
    temperatures: list[float] = checked(None, NOT_EMPTY, each(FINITE), each(at_least(0)),
                                        factory=lambda: [0.5, 0.7, 0.8, 0.9, 1.0])
    num_per_row: int = checked(8, AT_LEAST_ONE)
    seed: int = 0


@dataclass
class NonFiniteGuardConfig:
    _target_: str = "flowgen.training.NonFiniteGuard"
    max_consecutive: int = checked(20, AT_LEAST_ONE)


@dataclass
class InvertibilityMonitorConfig:
    _target_: str = "flowgen.training.InvertibilityMonitor"
    every_n_steps: int = checked(500, AT_LEAST_ONE)
    threshold: float = checked(1e-3, *POSITIVE_FINITE)
    num_images: int = checked(16, AT_LEAST_ONE)


@dataclass
class DiagnosticsConfig:
    _target_: str = "flowgen.training.diagnostics.FlowDiagnostics"
    every_n_steps: int = checked(100, AT_LEAST_ONE)
    num_images: int = checked(32, AT_LEAST_ONE)
    seed: int = 0


@dataclass
class SampleQualitySettings:
    """What a FID/KID measurement (flowgen/sample_quality.py) takes wherever it runs: evaluate.py's ``fid.*``
    (tool_schemas.SampleQualityConfig) and the training callback's ``callbacks.fid`` (below)."""

    temperature: float = checked(1.0, FINITE, NON_NEGATIVE)
    batch_size: int = checked(100, AT_LEAST_ONE)
    seed: int = 0
    weights: str | None = None  # the Inception weights file; null = the torch hub cache (downloaded once)
    kid_subsets: int = checked(100, AT_LEAST_ONE)
    kid_subset_size: int = checked(1000, at_least(2))


@dataclass
class SampleQualityMonitorConfig(SampleQualitySettings):
    _target_: str = "flowgen.training.sample_quality.SampleQualityMonitor"
    every_n_steps: int = checked(5000, AT_LEAST_ONE)
    metrics: list[SampleMetric] = checked(None, NOT_EMPTY, factory=lambda: ["fid"])
    num_samples: int = checked(1000, at_least(2))
    split: str = checked("val", one_of(SPLITS))
    max_real: int | None = checked(5000, at_least(2))  # null = the whole split


@dataclass
class RankSyncCheckConfig:
    _target_: str = "flowgen.training.rank_sync.RankSyncCheck"
    every_n_steps: int = checked(1000, NON_NEGATIVE)


@dataclass
class PreemptionConfig:
    _target_: str = "flowgen.training.preemption.PreemptionCheckpoint"
    signal: str = "USR2"  # a signal name (USR2, SIGUSR1, TERM ...) or number
    check_every_n_steps: int = checked(10, AT_LEAST_ONE)
    exit_code: int = checked(3, closed_interval(1, 255))


@dataclass
class LearningRateMonitorConfig:
    _target_: str = "lightning.pytorch.callbacks.LearningRateMonitor"
    logging_interval: LoggingInterval | None = None
    log_momentum: bool = False


@dataclass
class RichProgressBarConfig:
    _target_: str = "lightning.pytorch.callbacks.RichProgressBar"
    refresh_rate: int = checked(1, NON_NEGATIVE)
    leave: bool = False


# ---------------------------------------------------------------- the whole run


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class LrScalingConfig:
    rule: LrScalingRule = LrScalingRule.none
    base_batch_size: int = checked(MISSING, AT_LEAST_ONE)


@dataclass
class SchedulerConfig:
    warmup_steps: int = checked(200, NON_NEGATIVE)
    schedule: Schedule = Schedule.constant
    min_lr_ratio: float = checked(0.0, closed_interval(0, 1))


@dataclass
class EvaluationConfig:
    num_samples: int = checked(1, AT_LEAST_ONE)
    seed: int = 0


@dataclass
class PreprocessingConfig:
    """The map between dequantized pixels and the flow (flowgen/likelihood.py): logit_alpha = α of RealNVP's
    z = logit(α + (1 - 2α)·p), p ∈ [0, 1); null = the flow models the pixels themselves."""

    logit_alpha: float | None = checked(None, open_interval(0, 0.5))


@dataclass
class PerformanceConfig:
    channels_last: bool = True
    compile: CompileMode = CompileMode.none
    keep_freed_cpu_memory: bool = False


@dataclass
class TrainConfig:
    task_name: str = "train"
    run_name: str | None = checked(None, PATH_COMPONENT)
    ckpt_path: str | None = None
    overwrite: bool = False
    seed: int = checked(1234, SEED)
    train: bool = True
    test: bool = True
    lr_scaling: LrScalingConfig = field(default_factory=LrScalingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    ema_decay: float | None = checked(None, UNIT_OPEN)
    # config groups: each choice's file brings its own schema (registered below)
    data: Any = MISSING
    model: Any = MISSING
    dequantization: Any = MISSING
    optimizer: Any = MISSING
    trainer: Any = MISSING
    paths: Any = MISSING
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any] | None = None


# (group, name, schema): the name is what a YAML file lists in its defaults
GROUP_SCHEMAS = [
    ("model", "glow_schema", GlowConfig),
    ("model", "realnvp_schema", RealNVPConfig),
    ("model", "tarflow_schema", TarFlowConfig),
    ("model", "cnf_schema", CNFConfig),
    ("data", "data_schema", DataConfig),
    ("dequantization", "uniform_schema", UniformDequantizationConfig),
    ("dequantization", "variational_schema", VariationalDequantizationConfig),
    ("optimizer", "optimizer_schema", OptimizerConfig),
    ("trainer", "trainer_schema", TrainerConfig),
    ("paths", "paths_schema", PathsConfig),
]
# callbacks and loggers: one file per entry, whose content sits under its own name (callbacks.samples ...)
ENTRY_SCHEMAS = [
    ("logger", "csv", CSVLoggerConfig),
    ("logger", "tensorboard", TensorBoardLoggerConfig),
    ("logger", "wandb", WandbLoggerConfig),
    ("callbacks", "model_checkpoint", ModelCheckpointConfig),
    ("callbacks", "samples", SampleGridConfig),
    ("callbacks", "nan_guard", NonFiniteGuardConfig),
    ("callbacks", "invertibility_monitor", InvertibilityMonitorConfig),
    ("callbacks", "diagnostics", DiagnosticsConfig),
    ("callbacks", "fid", SampleQualityMonitorConfig),
    ("callbacks", "rank_sync_check", RankSyncCheckConfig),
    ("callbacks", "preemption", PreemptionConfig),
    ("callbacks", "lr_monitor", LearningRateMonitorConfig),
    ("callbacks", "rich_progress_bar", RichProgressBarConfig),
]


def register(store: ConfigStore | None = None) -> None:
    """Put every schema in Hydra's ConfigStore (idempotent)."""
    store = store or ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for group, name, schema in GROUP_SCHEMAS:
        store.store(group=group, name=name, node=schema)
    for group, entry, schema in ENTRY_SCHEMAS:
        store.store(group=group, name=f"{entry}_schema", node={entry: schema})
