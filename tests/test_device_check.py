"""scripts/device_check.py: its dry run on the CPU (every step but compilation, in process), the step runner's
budgets and failures, the pytest report it reads, its synthetic images and its command-line mistakes; and
scripts/reproduction_table.py's FLOP counts and GPU-hours.

Tests of: flowgen/cli/reproduction_table.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from flowgen.benchmark.device_check import (
    CheckFailed,
    Step,
    gpu_test_files,
    junit_counts,
    markdown_table,
    run_device_check,
    run_steps,
    synthetic_images,
)
from flowgen.benchmark.reproduction import gpu_hours, training_flops_per_image, training_images_per_epoch
from flowgen.cli import device_check as cli
from flowgen.cli import reproduction_table
from flowgen.errors import UserError
from tests.train_runner import REPO

# (its marks are written in by stand_in_tests, so that this file is not itself found as a GPU test file)
STAND_IN = '''
import pytest

@pytest.mark.MARK
def test_passes():
    assert True

@pytest.mark.MARK
@pytest.mark.skipif(True, reason="stand-in")
def test_skipped():
    pass

def test_unmarked_is_not_run():
    assert False
'''


def stand_in_tests(tmp_path):
    path = tmp_path / "stand_in" / "test_stand_in.py"
    path.parent.mkdir()
    path.write_text(STAND_IN.replace("MARK", "gpu"))
    return path


def test_dry_run_of_every_step_but_compilation(tmp_path):
    """The GPU plan at tiny sizes on the CPU; compilation (tens of seconds of tracing) only in the slow test."""
    out = tmp_path / "out"
    record = run_device_check(cli.experiment_composer(out), REPO / "tests", out, dry_run=True,
                              test_files=[stand_in_tests(tmp_path)], leave_out=("compile",), report=lambda r: None)
    steps = {step["name"]: step for step in record["steps"]}
    assert list(steps) == ["gpu tests (pytest -m gpu)", "glow_cifar10 32-true", "glow_cifar10 bf16-mixed",
                           "tarflow_cifar10 32-true", "tarflow_cifar10 bf16-mixed",
                           "train glow_cifar10 20 steps, synthetic images"]
    assert [step["status"] for step in steps.values()] == ["ok"] * 6, [s["error"] for s in steps.values()]
    tests = steps["gpu tests (pytest -m gpu)"]["figures"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 0, 1)
    for name in ("glow_cifar10 32-true", "glow_cifar10 bf16-mixed", "tarflow_cifar10 bf16-mixed"):
        figures = steps[name]["figures"]
        assert figures["train_images_per_s"] > 0 and figures["flops_per_image"] > 0
        assert figures["fraction_of_gemm"] == pytest.approx(
            figures["flops_per_image"] * figures["train_images_per_s"] / figures["gemm_flops_per_s"])
    # the FLOPs of a step do not depend on its precision
    assert steps["glow_cifar10 bf16-mixed"]["figures"]["flops_per_image"] == \
        steps["glow_cifar10 32-true"]["figures"]["flops_per_image"]
    assert steps["glow_cifar10 bf16-mixed"]["figures"]["gemm_dtype"] == "bfloat16"
    training = steps["train glow_cifar10 20 steps, synthetic images"]["figures"]
    assert training["steps"] == 20 and training["skipped_steps"] == 0
    assert training["last_bpd"] < training["first_bpd"]
    table = markdown_table(json.loads(json.dumps(record)))  # the record is plain JSON
    assert table.count("\n| ") == 7 and "dry run" in table  # header + 6 steps


def test_a_step_that_fails_or_runs_out_of_time_is_reported_and_the_next_one_runs():
    def fail():
        raise ValueError("broken\nacross lines")

    def check_fails():
        raise CheckFailed("the loss did not fall", {"first_bpd": 3.0})

    def sleep():
        time.sleep(10)
        return {}

    results = run_steps([Step("sleeps", 0.3, sleep), Step("raises", 5, fail), Step("check", 5, check_fails),
                         Step("fine", 5, lambda: {"summary": "done"})], total_budget_s=60, report=lambda r: None)
    assert [r.status for r in results] == ["timed out", "failed", "failed", "ok"]
    assert results[0].error == "ran out of its 0.3 s budget" and results[0].seconds < 5  # not the 10 s sleep
    assert results[1].error == "ValueError: broken across lines"
    assert results[2].figures == {"first_bpd": 3.0} and results[2].error == "the loss did not fall"
    assert results[3].figures == {"summary": "done"} and results[3].error is None
    # a step gets at most what is left of the total budget; when nothing is left, the rest is not run
    results = run_steps([Step("sleeps", 5, sleep), Step("after", 5, lambda: {})], total_budget_s=1.5,
                        report=lambda r: None)
    assert [r.status for r in results] == ["timed out", "not run"]
    assert results[0].budget_s == pytest.approx(1.5, abs=0.1)


def test_the_pytest_report_is_counted_with_the_failed_tests_by_name(tmp_path):
    """pytest's --junitxml format (the passing and skipped path is the dry run's real report)."""
    report = tmp_path / "report.xml"
    report.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1" '
        'skipped="1" tests="5"><testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b[glow]"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped message="no CUDA"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"><error message="fixture"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_e"/></testsuite></testsuites>')
    assert junit_counts(report) == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1,
                                    "failed_tests": ["tests.test_cuda::test_b[glow]", "tests.test_cuda::test_d"]}


def test_the_gpu_tests_are_found_by_their_marker():
    names = {path.name for path in gpu_test_files(REPO / "tests")}
    assert {"test_cuda.py", "test_mixed_precision.py"} <= names and "test_device_check.py" not in names


def test_synthetic_images_are_smooth_integer_images():
    x = synthetic_images(64, 3, 32, 256)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.long and 0 <= x.min() and x.max() <= 255
    neighbours = (x[..., 1:] - x[..., :-1]).abs().float().mean()
    assert neighbours < 0.05 * 255 < x.float().std() * 1.5  # smooth, yet far from constant


def test_without_cuda_the_command_asks_for_a_gpu_or_dry_run_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device") and "--dry-run" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_already_holds_a_check_is_refused(tmp_path, capsys):
    (tmp_path / "device_check.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--dry-run", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "already holds a device check" in capsys.readouterr().err
    assert (tmp_path / "device_check.json").read_text() == "{}"


@pytest.mark.parametrize("experiment, overrides", [
    ("glow_cifar10", ("data.image_size=8", "model.scales=2", "model.steps=3", "model.hidden_channels=8")),
    ("tarflow_cifar10", ("data.image_size=8", "model.width=16", "model.num_blocks=3", "model.layers_per_block=1",
                         "model.num_heads=2")),
])
def test_flops_extrapolated_from_depths_one_and_two_equal_the_full_count(tmp_path, experiment, overrides):
    """The README's reproduction table counts deep configs at depths 1 and 2: exact, units being identical."""
    cfg = cli.experiment_composer(tmp_path)(experiment, overrides)
    extrapolated, how = training_flops_per_image(cfg)
    assert "=1 and 2, linear in" in how
    assert extrapolated == training_flops_per_image(cfg, extrapolate=False)[0] > 0


