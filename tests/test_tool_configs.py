"""The typed configurations of sample.py, evaluate.py and the scripts (flowgen/config/tool_schemas.py).

Every tool's config composes onto its schema (bools are bools: ``use_ema=no`` is False), and every
mistake ends in ONE ``error:`` line naming the key, exit status 2. A wrong type or an unknown choice
fails while Hydra composes: run here through ``run_entry_point`` as ``python <tool>.py`` does. A value
out of range fails in the task's first line (``validated``): run through ``run_reporting_errors``. Both
are in process and need no checkpoint (tests/test_sample_evaluate.py runs sample.py itself, through
the same schema).
"""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import flowgen.cli  # noqa: F401  (registers the resolvers and the schemas)
from flowgen.checks import validated
from flowgen.cli.benchmark import run_benchmark
from flowgen.cli.errors import EXIT_USER_ERROR, UserError, run_reporting_errors
from flowgen.cli.evaluate import evaluate
from flowgen.cli.launch import run_entry_point
from flowgen.cli.manipulate import edit_attribute
from flowgen.cli.ood_histogram import ood_histogram
from flowgen.cli.playground_2d import playground_2d
from flowgen.cli.sample import sample
from flowgen.config import tool_schemas
from tests.test_configs import compose_train
from tests.train_runner import REPO

TASKS = {"sample": sample, "evaluate": evaluate, "manipulate": edit_attribute, "ood_histogram": ood_histogram,
         "playground_2d": playground_2d, "benchmark": run_benchmark}
SCHEMAS = {"sample": tool_schemas.SampleConfig, "evaluate": tool_schemas.EvaluateConfig,
           "manipulate": tool_schemas.ManipulateConfig, "ood_histogram": tool_schemas.OodHistogramConfig,
           "playground_2d": tool_schemas.Playground2DConfig, "benchmark": tool_schemas.BenchmarkConfig}


