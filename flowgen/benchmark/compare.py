"""Time the configured model and its comparisons side by side: the records and the table of ``scripts/benchmark.py``
(its command: flowgen/cli/benchmark.py).

Per workload (the configured flowgen model first, then each ``benchmark.compare`` entry):

    train images/s      batch / median step time; the steps of all workloads alternate
    sample images/s     images / median time of ``sample`` (no autograd, no log-det work)
    FLOPs / image       matmul + convolution + attention FLOPs of one training step (forward + backward)
    sample FLOPs / image  the same count for one ``sample`` call, per image: what an inverse costs
                        (TarFlow: T one-token passes with the KV cache, O(T²) token passes without it,
                        one full pass per Jacobi iteration, so fewer where the iteration stops early:
                        on the near-identity blocks of fresh weights it stops after a few passes; give
                        a trained run's ``benchmark.weights`` for what sampling from it costs)
    achieved FLOP/s     FLOPs / image x train images/s, also as a fraction of the device's
                        dense GEMM rate in the same precision, timed in the same rounds as the steps
    conv. ceiling       the FLOP/s of the step's own convolution kernels, each replayed alone
                        (same shapes, layouts, dtype), as a fraction of a GEMM timed in the same
                        rounds: what the convolution library allows this model, which a whole
                        step cannot pass
    peak step memory    what a training step adds on top of weights and optimizer state
                        (CUDA max allocated, or the sampled process RSS on the CPU)
    saved activations   bytes autograd keeps for backward during the forward (exact)
    vs first            train images/s relative to the first workload
"""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig

from flowgen.benchmark.measure import (
    PeakMemory,
    convolution_ceiling,
    count_flops,
    cpu_description,
    gemm_call,
    interleaved_times,
    median,
    saved_activation_bytes,
)
from flowgen.benchmark.workloads import Workload
from flowgen.errors import UserError
from flowgen.evaluation import PRECISIONS
from flowgen.performance import keep_freed_cpu_memory


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{cpu_description()}, {torch.get_num_threads()} threads, "
            f"capability {torch.backends.cpu.get_cpu_capability()}")


def _gemm_dtype(precision: str) -> torch.dtype:
    return PRECISIONS[precision] or torch.float32


def _in_its_process_setting(w: Workload, device: torch.device, fn):
    """``fn`` run after applying ``w``'s process-wide CPU heap setting (the workloads alternate)."""
    def run(*args):
        if device.type == "cpu":
            keep_freed_cpu_memory(w.keep_freed_cpu_memory)
        return fn(*args)
    return run


def measure_workloads(workloads: list[Workload], device: torch.device, cfg: DictConfig) -> list[dict]:
    bench = cfg.benchmark
    train_steps = {w.name: _in_its_process_setting(w, device, w.train_step) for w in workloads}
    samplers = {w.name: _in_its_process_setting(w, device, w.sample) for w in workloads}
    for w in workloads:  # warm-up: ActNorm init, kernel selection, compilation
        for _ in range(int(bench.warmup_steps)):
            loss = train_steps[w.name]()
        if not torch.isfinite(loss):
            raise UserError(f"{w.name}: the warm-up loss is {float(loss)}; the benchmark needs a model that trains")
    # the GEMM reference of each precision takes its turn in the same rounds as the steps
    dtypes = dict.fromkeys(_gemm_dtype(w.precision) for w in workloads) if bench.gemm else {}
    gemms = {dtype: gemm_call(device, dtype) for dtype in dtypes}
    references = {f"gemm {dtype}": call for dtype, (call, _) in gemms.items()}
    for call in references.values():
        call()  # warm-up
    steps = interleaved_times(train_steps | references, int(bench.timed_steps), device)
    gemm = {dtype: flops / median(steps[f"gemm {dtype}"]) for dtype, (_, flops) in gemms.items()}
    n = int(bench.sample_images)
    for w in workloads:
        samplers[w.name](n)  # warm-up of the inverse path
    samples = interleaved_times({name: (lambda s=s: s(n)) for name, s in samplers.items()},
                                int(bench.sample_repeats), device)
    records = []
    for w in workloads:
        dtype = _gemm_dtype(w.precision)
        flops_per_image = count_flops(w.train_step) / w.batch_size
        sample_flops_per_image = count_flops(partial(w.sample, n)) / n
        ceiling, ceiling_gemm = (convolution_ceiling(w.train_step, device, gemms.get(dtype))
                                 if bench.convolution_ceiling else (None, None))
        saved = saved_activation_bytes(w.forward_loss, w.parameters)
        step_s = median(steps[w.name])
        train_ips = w.batch_size / step_s
        achieved = flops_per_image * train_ips
        records.append({
            "name": w.name,
            "settings": w.settings,
            "train_images_per_s": train_ips,
            "step_seconds": steps[w.name],
            "sample_images_per_s": n / median(samples[w.name]),
            "sample_seconds": samples[w.name],
            "flops_per_image": flops_per_image,
            "sample_flops_per_image": sample_flops_per_image,
            "achieved_flops_per_s": achieved,
            "gemm_flops_per_s": gemm.get(dtype),
            "gemm_dtype": str(dtype).replace("torch.", ""),
            "fraction_of_gemm": achieved / gemm[dtype] if dtype in gemm else None,
            "convolution_ceiling_flops_per_s": ceiling,
            "convolution_ceiling_of_gemm": ceiling / ceiling_gemm if ceiling and ceiling_gemm else None,
            "saved_activation_bytes": saved,
            "parameters": sum(p.numel() for p in w.parameters),
        })
    # memory last: on the CPU it changes how glibc allocates from then on (measure.release_freed_memory)
    for w, r in zip(workloads, records, strict=True):
        with PeakMemory(device) as peak:
            w.train_step()
        r["peak_step_memory_bytes"], r["peak_memory_kind"] = peak.peak_bytes, peak.kind
    base = records[0]["train_images_per_s"]
    for r in records:
        r["train_speed_vs_first"] = r["train_images_per_s"] / base
    return records


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def _flops(value: float) -> str:
    """A FLOP count to 3 significant digits with an SI prefix: a CIFAR Glow step is GFLOPs an image,
    an 8x8 digits TarFlow tens of MFLOPs."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def markdown_table(records: list[dict]) -> str:
    head = ("| workload | precision | batch | train img/s | vs first | sample img/s | FLOP/img | sample FLOP/img "
            "| achieved GFLOP/s | of GEMM | conv. ceiling | peak step MiB | saved act. MiB |")
    rows = [head, "|" + "---|" * 13]
    for r in records:
        fraction = _percent(r["fraction_of_gemm"])
        ceiling = _percent(r["convolution_ceiling_of_gemm"])
        rows.append(
            f"| {r['name']} | {r['settings']['precision']} | {r['settings']['batch_size']} "
            f"| {r['train_images_per_s']:.1f} | {r['train_speed_vs_first']:.2f}x | {r['sample_images_per_s']:.1f} "
            f"| {_flops(r['flops_per_image'])} | {_flops(r['sample_flops_per_image'])} "
            f"| {r['achieved_flops_per_s'] / 1e9:.1f} | {fraction} | {ceiling} "
            f"| {r['peak_step_memory_bytes'] / 2**20:.0f} | {r['saved_activation_bytes'] / 2**20:.0f} |")
    return "\n".join(rows)
