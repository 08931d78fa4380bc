"""Speed settings change no number: NHWC conditioners, folded ActNorm convolutions, torch.compile;
and the benchmark harness measures what it says (scripts/benchmark.py).

Tests of: flowgen/benchmark/compare.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from flowgen.benchmark.measure import (
    PeakMemory,
    convolution_ceiling,
    count_flops,
    gemm_call,
    recorded_convolutions,
    saved_activation_bytes,
)
from flowgen.benchmark.workloads import flowgen_workload, normflows_workload, variant_config
from flowgen.cli import train as train_cli
from flowgen.cli.benchmark import run_benchmark
from flowgen.errors import UserError
from flowgen.flows.nets import ActNormConv2d, GlowConditioner, ResNetConditioner, ZeroConv2d
from flowgen.models import Glow, RealNVP, TarFlow
from flowgen.performance import compile_model, glibc, set_channels_last
from tests.conftest import perturb_parameters
from tests.test_bad_inputs import run_train
from tests.test_configs import compose_train
from tests.train_runner import FAST


def tiny_models():
    torch.manual_seed(0)
    return {
        "glow": lambda: Glow(3, 8, scales=2, steps=2, hidden_channels=16),
        "realnvp": lambda: RealNVP(3, 8, scales=2, hidden_channels=8, num_blocks=1, learn_prior=True),
    }


def twin(factory, x):
    """Two models with the same (initialised, perturbed) weights."""
    a = factory()
    a.train()
    with torch.no_grad():
        a.log_prob(x)  # ActNorm init
    perturb_parameters(a, std=0.05)
    b = factory()
    b.load_state_dict(a.state_dict())
    return a, b


def assert_grads_close(got: dict, expected: dict, rel: float) -> None:
    """All gradients as one vector: ||g - g_ref|| <= rel * ||g_ref||; and every parameter's gradient to
    1e-3 of the largest entry (sums taken in another order differ per element by rounding only)."""
    assert got.keys() == expected.keys()
    flat = torch.cat([g.flatten() for g in expected.values()])
    diff = torch.cat([(got[n] - g).flatten() for n, g in expected.items()])
    assert diff.norm() <= rel * flat.norm(), float(diff.norm() / flat.norm())
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-3, atol=1e-3 * float(flat.abs().max()), msg=n)


def grads(model, x):
    model.zero_grad()
    loss = -model.log_prob(x).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["glow", "realnvp"])
def test_channels_last_conditioners_change_no_number(name):
    x = torch.rand(4, 3, 8, 8) - 0.5
    contiguous, nhwc = twin(tiny_models()[name], x)
    assert set_channels_last(nhwc, True) > 0
    assert set_channels_last(contiguous, False) > 0
    loss_a, grads_a = grads(contiguous, x)
    loss_b, grads_b = grads(nhwc, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads_b, grads_a, rel=1e-5)
    contiguous.eval(), nhwc.eval()
    with torch.no_grad():
        zs = contiguous(x)[0]
        torch.testing.assert_close(nhwc.inverse(zs)[0], contiguous.inverse(zs)[0], rtol=1e-5, atol=1e-6)
        # the conditioner hands the flow path its usual layout back
        net = next(m for m in nhwc.modules() if isinstance(m, (GlowConditioner, ResNetConditioner)))
        inp = torch.randn(2, net.net[0].conv.in_channels if name == "glow" else net.net[0].in_channels, 4, 4)
        assert net(inp).is_contiguous()


def test_folded_actnorm_convolution_is_the_same_map():
    torch.manual_seed(0)
    layer = ActNormConv2d(6, 16, 3)
    x = torch.randn(8, 6, 5, 5)
    layer.train()
    first = layer(x)  # first batch: conv, then ActNorm's data-dependent init
    assert bool(layer.norm.initialized)
    with torch.no_grad():
        layer.norm.bias.add_(0.3)
        layer.norm.log_scale.sub_(0.2)
    folded = layer(x)
    unfolded = layer.norm(layer.conv(x))[0]
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
    assert first.shape == folded.shape
    zero = ZeroConv2d(6, 4)
    with torch.no_grad():
        zero.conv.weight.normal_(), zero.conv.bias.normal_(), zero.logs.normal_(std=0.1)
    expected = zero.conv(x) * (3 * zero.logs).exp()
    torch.testing.assert_close(zero(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [pytest.param("step", marks=pytest.mark.slow), "model"])
def test_compiled_model_gives_the_eager_log_prob(mode):
    torch._dynamo.reset()
    x = torch.rand(2, 1, 4, 4) - 0.5
    eager, compiled = twin(lambda: Glow(1, 4, scales=1, steps=2, hidden_channels=8), x)
    compile_model(compiled, mode)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    loss_a, grads_a = grads(eager, x)
    loss_b, grads_b = grads(compiled, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads_b, grads_a, rel=1e-5)


@pytest.mark.parametrize("mode", [pytest.param("step", marks=pytest.mark.slow), "model"])
def test_compiled_tarflow_gives_the_eager_log_prob_and_samples(mode):
    """compile=step compiles each flow block's forward, compile=model the log_prob pass (class-conditional,
    attention included); sampling runs the eager inverse of the same weights."""
    torch._dynamo.reset()
    x, labels = torch.rand(2, 1, 4, 4) - 0.5, torch.tensor([0, 2])
    eager, compiled = twin(lambda: TarFlow(1, 4, 2, width=8, num_blocks=2, layers_per_block=1, num_heads=2,
                                           num_classes=3), x)
    compile_model(compiled, mode)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for model in (eager, compiled):
        model.zero_grad()
        (-model.log_prob(x, labels).mean()).backward()
    torch.testing.assert_close(compiled.log_prob(x, labels), eager.log_prob(x, labels), rtol=1e-5, atol=1e-5)
    assert_grads_close({n: p.grad for n, p in compiled.named_parameters()},
                       {n: p.grad for n, p in eager.named_parameters()}, rel=1e-5)
    samples = [m.eval().sample(2, y=1, generator=torch.Generator().manual_seed(0)) for m in (eager, compiled)]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-5, atol=1e-5)


def test_unknown_compile_mode_is_one_clear_error():
    with pytest.raises(UserError, match="performance.compile=fast is not one of none, step, model"):
        compile_model(Glow(1, 4, scales=1, steps=1, hidden_channels=4), "fast")


# -- the measurements ------------------------------------------------------------------------------
def test_flop_count_of_a_matmul_and_a_convolution():
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 32
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 5 * 5 * 6 * 4 * 9


def test_flop_count_of_attention_forward_and_backward():
    """scaled_dot_product_attention on the CPU runs kernels torch's registry has no formula for: counted as
    its CUDA kernels are, q kᵀ and softmax(·) v (4·B·H·S_q·S_k·d), the backward 2.5 times that, in bf16 too."""
    b, h, s, d = 2, 3, 16, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    attention = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    assert count_flops(lambda: attention(q, q, q)) == 4 * b * h * s * s * d
    assert count_flops(lambda: attention(q, q, q).sum().backward()) == (4 + 10) * b * h * s * s * d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert count_flops(lambda: attention(q, q, q)) == 4 * b * h * s * s * d
    one_query = torch.randn(b, h, 1, d)  # a KV-cached step: one new token against s cached ones
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(one_query, q, q)) == 4 * b * h * s * d


def test_flop_count_of_a_tarflow_forward_is_its_linear_layers_and_attention():
    """Per block the transformer runs on the T-1 tokens h_0..h_{T-2}: the input and output projections, per layer
    qkv, attention, its projection and the MLP (ratio r), 2 FLOPs a multiply-add."""
    t, dim, width, layers, ratio, blocks, batch = 16, 4, 16, 2, 4, 3, 5
    model = TarFlow(1, 8, 2, width=width, num_blocks=blocks, layers_per_block=layers, num_heads=2, mlp_ratio=ratio)
    n = t - 1
    per_layer = 2 * n * (3 * width * width + width * width + 2 * ratio * width * width) + 4 * n * n * width
    per_block = 2 * n * dim * width + layers * per_layer + 2 * n * width * 2 * dim  # affine: 2 numbers an element
    with torch.no_grad():
        assert count_flops(lambda: model(torch.rand(batch, 1, 8, 8))) == batch * blocks * per_block


def test_recorded_convolutions_replay_the_kernels_of_a_step():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 3, 3, 3, requires_grad=True)

    def step():
        y = torch.nn.functional.conv2d(x, w, padding=1)
        torch.nn.functional.conv2d(y.relu(), w.transpose(0, 1), padding=1).sum().backward()

    kernels = recorded_convolutions(step)
    # two forward and two backward kernels, each called once; together all the FLOPs of the step
    assert sorted(count for _, _, count in kernels) == [1, 1, 1, 1]
    assert sum(flops * count for _, flops, count in kernels) == count_flops(step)
    replayed = kernels[0][0]()
    assert replayed.shape == (2, 5, 8, 8) and replayed.is_contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    conv_rate, gemm_rate = convolution_ceiling(step, cpu, gemm_call(cpu, torch.float32, size=64), repeats=1)
    assert conv_rate > 0 and gemm_rate > 0
    assert convolution_ceiling(lambda: (x * 2).sum(), cpu) == (None, None)


def test_saved_activation_bytes_counts_what_backward_keeps():
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(128, 64)
    # x @ w keeps x (the weight is not an activation); tanh keeps its output (128 x 64 floats)
    assert saved_activation_bytes(lambda: torch.tanh(x @ w).sum(), [w]) == 2 * 128 * 64 * 4
    with torch.no_grad():
        assert saved_activation_bytes(lambda: torch.tanh(x @ w).sum(), [w]) == 0


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    assert peak.peak_bytes > 48 * 2**20, peak.peak_bytes
    assert peak.kind == "process RSS"


# run in a fresh process: glibc's heap is process-wide state that earlier tests shape
_KEEP_FREED_SCRIPT = """
import torch
from flowgen.benchmark.measure import release_freed_memory
from flowgen.performance import keep_freed_cpu_memory

