"""The steps of ``scripts/device_check.py``: what one short session on a lent GPU must establish.

    gpu tests         ``pytest -m gpu`` on the test files that carry the marker (a subprocess):
                      16-mixed with its grad scaler, bf16-mixed, compile, channels_last, parity on CUDA
    benchmark         the paper configs (``experiment=glow_cifar10``, ``experiment=tarflow_cifar10``) in
                      float32, bf16-mixed and bf16-mixed compiled: train images/s, FLOPs per image,
                      achieved FLOP/s as a fraction of a dense n x n GEMM in the step's dtype timed in
                      the same rounds on the same device, and the peak memory a step adds
    training          the paper Glow trained with Lightning on smooth synthetic CIFAR-shaped images (no
                      download): the loss falls and the NaN guard skips no step

Every step has a time budget (a SIGALRM in the main thread ends it) and the whole check a total one;
a step that fails or runs out of time is recorded and the next one runs.  ``DRY_RUN`` is the same plan
on the CPU at tiny sizes (the test suite runs it, so the script cannot rot).
"""

from __future__ import annotations

import gc
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from flowgen.benchmark.measure import (
    PeakMemory,
    count_flops,
    cpu_description,
    gemm_call,
    interleaved_times,
    median,
)
from flowgen.benchmark.workloads import flowgen_workload
from flowgen.build import build_module, num_levels_of
from flowgen.errors import one_line
from flowgen.evaluation import PRECISIONS
from flowgen.performance import compile_model
from flowgen.training.nan_guard import NonFiniteGuard


@dataclass(frozen=True)
class Sizes:
    """How big and how long each step is: ``GPU`` (the real check) or ``DRY_RUN`` (CPU, tiny)."""

    device: str
    total_budget_s: float            # the whole check; a step gets min(its budget, what is left)
    budgets_s: dict[str, float]      # seconds per step: tests, <experiment> <variant>, training
    overrides: dict[str, list[str]]  # per experiment, on top of the paper config
    warmup_steps: int                # untimed steps after compilation
    timed_steps: int                 # step time = median over these (each followed by a GEMM)
    gemm_size: int                   # n of the n x n reference GEMM
    compile_mode: str                # performance.compile of the compiled variant
    compile_backend: str             # torch.compile backend (inductor on the GPU)
    train_steps: int
    train_warmup_steps: int          # scheduler.warmup_steps of the training check
    train_images: int                # synthetic images, reshuffled each epoch
    threads: int | None              # torch intra-op threads while the check runs (None: torch's default)


GPU = Sizes(
    device="cuda",
    total_budget_s=450.0,  # 7.5 minutes, leaving half a minute of the 8 for start-up and the report
    # guesses, to be corrected by the first run: the compiled steps include inductor's compilation (Glow
    # K=32 compiles one graph per level and direction), the tests two train.py runs and two compilations
    budgets_s={"tests": 120, "glow_cifar10 float32": 25, "glow_cifar10 bf16": 25, "glow_cifar10 compiled": 110,
               "tarflow_cifar10 float32": 30, "tarflow_cifar10 bf16": 25, "tarflow_cifar10 compiled": 60,
               "training": 55},
    # TarFlow 2-768-8-8 (460M parameters) at the per-GPU batch of its global 256 on 4 GPUs: batch 256 on
    # one GPU would hold ~260 GB of float32 activations
    overrides={"glow_cifar10": [], "tarflow_cifar10": ["data.batch_size=64"]},
    warmup_steps=3,
    timed_steps=5,
    gemm_size=8192,
    compile_mode="step",       # per flow step / transformer block: identical units share one graph
    compile_backend="inductor",
    train_steps=300,
    train_warmup_steps=100,    # the paper's 7000 would keep all 300 steps below 5% of its learning rate
    train_images=4096,
    threads=None,
)

