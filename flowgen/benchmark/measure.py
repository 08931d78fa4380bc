"""The measurements of ``scripts/benchmark.py``: step time, device GEMM rate, FLOPs and memory.

Everything is measured on the device the work runs on, in the same process, so that ratios
between variants timed side by side are meaningful on a noisy machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from flowgen.performance import M_MMAP_MAX, M_MMAP_THRESHOLD, glibc

# the flags that decide a CPU's float32 / bf16 matrix-product speed, in the order printed
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'<model name>; flags: avx2 fma ...' from /proc/cpuinfo (those of ``CPU_FLAGS`` it has)."""
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine()
    name, flags = platform.machine(), set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == platform.machine():
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"{name}; flags: {' '.join(present) or 'none'} (no {' '.join(missing) or '-'})"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock interval covers the work it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, queued kernels included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, alternating between them (a, b, c, a, b, c, ...),
    so that a slow spell of the machine hits every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def gemm_call(device: torch.device, dtype: torch.dtype, size: int | None = None) -> tuple[Callable[[], object], int]:
    """One n x n by n x n matrix product in ``dtype`` (n = 8192 on CUDA, 2048 else) and its 2·n³ FLOPs:
    the device's dense-GEMM reference.  It is timed in the same alternating rounds as the work it is
    compared with (medians of both), so a slow spell of a shared machine changes neither ratio."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: a @ b), 2 * n**3


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# Kernels torch.utils.flop_counter has no formula for: ``scaled_dot_product_attention`` on the CPU
# dispatches to its own flash-attention kernels (TarFlow's attention), which the registry misses
# (torch 2.14 has only the CUDA ones).  Counted as the registry counts the CUDA kernels: the two
# products q kᵀ and softmax(·) v (4·B·H·S_q·S_k·d), backward 2.5 times that; a causal mask is not
# discounted.  The registry's own formula wins if a later torch has one.
_EXTRA_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops))
    if hasattr(torch.ops.aten, name)
}


def flop_formula(func) -> Callable[..., int] | None:
    """The FLOP formula of an aten operator (its overload packet's), or None for work that is not counted."""
    packet = func._overloadpacket
    return flop_registry.get(packet) or _EXTRA_FORMULAS.get(packet)


class _FlopCounter(TorchDispatchMode):
    """Adds up the FLOPs of every operator that ``flop_formula`` has a formula for.

    (``FlopCounterMode`` itself also tracks modules with autograd hooks, which breaks on work done
    inside a backward pass, such as the input reconstruction of ``model.memory=invertible``.)
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_formula(func)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matrix multiplies, convolutions and attention, forward and backward,
    recomputations included), by ``torch.utils.flop_counter``'s formulas (``flop_formula``); elementwise
    work (normalisations, activations, the flows' elementwise maps) is not counted."""
    with _FlopCounter() as counter:
        fn()
    return counter.total


_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


def _tensor_spec(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _materialise(spec):
    if isinstance(spec, tuple) and spec[:1] == ("tensor",):
        _, shape, stride, dtype, device = spec  # strides may overlap (an expanded gradient): fill a base
        extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True)) if all(shape) else 0
        return torch.randn(extent, device=device).to(dtype).as_strided(shape, stride)
    return list(spec) if isinstance(spec, tuple) else spec


class _ConvolutionRecorder(TorchDispatchMode):
    """Counts the convolution kernels a call dispatches (forward, and backward with its output mask),
    keyed by their arguments' shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            key = (func, tuple(_tensor_spec(a) for a in args), tuple((k, _tensor_spec(v)) for k, v in kwargs.items()))
            self.calls[key] += 1
        return func(*args, **kwargs)


def recorded_convolutions(fn: Callable[[], object]) -> list[tuple[Callable[[], object], int, int]]:
    """The distinct convolution kernels one call of ``fn`` runs, as (replay, FLOPs, times called):
    ``replay()`` runs the kernel alone on random tensors of the same shapes, strides and dtype
    (the backward with the same output mask)."""
    with _ConvolutionRecorder() as recorder:
        fn()
    kernels = []
    for (func, arg_specs, kwarg_specs), count in recorder.calls.items():
        args = [_materialise(spec) for spec in arg_specs]
        kwargs = {k: _materialise(spec) for k, spec in kwarg_specs}
        with torch.no_grad():
            out = func(*args, **kwargs)
        flops = int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        kernels.append((torch.no_grad()(partial(func, *args, **kwargs)), flops, count))
    return kernels


def convolution_ceiling(fn: Callable[[], object], device: torch.device,
                        gemm: tuple[Callable[[], object], int] | None = None,
                        repeats: int = 5) -> tuple[float | None, float | None]:
    """FLOP/s of the convolution kernels one call of ``fn`` runs, each replayed on its own and weighted
    by how often ``fn`` calls it (None if it runs none), and the FLOP/s of ``gemm`` (a ``gemm_call``)
    timed in the same rounds (None without one).  Each of ``repeats`` rounds replays every kernel
    once, then the GEMM once; each time is the median over the rounds.

    This is the rate the convolution library allows this model on this device: the achieved
    FLOP/s of a whole step, which also runs everything else, cannot pass it.
    """
    kernels = recorded_convolutions(fn)
    calls = {i: replay for i, (replay, _, _) in enumerate(kernels)}
    if gemm is not None:
        calls["gemm"] = gemm[0]
    for call in calls.values():
        call()  # warm-up: kernel selection
    times = interleaved_times(calls, repeats, device)
    seconds = sum(count * median(times[i]) for i, (_, _, count) in enumerate(kernels))
    flops = sum(count * kernel_flops for _, kernel_flops, count in kernels)
    gemm_rate = gemm[1] / median(times["gemm"]) if gemm is not None else None
    return (flops / seconds if kernels else None), gemm_rate


def release_freed_memory() -> None:
    """Make glibc hand freed memory back to the OS from now on, and now (Linux; a no-op elsewhere).

    Above the mmap threshold every allocation is a mapping of its own and returns to the OS when
    freed, so the resident set follows the live tensors.  64 KiB also stops glibc from raising the
    threshold on its own, and mmap is switched back on if ``performance.keep_freed_cpu_memory``
    turned it off; that costs page faults, so measure memory after the timings.
    """
    libc = glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_MAX, 65536)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory a block of work adds on top of what was allocated before it.

    CUDA: ``max_memory_allocated`` minus the allocation at entry (exact, the caching allocator's
    own count).  CPU: the process's resident set sampled every 0.5 ms by a thread, peak minus the
    value at entry; for it to follow the live tensors, ``release_freed_memory`` is called first.
    ``peak_bytes`` is the result; ``kind`` names what was measured.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.0005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.kind = "cuda max allocated" if device.type == "cuda" else "process RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        release_freed_memory()
        self._start = _current_rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _current_rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _current_rss_bytes())
        self.peak_bytes = self._peak - self._start


def saved_activation_bytes(fn: Callable[[], object], parameters=()) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs a forward
    (each storage counted once, the ``parameters`` themselves not counted): the activation memory
    of backprop, exactly, on any device."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