MIB = 2**20

def resident_growth_of_a_freed_tensor():
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    before = resident()
    t = torch.ones(96 * MIB // 4)  # 96 MiB, above any mmap threshold glibc would pick itself
    del t
    return resident() - before

assert keep_freed_cpu_memory(False)
growth = [resident_growth_of_a_freed_tensor()]  # its own pages, unmapped when freed
assert keep_freed_cpu_memory(True)
growth.append(resident_growth_of_a_freed_tensor())  # from the heap, kept there when freed
release_freed_memory()  # what the benchmark's memory measurement sets: returned again
growth.append(resident_growth_of_a_freed_tensor())
print(*(g // MIB for g in growth))
"""


@pytest.mark.skipif(glibc() is None, reason="a glibc (Linux) setting")
def test_keep_freed_cpu_memory_keeps_a_freed_large_tensor():
    run = subprocess.run([sys.executable, "-c", _KEEP_FREED_SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    returned, kept, returned_again = map(int, run.stdout.split())
    assert returned < 16 and kept > 80 and returned_again < 16, run.stdout


def test_benchmark_writes_a_record_per_workload(tmp_path, capsys):
    pytest.importorskip("normflows")
    cfg = compose_train(tmp_path, [
        "model.scales=2", "model.steps=1", "model.hidden_channels=8", "data.batch_size=4", "data.image_size=8",
        "benchmark.warmup_steps=1", "benchmark.timed_steps=2", "benchmark.sample_repeats=1",
        "benchmark.compare=[normflows, 'model.memory=invertible performance.channels_last=false "
        "performance.keep_freed_cpu_memory=true']",
        f"benchmark.output={tmp_path}/bench.json"], config_name="benchmark")
    records = run_benchmark(cfg)
    saved = json.loads((tmp_path / "bench.json").read_text())
    variant = "flowgen model.memory=invertible performance.channels_last=false performance.keep_freed_cpu_memory=true"
    assert [w["name"] for w in saved["workloads"]] == ["flowgen", "normflows", variant]
    for r in records:
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0 and r["flops_per_image"] > 0
        assert len(r["step_seconds"]) == 2 and math.isfinite(r["achieved_flops_per_s"])
        assert r["fraction_of_gemm"] > 0 and r["gemm_dtype"] == "float32"
        assert r["convolution_ceiling_flops_per_s"] > 0 and r["convolution_ceiling_of_gemm"] > 0
    assert records[0]["train_speed_vs_first"] == 1.0
    assert records[2]["settings"]["memory"] == "invertible" and records[2]["settings"]["channels_last"] is False
    assert [r["settings"]["keep_freed_cpu_memory"] for r in records] == [False, False, True]
    # normflows' Glow at the same architecture has about as many parameters (priors differ slightly)
    assert abs(records[1]["parameters"] / records[0]["parameters"] - 1) < 0.1
    # the invertible variant keeps far fewer activations for backward
    assert records[2]["saved_activation_bytes"] < records[0]["saved_activation_bytes"]
    assert "| flowgen | 32-true | 4 |" in capsys.readouterr().out


def test_benchmark_compares_tarflow_sampling_with_and_without_the_kv_cache_and_jacobi(tmp_path, capsys):
    """model=tarflow with benchmark.compare over the inverse methods: one record each, the same training step
    (same FLOPs per image), and sampling FLOPs that tell the methods apart: the uncached inverse reruns the
    transformer on the whole prefix at every token."""
    methods = ["sequential_uncached", "jacobi", "jacobi model.jacobi_segments=4 model.jacobi_tolerance=1e-4"]
    compare = ", ".join(f"'model.inverse_method={m}'" for m in methods)
    cfg = compose_train(tmp_path, [
        "model=tarflow", "data=digits", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1",
        "model.num_heads=2", "data.batch_size=8", "benchmark.warmup_steps=1", "benchmark.timed_steps=2",
        "benchmark.sample_repeats=1", f"benchmark.compare=[{compare}]", f"benchmark.output={tmp_path}/bench.json"],
        config_name="benchmark")
    records = run_benchmark(cfg)
    assert [r["name"] for r in records] == ["flowgen", *(f"flowgen model.inverse_method={m}" for m in methods)]
    assert [r["settings"]["model"]["inverse_method"] for r in records] == ["sequential", *(m.split()[0]
                                                                                         for m in methods)]
    for r in records:
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0
        assert r["flops_per_image"] == records[0]["flops_per_image"] > 0 and r["sample_flops_per_image"] > 0
        assert r["convolution_ceiling_flops_per_s"] is None  # a transformer: no convolution to replay
    cached, uncached = records[0]["sample_flops_per_image"], records[1]["sample_flops_per_image"]
    assert uncached > 4 * cached  # T = 16 tokens: O(T²) token passes against O(T)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["device"].startswith(("cuda", "NVIDIA")) or "flags:" in saved["device"]
    assert "| sample FLOP/img |" in capsys.readouterr().out


def test_benchmark_starts_from_the_weights_of_a_checkpoint(tmp_path):
    """benchmark.weights: every flowgen workload starts from a run's weights (its EMA, which sample.py uses);
    another architecture or a missing path is one clear error."""
    tiny = ["model=tarflow", "data=digits", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1",
            "model.num_heads=2"]
    run_cfg = compose_train(tmp_path / "train", [*tiny, "ema_decay=0.9", "logger=csv", *FAST, "run_name=weights",
                                                 "trainer.max_steps=3", "test=false"])
    train_cli.train(run_cfg)
    run = Path(run_cfg.paths.output_dir)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    cpu = torch.device("cpu")
    workload = flowgen_workload(compose_train(tmp_path, [*tiny, "data.batch_size=4", f"benchmark.weights={run}"],
                                              config_name="benchmark"), cpu)
    assert workload.settings["weights"] == f"{run / 'checkpoints' / 'last.ckpt'} (ema weights)"
    for name, tensor in workload.model.state_dict().items():
        assert torch.equal(tensor, state[f"ema.module.{name}"]), name
    with pytest.raises(UserError, match="another architecture"):
        flowgen_workload(compose_train(tmp_path, [*tiny, "model.width=32", f"benchmark.weights={run}"],
                                       config_name="benchmark"), cpu)
    with pytest.raises(UserError, match="benchmark.weights=.*no such checkpoint file or run directory"):
        flowgen_workload(compose_train(tmp_path, [*tiny, f"benchmark.weights={tmp_path / 'nowhere'}"],
                                       config_name="benchmark"), cpu)


@pytest.mark.parametrize("implementation", ["flowgen", "normflows"])
def test_benchmark_steps_follow_the_runs_learning_rate_warmup(tmp_path, implementation):
    """Both workloads step the training schedule: lr · (t + 1) / W at step t, so a deep Glow does not
    diverge in the benchmark's first steps (K=32 at the full rate reached an inf loss in two)."""
    if implementation == "normflows":
        pytest.importorskip("normflows")
    cfg = compose_train(tmp_path, ["model.scales=2", "model.steps=1", "model.hidden_channels=8", "data.batch_size=4",
                                   "data.image_size=8", "scheduler.warmup_steps=4", "optimizer.lr=0.002"],
                        config_name="benchmark")
    workload = (flowgen_workload if implementation == "flowgen" else normflows_workload)(cfg, torch.device("cpu"))
    rates = []
    for _ in range(6):
        rates.append(workload.optimizer.param_groups[0]["lr"])
        assert torch.isfinite(workload.train_step())
    assert rates == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002, 0.002])


def test_benchmark_comparison_entries_are_checked(tmp_path):
    cfg = compose_train(tmp_path, config_name="benchmark")
    with pytest.raises(UserError, match="model.bogus is not a key"):
        variant_config(cfg, "model.bogus=1")
    with pytest.raises(UserError, match="expected key=value overrides"):
        variant_config(cfg, "bf16")
    assert variant_config(cfg, "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("keep", [True, False])
def test_train_applies_keep_freed_cpu_memory_only_when_asked(tmp_path, capsys, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(train_cli, "keep_freed_cpu_memory", calls.append)
    # a mistake caught right after the setting is applied, so no training runs
    run_train(tmp_path, capsys, [f"performance.keep_freed_cpu_memory={keep}", "model.num_classes=3"])
    assert calls == ([True] if keep else [])
