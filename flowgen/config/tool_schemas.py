"""Typed schemas of the other entry points' configurations (Hydra structured configs).

``python sample.py``, ``evaluate.py``, ``scripts/manipulate.py``, ``scripts/ood_histogram.py``,
``scripts/playground_2d.py`` and ``scripts/benchmark.py``: each top-level YAML file names its schema
first in its defaults list (``defaults: [sample_schema, _self_, ...]``), as ``train.yaml`` names
``train_schema`` (flowgen/config/schema.py). A wrong type (``n=abc``), an unknown choice
(``mode=dream``), a misspelt key or a bool given as ``no`` (False, not the truthy string "no") is
settled at composition, naming the key; the range checks (``checked(...)``, flowgen/checks.py)
are verified by ``validated(cfg)``, the first thing each tool's task function does.

The choices of the enums come from the registries of the code that uses them
(``flowgen.sampling.SAMPLE_MODES``, ``flowgen.latents.METHODS``, ``flowgen.data.splits.SPLITS``,
``flowgen.data.densities2d.DENSITIES`` ...), so a new option is one registry entry, not two. Like
every module below ``flowgen.cli``, this one never imports ``flowgen.cli``.

``Any`` marks the few keys that genuinely take more than one type (``label``: a class or ``all``;
``attribute``: a class or a CelebA attribute name; ``csv``: a bool or a path); a check says which values.

scripts/benchmark.py composes ``train`` and adds a ``benchmark:`` section. Its schema
``BenchmarkConfig`` extends ``TrainConfig`` by that section; ``benchmark.yaml`` lists
``benchmark_schema`` right after ``train``. Merging a subclass onto the ``TrainConfig`` root retypes
the root, and the stored node leaves every inherited key ``???``, which a merge never writes over, so
nothing that ``train`` (its experiment, debug or tuned settings) composed is reset to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig

from flowgen.checkpoints.run_dir import WHICH
from flowgen.checks import (
    AT_LEAST_ONE,
    FINITE,
    NON_NEGATIVE,
    NOT_EMPTY,
    PATH_COMPONENT,
    POSITIVE,
    UNIT_OPEN,
    Check,
    at_least,
    checked,
    closed_interval,
    each,
    one_of,
)
from flowgen.config.schema import PRECISIONS, InverseMethod, ODESolver, SampleQualitySettings, TrainConfig, choices
from flowgen.data.densities2d import DENSITIES
from flowgen.data.splits import SPLITS
from flowgen.flows.flow_matching import OBJECTIVES as OBJECTIVES_2D
from flowgen.flows.vector import COUPLINGS as COUPLINGS_2D
from flowgen.flows.vector import PLAYGROUND_KINDS as FLOW_KINDS_2D
from flowgen.latents import METHODS
from flowgen.sample_quality import METRICS
from flowgen.sampling import SAMPLE_MODES

Which = choices("Which", WHICH)
Split = choices("Split", SPLITS)
SampleMode = choices("SampleMode", SAMPLE_MODES)
Interpolation = choices("Interpolation", METHODS)
Density = choices("Density", DENSITIES)
Coupling2D = choices("Coupling2D", COUPLINGS_2D)
FlowKind2D = choices("FlowKind2D", FLOW_KINDS_2D)
Objective2D = choices("Objective2D", OBJECTIVES_2D)
EvalMetric = choices("EvalMetric", METRICS)

POSITIVE_FINITE = (POSITIVE, FINITE)
TEMPERATURES = (NOT_EMPTY, each(FINITE), each(at_least(0)))
# the words of a boolean: Hydra reads only true/false as bools, so in a key typed Any (a bool or a path)
# `csv=no` arrives as the string "no", a mistyped bool, not a file name
_BOOL_WORDS = ("yes", "no", "on", "off", "y", "n", "true", "false", "1", "0")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and value.strip().lower() not in _BOOL_WORDS


CLASS_OR_ALL = Check(lambda v: v == "all" or (_integer(v) and v >= 0),
                     "must be a class index >= 0, all (one grid per class) or null")
INT_OR_NAME = Check(lambda v: _integer(v) or (isinstance(v, str) and v.strip() != ""),
                    "must be a class index or a name")
INDEX_OR_PATH = Check(lambda v: (_integer(v) and v >= 0) or _path(v),
                      "must be an image index >= 0 or the path of an image file")
BOOL_OR_PATH = Check(lambda v: isinstance(v, bool) or _path(v),
                     "must be true (beside the JSON), false (no CSV) or the path of a .csv file")
PATH_OR_PATHS = Check(lambda v: _path(v) or (isinstance(v, list | tuple | ListConfig) and len(v) > 0
                                             and all(_path(p) for p in v)),
                      "must be the path of a CSV or a non-empty list of paths, e.g. ood_csv=[a.csv,b.csv]")


# ---------------------------------------------------------------- the tools that read a trained run


@dataclass
class RestoredRunToolConfig:
    """The keys every tool that loads a trained run shares (flowgen/build.py::restore_run)."""

    task_name: str = MISSING
    run_name: str | None = checked(None, PATH_COMPONENT)
    ckpt_path: str | None = None  # required (the tool says so, with an example)
    which: Which = Which.best
    use_ema: bool = True
    device: str = "auto"
    paths: Any = MISSING


@dataclass
class SamplingOptions:
    """Keyword options of a model's own sampler (TarFlow's, the CNF's); null = as the model was configured.
    A family without the option (Glow, RealNVP) refuses a value other than null in one line."""

    guidance: float | None = checked(None, FINITE)
    guidance_annealed: bool | None = None
    inverse_method: InverseMethod | None = None
    jacobi_segments: int | None = checked(None, AT_LEAST_ONE)
    jacobi_max_iterations: int | None = checked(None, AT_LEAST_ONE)
    jacobi_tolerance: float | None = checked(None, FINITE, NON_NEGATIVE)
    denoise: bool | None = None
    # the CNF's ODE solve (model=cnf): a torchdiffeq method, its tolerances, or a fixed step in (0, 1]
    solver: ODESolver | None = None
    rtol: float | None = checked(None, POSITIVE, FINITE)
    atol: float | None = checked(None, POSITIVE, FINITE)
    step_size: float | None = checked(None, POSITIVE, closed_interval(0, 1))


@dataclass
class SampleConfig(RestoredRunToolConfig):
    task_name: str = "sample"
    mode: SampleMode = SampleMode.sample
    seed: int = 0
    output_dir: str | None = None
    upscale: int = checked(1, AT_LEAST_ONE)
    n: int = checked(8, AT_LEAST_ONE)
    temperatures: list[float] = checked(None, *TEMPERATURES, factory=lambda: [0.5, 0.7, 0.8, 0.9, 1.0])
    label: Any = checked(None, CLASS_OR_ALL)
    save_individual: bool = False
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions())
    split: Split = Split.val
    indices: list[int] = checked(None, each(NON_NEGATIVE), factory=lambda: [0, 1])
    steps: int = checked(8, at_least(2))  # interpolate: the two end points and the images between
    interpolation: Interpolation = Interpolation.spherical
    num_images: int = checked(8, AT_LEAST_ONE)


@dataclass
class TypicalityConfig:
    split: Split | None = Split.val  # null = no typicality
    max_images: int | None = checked(5000, AT_LEAST_ONE)
    fpr: float = checked(0.01, UNIT_OPEN)
    batch_sizes: list[int] = checked(None, each(AT_LEAST_ONE), factory=lambda: [1, 10])


@dataclass
class SampleQualityConfig(SampleQualitySettings):
    """``fid.*``: evaluate.py's FID and KID (flowgen/sample_quality.py), used when ``metrics`` names them."""

    num_samples: int = checked(10000, at_least(2))  # generated images (the papers: 50000, against split=train)
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions())  # the model's own (denoise ...)
    max_real: int | None = checked(None, at_least(2))  # a seeded random subset of the split; null = all of it