DRY_RUN = Sizes(
    device="cpu",
    total_budget_s=900.0,  # the budgets only catch a hang: each step takes seconds
    budgets_s={"tests": 120, "glow_cifar10 float32": 120, "glow_cifar10 bf16": 120, "glow_cifar10 compiled": 120,
               "tarflow_cifar10 float32": 120, "tarflow_cifar10 bf16": 120, "tarflow_cifar10 compiled": 120,
               "training": 120},
    overrides={
        "glow_cifar10": ["data.image_size=8", "data.batch_size=8", "model.scales=2", "model.steps=2",
                         "model.hidden_channels=16"],
        "tarflow_cifar10": ["data.image_size=8", "data.batch_size=8", "model.width=16", "model.num_blocks=2",
                            "model.layers_per_block=1", "model.num_heads=2"],
    },
    warmup_steps=1,
    timed_steps=2,
    gemm_size=256,
    compile_mode="step",
    # dynamo's tracing without code generation: inductor's C++ compilation of even the tiny Glow takes
    # minutes on a 2-core CPU; the GPU check uses inductor
    compile_backend="eager",
    train_steps=20,
    train_warmup_steps=3,
    train_images=160,
    # tiny tensors gain nothing from more threads, and on a busy machine their barriers cost ~7x (20 steps of
    # the tiny Glow: 40 s with 2 threads at load 8 on 2 cores, 6 s with 1)
    threads=1,
)

BENCHMARKS = ("glow_cifar10", "tarflow_cifar10")
TRAINED = "glow_cifar10"
# (label, trainer.precision, compiled?) of each benchmark variant
VARIANTS = (("float32", "32-true", False), ("bf16", "bf16-mixed", False), ("compiled", "bf16-mixed", True))


# -- running steps within their budgets -------------------------------------------------------------

class StepTimeout(BaseException):
    """Raised in the main thread when a step's budget is spent (a BaseException, so that no library's
    ``except Exception`` swallows it)."""


class CheckFailed(Exception):
    """A step that ran but whose check does not hold; ``figures`` are what it measured."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``StepTimeout`` in the main thread after ``seconds`` (SIGALRM; Unix).  Elsewhere, or off the
    main thread, the step runs without a hard limit and the step runner reports its overrun afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise StepTimeout(f"ran out of its {seconds:.3g} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Step:
    name: str
    budget_s: float
    run: Callable[[], dict]  # returns its figures; raises CheckFailed when its check does not hold


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timed out | not run
    seconds: float
    budget_s: float
    figures: dict = field(default_factory=dict)
    error: str | None = None


def release_device_memory() -> None:
    """Drop what a finished (or interrupted) step left behind: its graphs, tensors and compiled code."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_steps(steps: list[Step], total_budget_s: float, report: Callable[[StepResult], None] = print
              ) -> list[StepResult]:
    """Run each step within min(its budget, the total budget left); record and go on after any failure."""
    start = time.monotonic()
    results = []
    for step in steps:
        budget = min(step.budget_s, total_budget_s - (time.monotonic() - start))
        if budget < min(1.0, step.budget_s):  # no step is started with less than a second left
            result = StepResult(step.name, "not run", 0.0, step.budget_s, error="the check's total budget is spent")
        else:
            began = time.monotonic()
            status, figures, error = "ok", {}, None
            try:
                with time_limit(budget):
                    figures = step.run()
            except StepTimeout as exc:
                status, error = "timed out", str(exc)
            except CheckFailed as exc:
                status, figures, error = "failed", exc.figures, one_line(exc)
            except Exception as exc:  # a failing step must not stop the others: record it, go on
                status, error = "failed", f"{type(exc).__name__}: {one_line(exc, 300)}"
            finally:
                release_device_memory()
            seconds = time.monotonic() - began
            if status == "ok" and seconds > budget:  # only where time_limit could not interrupt it
                status, error = "timed out", f"took {seconds:.0f} s of a {budget:.0f} s budget"
            result = StepResult(step.name, status, seconds, budget, figures, error)
        results.append(result)
        report(result)
    return results


# -- configs -----------------------------------------------------------------------------------------

# ``compose(experiment, overrides)``: ``python train.py experiment=<name> <overrides>``'s validated config with
# every path under the check's output directory (flowgen/cli/device_check.py composes it)
Compose = Callable[[str, tuple[str, ...]], DictConfig]


def variant(cfg: DictConfig, **values) -> DictConfig:
    """``cfg`` with dotted keys set, e.g. ``variant(cfg, **{"trainer.precision": "bf16-mixed"})``."""
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))


