"""What an autoregressive flow costs: density and sampling time of coupling, MAF and IAF flows, side by side.

    python scripts/benchmark_autoregressive.py                       # D = 2, 64, 784 on the CPU
    python scripts/benchmark_autoregressive.py --dims 64 --batch 256 --transform spline

(the command is flowgen/cli/benchmark_autoregressive.py; this module measures and tabulates)

Every flow is ``--layers`` blocks of one kind (``flowgen.flows.vector.build_flow``, no ActNorm)
on (B, D) vectors, with the same elementwise transform and conditioners of the same size (two hidden
layers of width H: the coupling's MLP, the MAF's or IAF's MADE).  Per block, a conditioner pass is

    coupling   density 1 pass,  sampling 1 pass      (x_a given, x_b transformed)
    MAF        density 1 pass,  sampling D passes    (x_i needs x_<i)
    IAF        density D passes, sampling 1 pass     (z_i needs z_<i)

so the sequential direction costs about D times the parallel one; the passes column counts the
conditioner calls of one block with a hook during the timed calls, and the times are medians of
``--repeats`` calls (fewer for a variant whose calls exceed ``--budget`` seconds), all variants of one
D timed in alternating rounds (as ``measure.interleaved_times``) so that a slow spell of a shared
machine hits each alike.  "parameters" counts the numbers a flow can train: a MADE's masked-out
weights are left out.  log_prob = log N(f(x); 0, I) + log|det ∂f/∂x|, sampling =
f^{-1}(z) with ``invert`` (no log-determinant).  The CPU's name and its vector-extension flags
(avx2, avx512f, avx512_bf16, amx) are printed with the table: they decide the matrix-product speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowgen.benchmark.measure import median, timed
from flowgen.flows.autoregressive import MaskedAutoregressive, MaskedLinear
from flowgen.flows.base import FlowSequence
from flowgen.flows.prior import standard_normal_log_prob
from flowgen.flows.vector import FLOW_KINDS, build_flow


@dataclass
class Row:
    dim: int
    batch: int
    hidden: int
    kind: str
    parameters: int
    density_passes: int
    sampling_passes: int
    log_prob_ms: float
    sample_ms: float
    calls: int  # timed calls behind the medians (fewest of the two)


def effective_parameters(flow: FlowSequence) -> int:
    """Trainable numbers that can be non-zero: a MADE's masked-out weights are not counted."""
    masked = sum(int((m.mask == 0).sum()) for m in flow.modules() if isinstance(m, MaskedLinear))
    return sum(p.numel() for p in flow.parameters()) - masked


def conditioner(flow: FlowSequence) -> torch.nn.Module:
    """The first block's conditioner network: a coupling's MLP ``net`` or a MAF's / IAF's ``made``."""
    layer = flow.flows[0].flows[0]
    return layer.made if isinstance(layer, MaskedAutoregressive) else layer.net


def timed_rounds(calls: dict[str, Callable[[], object]], repeats: int, budget: float, device: torch.device,
                 before_call: Callable[[str], None]) -> dict[str, list[float]]:
    """``measure.interleaved_times`` with a budget: a variant is timed ``repeats`` times in alternating rounds,
    or fewer (at least once) when its calls have already taken ``budget`` seconds (the sequential directions
    at large D take minutes a call; their median over fewer calls is still far above the noise)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if times[name] and sum(times[name]) >= budget:
                continue
            before_call(name)
            times[name].append(timed(fn, device))
    return times


def measure_dim(dim: int, batch: int, hidden: int, layers: int, transform: str, repeats: int, budget: float,
                device: torch.device) -> list[Row]:
    """Time log_prob and sampling of every kind of flow at one D, in alternating rounds."""
    torch.manual_seed(0)
    flows = {kind: build_flow(layers, transform, hidden, actnorm=False, dim=dim, kind=kind).to(device).eval()
             for kind in FLOW_KINDS}
    for flow in flows.values():  # away from the zero-initialised identity: the times do not depend on it,
        with torch.no_grad():    # but the sequential passes then solve a real triangular system
            for p in flow.parameters():
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(batch, dim, device=device)

    def log_prob(flow):
        z, logdet = flow(x)
        return standard_normal_log_prob(z) + logdet

    calls = {}
    for kind, flow in flows.items():
        calls[f"{kind}/log_prob"] = lambda flow=flow: log_prob(flow)
        calls[f"{kind}/sample"] = lambda flow=flow: flow.invert(x)
    # count the first block's conditioner calls of every timed call (hooks cost one Python call a pass)
    running, passes = ["warm-up"], dict.fromkeys(["warm-up", *calls], 0)

    def count(*_):
        passes[running[0]] += 1

    hooks = [conditioner(flow).register_forward_hook(count) for flow in flows.values()]
    try:
        with torch.no_grad():
            # warm-up (allocations, oneDNN primitives) with the one-pass calls: the sequential ones run the
            # same networks on the same shapes, D times
            for name in ("coupling/log_prob", "coupling/sample", "maf/log_prob", "iaf/sample"):
                calls[name]()
            times = timed_rounds(calls, repeats, budget, device, lambda name: running.__setitem__(0, name))
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for kind, flow in flows.items():
        density, sampling = f"{kind}/log_prob", f"{kind}/sample"
        rows.append(Row(dim, batch, hidden, kind, effective_parameters(flow),
                        passes[density] // len(times[density]), passes[sampling] // len(times[sampling]),
                        1000 * median(times[density]), 1000 * median(times[sampling]),
                        min(len(times[density]), len(times[sampling]))))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| D | batch | hidden | flow | parameters | conditioner passes per block (density / sampling) "
             "| log_prob (ms) | sampling (ms) | sampling / log_prob | timed calls |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.dim} | {r.batch} | {r.hidden} | {r.kind} | {r.parameters:,} | "
                     f"{r.density_passes} / {r.sampling_passes} | {r.log_prob_ms:,.2f} | {r.sample_ms:,.2f} | "
                     f"{r.sample_ms / r.log_prob_ms:.3g} | {r.calls} |")
    return "\n".join(lines)