@dataclass
class EvaluateConfig(RestoredRunToolConfig):
    task_name: str = "evaluate"
    metrics: list[EvalMetric] = checked(None, NOT_EMPTY, factory=lambda: ["bpd"])
    fid: SampleQualityConfig = field(default_factory=SampleQualityConfig)
    split: Split = Split.test
    num_samples: int | None = checked(None, AT_LEAST_ONE)  # null = the run's evaluation.num_samples
    seed: int | None = None  # null = the run's evaluation.seed
    precision: str = checked("32-true", one_of(PRECISIONS))
    batch_size: int | None = checked(None, AT_LEAST_ONE)
    output: str | None = None
    csv: Any = checked(True, BOOL_OR_PATH)
    typicality: TypicalityConfig = field(default_factory=TypicalityConfig)
    data: Any = None  # null = the run's own data; a data config (typed by its own schema) scores another dataset


@dataclass
class ManipulateConfig(RestoredRunToolConfig):
    task_name: str = "manipulate"
    output_dir: str | None = None
    upscale: int = checked(1, AT_LEAST_ONE)
    attribute: Any = checked(None, INT_OR_NAME)  # required (the tool says so): a class or a CelebA attribute
    versus: Any = checked(None, INT_OR_NAME)
    split: Split = Split.val
    num_images: int | None = checked(1000, AT_LEAST_ONE)  # null = the whole split
    batch_size: int = checked(100, AT_LEAST_ONE)
    image: Any = checked(0, INDEX_OR_PATH)
    alphas: list[float] = checked(None, NOT_EMPTY, each(FINITE), factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])