# -- step: the CUDA-only tests -----------------------------------------------------------------------

_GPU_MARK = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark\b.*\bpytest\.mark\.gpu\b)", re.MULTILINE)


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """The test modules that mark a test (``@pytest.mark.gpu``) or themselves (``pytestmark``) with ``gpu``."""
    return sorted(p for p in tests_dir.glob("test_*.py") if _GPU_MARK.search(p.read_text()))


def junit_counts(xml_file: Path) -> dict:
    """passed / failed / errors / skipped and the failed tests' ids from a pytest ``--junitxml`` report."""
    root = ET.parse(xml_file).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failed_tests": failed}


def run_gpu_tests(root: Path, files: list[Path], out: Path) -> dict:
    """``pytest -m gpu`` on ``files`` in a subprocess (its own process group, killed with the step)."""
    if not files:
        raise CheckFailed("no test file carries pytest.mark.gpu", {})
    xml_file, log = out / "gpu_tests.xml", out / "gpu_tests.log"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={xml_file}", *map(str, files)]
    with log.open("w") as output:
        proc = subprocess.Popen(command, cwd=root, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # the step's time ran out: end pytest and what it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not xml_file.is_file():
        raise CheckFailed(f"pytest exited with {code} without a report; see {log}", {})
    figures = junit_counts(xml_file) | {"files": [str(f) for f in files], "log": str(log)}
    figures["summary"] = (f"{figures['passed']} passed, {figures['failed']} failed, {figures['errors']} errors, "
                          f"{figures['skipped']} skipped")
    if figures["failed"] or figures["errors"] or code not in (0, 5):
        raise CheckFailed(f"{figures['summary']}: {', '.join(figures['failed_tests'][:3])} (see {log})", figures)
    return figures


# -- step: one benchmark variant ---------------------------------------------------------------------

def benchmark_variant(cfg: DictConfig, device: torch.device, sizes: Sizes, compiled: bool) -> dict:
    """Train images/s, FLOPs per image, the fraction of the GEMM rate and the peak step memory of the
    module ``train.py`` builds for ``cfg`` (the benchmark's workload: random images of the data's shape).

    FLOPs are counted on the first, eager step (it also initialises ActNorm); compilation comes after
    it, in place, so that the compiled step does the same arithmetic."""
    workload = flowgen_workload(variant(cfg, **{"performance.compile": "none"}), device)
    flops_per_image = count_flops(workload.train_step) / workload.batch_size
    if compiled:
        compile_model(workload.model, sizes.compile_mode, backend=sizes.compile_backend)
    for _ in range(sizes.warmup_steps):  # compilation, kernel selection
        loss = workload.train_step()
    if not torch.isfinite(loss):
        raise CheckFailed(f"the warm-up loss is {float(loss)}", {})
    dtype = PRECISIONS[workload.precision] or torch.float32
    gemm, gemm_flops = gemm_call(device, dtype, sizes.gemm_size)
    gemm()
    times = interleaved_times({"step": workload.train_step, "gemm": gemm}, sizes.timed_steps, device)
    with PeakMemory(device) as peak:
        loss = workload.train_step()
    images_per_s = workload.batch_size / median(times["step"])
    gemm_rate = gemm_flops / median(times["gemm"])
    figures = {
        "precision": workload.precision,
        "compile": f"{sizes.compile_mode} ({sizes.compile_backend})" if compiled else "none",
        "channels_last": workload.settings["channels_last"],
        "batch_size": workload.batch_size,
        "parameters": sum(p.numel() for p in workload.parameters),
        "train_images_per_s": images_per_s,
        "step_seconds": times["step"],
        "flops_per_image": flops_per_image,
        "achieved_flops_per_s": flops_per_image * images_per_s,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "gemm_flops_per_s": gemm_rate,
        "fraction_of_gemm": flops_per_image * images_per_s / gemm_rate,
        "peak_step_memory_bytes": peak.peak_bytes,
        "peak_memory_kind": peak.kind,
        "final_loss_bpd": float(loss),
    }
    figures["summary"] = (f"batch {figures['batch_size']}, {_si(figures['parameters'])} parameters, GEMM "
                          f"{figures['gemm_dtype']} {gemm_rate / 1e12:.3g} TFLOP/s")
    return figures


# -- step: training on synthetic images --------------------------------------------------------------

def synthetic_images(n: int, channels: int, size: int, num_levels: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth integer images in {0..K-1}: a random 4x4 grid per channel, bilinearly upsampled.
    Neighbouring pixels are strongly correlated, as in photographs, so a flow's loss falls within a few
    hundred steps (on independent uniform pixels it could not fall below log2 K bits per dimension)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return (fine * num_levels).long().clamp_(0, num_levels - 1)


class _Losses(L.Callback):
    """The training loss of every step, kept on the device until the end (no host sync per step)."""

    def __init__(self):
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].detach().float())