def test_gpu_hours_arithmetic_and_training_images(tmp_path):
    assert gpu_hours(1e9, 1000, 10, utilisation=0.5, peak_flops=1e12) == pytest.approx(1e13 / 5e11 / 3600)
    compose = cli.experiment_composer(tmp_path)
    cfg = compose("glow_cifar10", ())
    assert training_images_per_epoch(cfg) == 50_000 - int(cfg.data.val_size)
    cfg = compose("glow_celebahq256", ())  # data=folder holds out a validation and a test set
    assert training_images_per_epoch(cfg, folder_images=30_000) == 30_000 - 2 * round(float(cfg.data.val_size) * 30_000)
    with pytest.raises(UserError, match="how many images the folder holds"):
        training_images_per_epoch(cfg)


@pytest.mark.slow  # counts the full-width RealNVP step: ~30 s on 2 busy cores
def test_the_reproduction_table_row_of_realnvp(capsys):
    table = reproduction_table.main(["realnvp_cifar10"])
    row = next(line for line in table.splitlines() if "`experiment=realnvp_cifar10`" in line)
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[1].startswith("3.49 (Dinh et al. 2017, Table 1)")
    images, epochs = (int(v.replace(",", "")) for v in cells[3].split(" x "))
    assert float(cells[4]) == pytest.approx(float(cells[2].replace(",", "")) * 1e9 * images * epochs, rel=0.01)
    assert float(cells[5]) == pytest.approx(gpu_hours(float(cells[4]), 1, 1), rel=0.01)  # FLOPs / rate


@pytest.mark.slow
def test_the_dry_run_command_runs_every_step(tmp_path):
    """`python scripts/device_check.py --dry-run` as a user runs it: every step ok, table and JSON written."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "device_check.json").read_text())
    assert len(record["steps"]) == 8 and all(step["status"] == "ok" for step in record["steps"])
    assert record["command"] == f"python scripts/device_check.py --dry-run --out {out}"
    assert (out / "device_check.md").read_text().count("| ok |") == 8