def composed(tool: str, overrides: list[str], tmp_path):
    if tool == "benchmark":  # train's config: its paths need a home
        return compose_train(tmp_path, overrides, config_name="benchmark")
    if tool == "playground_2d":  # output_dir defaults to Hydra's run directory, unset outside a run
        overrides = [f"output_dir={tmp_path / 'figures'}", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(tool, overrides=overrides)


def the_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


# ---- every tool composes onto its schema --------------------------------------------------------------

@pytest.mark.parametrize("tool", list(TASKS))
def test_every_tool_config_composes_typed(tool, tmp_path):
    cfg = composed(tool, [], tmp_path)
    assert OmegaConf.get_type(cfg) is SCHEMAS[tool]
    plain = validated(cfg)  # the defaults pass their own checks
    assert OmegaConf.get_type(plain) is dict


@pytest.mark.parametrize("tool, override, key, value", [
    ("sample", "use_ema=no", "use_ema", False),
    ("sample", "save_individual=yes", "save_individual", True),
    ("sample", "which=last", "which", "last"),
    ("evaluate", "use_ema=off", "use_ema", False),
    ("evaluate", "csv=false", "csv", False),
    ("evaluate", "typicality.split=null", "typicality.split", None),
    ("manipulate", "use_ema=no", "use_ema", False),
    ("manipulate", "attribute=3", "attribute", 3),
    ("playground_2d", "flow.actnorm=no", "flow.actnorm", False),
    ("benchmark", "benchmark.gemm=no", "benchmark.gemm", False),
    ("benchmark", "benchmark.timed_steps=4", "benchmark.timed_steps", 4),
])
def test_values_are_typed(tool, override, key, value, tmp_path):
    assert OmegaConf.select(validated(composed(tool, [override], tmp_path)), key) == value


def test_benchmark_composes_train_unchanged(tmp_path):
    """benchmark_schema only retypes train's root and adds the section: an experiment's settings stay."""
    overrides = ["experiment=glow_cifar10", "scheduler.warmup_steps=7"]
    bench = OmegaConf.to_container(composed("benchmark", overrides, tmp_path), enum_to_str=True)
    train = OmegaConf.to_container(compose_train(tmp_path, [*overrides, "data=cifar10", "model=glow"]),
                                   enum_to_str=True)
    assert bench.pop("benchmark")["timed_steps"] == 10
    assert {**bench, "task_name": "train"} == train


# ---- a wrong type or an unknown choice: one line at composition -----------------------------------

@pytest.mark.parametrize("tool, args, message", [
    ("sample", ["use_ema=maybe"], "use_ema=maybe: use_ema must be a boolean"),
    ("sample", ["mode=foo"], "mode=foo: mode must be one of sample, interpolate, reconstruct"),
    ("sample", ["which=first"], "which=first: which must be one of best, last"),
    ("sample", ["n=abc"], "n=abc: n must be an integer"),
    ("sample", ["temperatures=[hot]"], "temperatures"),
    ("sample", ["interpolation=cubic"], "interpolation=cubic: interpolation must be one of linear, spherical"),
    ("sample", ["split=dev"], "split=dev: split must be one of train, val, test"),
    ("evaluate", ["split=foo"], "split=foo: split must be one of train, val, test"),
    ("evaluate", ["typicality.split=all"], "typicality.split=all: typicality.split must be one of train, val, test"),
    ("evaluate", ["typicality.fpr=low"], "typicality.fpr=low: typicality.fpr must be a number"),
    ("evaluate", ["num_sample=2"], "the top level has no key 'num_sample'"),
    ("evaluate", ["which=first"], "which=first: which must be one of best, last"),
    ("manipulate", ["alphas=[a,b]"], "alphas"),
    ("manipulate", ["which=newest"], "which=newest: which must be one of best, last"),
    ("ood_histogram", ["bins=many"], "bins=many: bins must be an integer"),
    ("playground_2d", ["density=foo"], "density=foo: density must be one of moons, eight_gaussians, checkerboard"),
    ("playground_2d", ["flow.coupling=glow"], "flow.coupling=glow: flow.coupling must be one of affine, spline"),
    ("playground_2d", ["flow.kind=naf"], "flow.kind=naf: flow.kind must be one of coupling, maf, iaf"),
    ("playground_2d", ["train.steps=many"], "train.steps=many: train.steps must be an integer"),
    ("benchmark", ["benchmark.gemm=maybe"], "benchmark.gemm=maybe: benchmark.gemm must be a boolean"),
    ("benchmark", ["benchmark.timed_steps=ten"], "benchmark.timed_steps=ten: benchmark.timed_steps must be an integer"),
    ("benchmark", ["benchmark.timed_stpes=3"], "benchmark has no key 'timed_stpes'"),
])
def test_composition_errors_are_one_line(tool, args, message, tmp_path, capsys, monkeypatch):
    """The path of ``python <tool>.py <args>``: run_entry_point around the composition."""
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as a user runs it; run_entry_point sets it to raise
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(lambda: composed(tool, args, tmp_path))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert message in the_error_line(capsys)


# ---- a value out of range: one line in the task's first step ---------------------------------------

RANGE_ERRORS = [
    ("sample", ["temperatures=[nan]"], "temperatures=[nan] has an element that must be a finite number"),
    ("sample", ["temperatures=[-1]"], "temperatures=[-1.0] has an element that must be >= 0"),
    ("sample", ["temperatures=[]"], "temperatures=[] must not be empty"),
    ("sample", ["n=0"], "n=0 must be >= 1"),
    ("sample", ["mode=interpolate", "steps=1"], "steps=1 must be >= 2"),
    ("sample", ["upscale=0"], "upscale=0 must be >= 1"),
    ("sample", ["mode=reconstruct", "num_images=0"], "num_images=0 must be >= 1"),
    ("sample", ["indices=[0,-1]"], "indices=[0, -1] has an element that must be >= 0"),
    ("sample", ["label=some"], "label=some must be a class index >= 0, all"),
    ("evaluate", ["num_samples=0"], "num_samples=0 must be >= 1"),
    ("evaluate", ["typicality.fpr=1.5"], "typicality.fpr=1.5 must be strictly between 0 and 1"),
    ("evaluate", ["typicality.fpr=0"], "typicality.fpr=0.0 must be strictly between 0 and 1"),
    ("evaluate", ["typicality.max_images=0"], "typicality.max_images=0 must be >= 1"),
    ("evaluate", ["typicality.batch_sizes=[1,0]"], "typicality.batch_sizes=[1, 0] has an element that must be >= 1"),
    ("evaluate", ["precision=17"], "precision=17 is not one of 32-true"),
    ("evaluate", ["batch_size=0"], "batch_size=0 must be >= 1"),
    ("evaluate", ["csv=no"], "csv=no must be true (beside the JSON), false (no CSV) or the path"),
    ("manipulate", ["attribute=3", "alphas=[]"], "alphas=[] must not be empty"),
    ("manipulate", ["attribute=3", "alphas=[inf]"], "alphas=[inf] has an element that must be a finite number"),
    ("manipulate", ["attribute=3", "batch_size=0"], "batch_size=0 must be >= 1"),
    ("manipulate", ["attribute=3", "num_images=0"], "num_images=0 must be >= 1"),
    ("manipulate", ["attribute=3", "image=-1"], "image=-1 must be an image index >= 0"),
    ("manipulate", ["image=0"], "attribute is required"),
    ("ood_histogram", ["in_csv=a.csv", "ood_csv=b.csv", "bins=0"], "bins=0 must be >= 1"),
    ("ood_histogram", ["in_csv=a.csv", "ood_csv=[]"], "ood_csv=[] must be the path of a CSV or a non-empty list"),
    ("playground_2d", ["train.lr=0"], "train.lr=0.0 must be > 0"),
    ("playground_2d", ["flow.num_layers=0"], "flow.num_layers=0 must be >= 1"),
    ("playground_2d", ["flow.spline_bins=1"], "flow.spline_bins=1 must be >= 2"),
    ("playground_2d", ["train.log_every=-1"], "train.log_every=-1 must be >= 0"),
    ("playground_2d", ["figure.extent=inf"], "figure.extent=inf must be a finite number"),
    ("playground_2d", ["output_dir=''"], "output_dir= must not be empty"),
    ("benchmark", ["benchmark.timed_steps=0"], "benchmark.timed_steps=0 must be >= 1"),
    ("benchmark", ["benchmark.warmup_steps=0"], "benchmark.warmup_steps=0 must be >= 1"),
    ("benchmark", ["benchmark.temperature=nan"], "benchmark.temperature=nan must be a finite number"),
    ("benchmark", ["benchmark.sample_images=0"], "benchmark.sample_images=0 must be >= 1"),
    ("benchmark", ["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),  # train's own checks apply too
]


@pytest.mark.parametrize("tool, args, message", RANGE_ERRORS)
def test_range_errors_are_one_line(tool, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(TASKS[tool], composed(tool, args, tmp_path))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert the_error_line(capsys).startswith(f"error: {message}")  # the key first


# ---- outputs that are not what they must be ---------------------------------------------------------

@pytest.mark.parametrize("tool, key, kind", [
    ("sample", "output_dir", "file"),
    ("manipulate", "output_dir", "file"),
    ("playground_2d", "output_dir", "file"),
    ("evaluate", "output", "directory"),
    ("ood_histogram", "output", "directory"),
])
def test_an_output_of_the_wrong_kind_is_one_line(tool, key, kind, tmp_path, capsys):
    target = tmp_path / "taken"
    if kind == "file":
        target.write_text("not a directory\n")
    else:
        target.mkdir()
    extra = {"manipulate": ["attribute=3"], "ood_histogram": ["in_csv=a.csv", "ood_csv=b.csv"]}.get(tool, [])
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(TASKS[tool], composed(tool, [*extra, f"{key}={target}"], tmp_path))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert the_error_line(capsys).startswith(f"error: {key}={target} is a {kind}")
    assert target.is_file() if kind == "file" else target.is_dir()  # untouched


# ---- which=best|last on a run directory, end to end ------------------------------------------------

def test_which_chooses_the_runs_best_or_last_checkpoint(trained_digits, tmp_path, capsys):
    def checkpoint_line(which: str) -> str:
        cfg = composed("sample", [f"ckpt_path={trained_digits.run_dir}", f"which={which}", "n=2",
                                  "temperatures=[0.5]", f"output_dir={tmp_path / which}"], tmp_path)
        sample(cfg)
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint: "))

    best, last = checkpoint_line("best"), checkpoint_line("last")
    assert "best by val/bpd" in best and "/last.ckpt" not in best
    assert "checkpoints/last.ckpt (last (which=last)" in last



@pytest.mark.parametrize("tool", ["sample", "evaluate", "manipulate"])
def test_which_and_use_ema_reach_the_checkpoint_finder(tool, tmp_path, capsys, monkeypatch):
    """Strings and bools, not enums or truthy strings: ``use_ema=no`` restores the raw weights."""
    asked = {}

    def restore_run(ckpt_path, use_ema=True, device="cpu", which="best"):
        asked.update(which=which, use_ema=use_ema)
        raise UserError("restored")

    monkeypatch.setattr(f"flowgen.cli.{tool}.restore_run", restore_run)
    extra = ["attribute=3"] if tool == "manipulate" else []
    with pytest.raises(SystemExit):
        run_reporting_errors(TASKS[tool], composed(tool, ["ckpt_path=run", "which=last", "use_ema=no", *extra],
                                                   tmp_path))
    assert the_error_line(capsys) == "error: restored"
    assert asked == {"which": "last", "use_ema": False} and type(asked["which"]) is str