def train_on_synthetic_images(cfg: DictConfig, device: torch.device, sizes: Sizes) -> dict:
    """Train the module ``train.py`` builds for ``cfg`` with Lightning, the run's precision, clipping and
    the NaN guard, for ``sizes.train_steps`` steps (``sizes.train_warmup_steps`` of warm-up) on synthetic
    images of the data's shape; returns the losses' summary, the steps the guard skipped and, under
    16-mixed, the grad scaler's final loss scale."""
    cfg = variant(cfg, **{"scheduler.warmup_steps": sizes.train_warmup_steps})
    torch.manual_seed(int(cfg.seed))
    num_levels = num_levels_of(cfg)
    module = build_module(cfg, num_levels)
    images = synthetic_images(sizes.train_images, int(cfg.data.channels), int(cfg.data.image_size), num_levels)
    labels = torch.zeros(len(images), dtype=torch.long)
    loader = DataLoader(TensorDataset(images, labels), batch_size=int(cfg.data.batch_size), shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    guard, losses = NonFiniteGuard(), _Losses()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision=str(cfg.trainer.precision), max_steps=sizes.train_steps, max_epochs=-1,
                        gradient_clip_val=cfg.trainer.gradient_clip_val, callbacks=[guard, losses], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(cfg.paths.output_dir))
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    bpd = torch.stack(losses.values).cpu() if losses.values else torch.full((1,), math.nan)
    k = max(1, len(losses.values) // 10)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    figures = {
        "precision": str(cfg.trainer.precision),
        "batch_size": int(cfg.data.batch_size),
        "steps": len(losses.values),
        "skipped_steps": guard.skipped,
        "all_finite": bool(torch.isfinite(bpd).all()),
        "first_bpd": bpd[:k].mean().item(),
        "last_bpd": bpd[-k:].mean().item(),
        "train_images_per_s": len(losses.values) * int(cfg.data.batch_size) / seconds,
        "learning_rate": float(cfg.optimizer.lr),
        "warmup_steps": sizes.train_warmup_steps,
        "loss_scale": float(scaler.get_scale()) if scaler is not None else None,
    }
    figures["summary"] = (f"bpd {figures['first_bpd']:.3f} -> {figures['last_bpd']:.3f} over {figures['steps']} "
                          f"steps (means of the first and last {k}), {guard.skipped} skipped, lr "
                          f"{figures['learning_rate']:g} after {sizes.train_warmup_steps} warm-up steps, "
                          f"{figures['precision']}")
    return figures


def training_check(cfg: DictConfig, device: torch.device, sizes: Sizes) -> dict:
    """``train_on_synthetic_images``, holding when every step ran with a finite loss, the NaN guard
    skipped none, and the mean loss of the last tenth of the steps is below that of the first tenth."""
    figures = train_on_synthetic_images(cfg, device, sizes)
    if figures["steps"] != sizes.train_steps:
        raise CheckFailed(f"trained {figures['steps']} of {sizes.train_steps} steps", figures)
    if not figures["all_finite"] or figures["skipped_steps"]:
        raise CheckFailed(f"non-finite losses or skipped steps: {figures['summary']}", figures)
    if not figures["last_bpd"] < figures["first_bpd"]:
        raise CheckFailed(f"the loss did not fall: {figures['summary']}", figures)
    return figures


# -- the plan ----------------------------------------------------------------------------------------

def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"{cpu_description()}, {threads} thread{'s' if threads > 1 else ''}"