@dataclass
class OodHistogramConfig:
    task_name: str = "ood_histogram"
    run_name: str | None = checked(None, PATH_COMPONENT)
    in_csv: str | None = None  # required (the tool says so)
    ood_csv: Any = checked(None, PATH_OR_PATHS)  # required: one path or a list of paths
    output: str | None = None
    bins: int = checked(40, AT_LEAST_ONE)
    paths: Any = MISSING


# ---------------------------------------------------------------- the 2-D playground


@dataclass
class Flow2DConfig:
    kind: FlowKind2D = FlowKind2D.coupling  # coupling | maf | iaf | cnf; flow.coupling is the transform of each
    coupling: Coupling2D = Coupling2D.affine
    num_layers: int = checked(8, AT_LEAST_ONE)
    hidden: int = checked(64, AT_LEAST_ONE)
    actnorm: bool = True
    scale_bound: float = checked(2.0, *POSITIVE_FINITE)
    spline_bins: int = checked(8, at_least(2))
    spline_bound: float = checked(4.0, *POSITIVE_FINITE)
    # flow.kind=cnf: how it trains, and its ODE solver (a torchdiffeq method, tolerances, or a fixed step)
    objective: Objective2D = Objective2D.likelihood
    solver: ODESolver = ODESolver.dopri5
    rtol: float = checked(1e-5, *POSITIVE_FINITE)
    atol: float = checked(1e-5, *POSITIVE_FINITE)
    step_size: float | None = checked(None, POSITIVE, closed_interval(0, 1))


@dataclass
class Train2DConfig:
    steps: int = checked(3000, AT_LEAST_ONE)
    batch_size: int = checked(256, AT_LEAST_ONE)
    lr: float = checked(0.002, *POSITIVE_FINITE)
    seed: int = 0
    log_every: int = checked(500, NON_NEGATIVE)  # 0 = never


@dataclass
class Evaluate2DConfig:
    test_points: int = checked(20000, AT_LEAST_ONE)
    integral_extent: float = checked(10.0, *POSITIVE_FINITE)
    integral_grid: int = checked(400, AT_LEAST_ONE)


@dataclass
class Figure2DConfig:
    extent: float = checked(4.5, *POSITIVE_FINITE)
    grid_size: int = checked(200, AT_LEAST_ONE)
    points: int = checked(2000, AT_LEAST_ONE)


@dataclass
class Playground2DConfig:
    task_name: str = "playground_2d"
    run_name: str | None = checked(None, PATH_COMPONENT)
    density: Density = Density.moons
    flow: Flow2DConfig = field(default_factory=Flow2DConfig)
    train: Train2DConfig = field(default_factory=Train2DConfig)
    evaluate: Evaluate2DConfig = field(default_factory=Evaluate2DConfig)
    figure: Figure2DConfig = field(default_factory=Figure2DConfig)
    output_dir: str = checked(MISSING, NOT_EMPTY)
    paths: Any = MISSING


# ---------------------------------------------------------------- the benchmark


@dataclass
class BenchmarkSettings:
    device: str = "auto"
    warmup_steps: int = checked(3, AT_LEAST_ONE)  # >= 1: the first step initialises ActNorm and proves the loss finite
    timed_steps: int = checked(10, AT_LEAST_ONE)
    sample_images: int = checked(MISSING, AT_LEAST_ONE)
    sample_repeats: int = checked(3, AT_LEAST_ONE)
    temperature: float = checked(0.7, FINITE, NON_NEGATIVE)
    gemm: bool = True
    convolution_ceiling: bool = True
    compare: list[str] = field(default_factory=list)  # `normflows`, or a string of key=value overrides
    weights: str | None = None  # a checkpoint (.ckpt or run directory) whose model weights the workloads start from
    output: str = MISSING


@dataclass
class BenchmarkConfig(TrainConfig):
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)


def _benchmark_node() -> BenchmarkConfig:
    """BenchmarkConfig with every key of TrainConfig left ``???``: merged onto the composed ``train`` root,
    it changes the root's type and adds ``benchmark``, and overwrites nothing (see the module docstring)."""
    return BenchmarkConfig(**{f.name: MISSING for f in dataclasses.fields(TrainConfig)})


def register(store: ConfigStore | None = None) -> None:
    """Put every tool's schema in Hydra's ConfigStore (idempotent)."""
    store = store or ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="manipulate_schema", node=ManipulateConfig)
    store.store(name="ood_histogram_schema", node=OodHistogramConfig)
    store.store(name="playground_2d_schema", node=Playground2DConfig)
    store.store(name="benchmark_schema", node=_benchmark_node())