def plan(compose: Compose, tests_dir: Path, out: Path, sizes: Sizes, device: torch.device,
         test_files: list[Path] | None = None, leave_out: tuple[str, ...] = ()) -> list[Step]:
    """The check's steps in order: the GPU tests, each benchmark variant of each paper config, training.
    ``test_files`` replaces the marked files of ``tests_dir`` and steps whose name contains a word of
    ``leave_out`` are left out (the fast test suite gives a small stand-in and leaves out compilation)."""
    files = gpu_test_files(tests_dir) if test_files is None else test_files
    steps = [Step("gpu tests (pytest -m gpu)", sizes.budgets_s["tests"],
                  lambda: run_gpu_tests(tests_dir.parent, files, out))]
    for experiment in BENCHMARKS:
        for label, precision, compiled in VARIANTS:
            def run(experiment=experiment, precision=precision, compiled=compiled) -> dict:
                cfg = compose(experiment, tuple(sizes.overrides[experiment]))
                return benchmark_variant(variant(cfg, **{"trainer.precision": precision}), device, sizes, compiled)
            name = f"{experiment} {precision}" + (f" compile={sizes.compile_mode}" if compiled else "")
            steps.append(Step(name, sizes.budgets_s[f"{experiment} {label}"], run))

    def train() -> dict:
        cfg = compose(TRAINED, tuple(sizes.overrides[TRAINED]))
        return training_check(variant(cfg, **{"trainer.precision": "bf16-mixed"}), device, sizes)
    steps.append(Step(f"train {TRAINED} {sizes.train_steps} steps, synthetic images", sizes.budgets_s["training"],
                      train))
    return [step for step in steps if not any(word in step.name for word in leave_out)]


def run_device_check(compose: Compose, tests_dir: Path, out: Path, dry_run: bool,
                     test_files: list[Path] | None = None, leave_out: tuple[str, ...] = (),
                     report: Callable[[StepResult], None] = print) -> dict:
    """Run the steps of ``plan`` (``DRY_RUN`` sizes on the CPU when ``dry_run``); returns the record written
    as JSON."""
    sizes = DRY_RUN if dry_run else GPU
    device = torch.device(sizes.device)
    out.mkdir(parents=True, exist_ok=True)
    threads, matmul_precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(sizes.threads or threads)
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 matmuls on GPUs that have them
    start = time.monotonic()
    try:  # (process-wide settings: restored for the caller, e.g. the test suite)
        description = device_description(device)
        steps = plan(compose, tests_dir, out, sizes, device, test_files, leave_out)
        results = run_steps(steps, sizes.total_budget_s, report)
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(matmul_precision)
    return {
        "device": description,
        "dry_run": dry_run,
        "torch": torch.__version__,
        "float32_matmul_precision": "high",
        "total_seconds": time.monotonic() - start,
        "total_budget_s": sizes.total_budget_s,
        "sizes": asdict(sizes),
        "steps": [asdict(r) for r in results],
    }


# -- the report --------------------------------------------------------------------------------------

def _si(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def markdown_table(record: dict) -> str:
    """One row per step: status, time against its budget, and what it measured."""
    rows = [f"device: {record['device']}, torch {record['torch']}, float32 matmuls "
            f"'{record['float32_matmul_precision']}'{' (dry run: tiny sizes)' if record['dry_run'] else ''}, "
            f"{record['total_seconds']:.0f} s of {record['total_budget_s']:.0f} s",
            "",
            "| step | status | s / budget | train img/s | FLOP/img | of GEMM | peak step MiB | result |",
            "|---|---|---|---|---|---|---|---|"]
    for step in record["steps"]:
        f = step["figures"]
        fraction = f.get("fraction_of_gemm")
        memory = f.get("peak_step_memory_bytes")
        result = "; ".join(text for text in (f.get("summary"), step["error"]) if text) or "-"
        rows.append(
            f"| {step['name']} | {step['status']} | {step['seconds']:.0f} / {step['budget_s']:.0f} "
            f"| {_si(f.get('train_images_per_s'))} | {_si(f.get('flops_per_image'))} "
            f"| {'-' if fraction is None else f'{100 * fraction:.1f}%'} "
            f"| {'-' if memory is None else f'{memory / 2**20:.3g}'} | {result.replace('|', '/')} |")
    return "\n".join(rows)
