"""The diagnostics callback: per-part terms that add up to the bpd exactly, finite values in a real run,
and training left untouched; it measures at every multiple of every_n_steps, once per optimizer step.

Tests of: flowgen/training/periodic.py.
"""

from __future__ import annotations

import csv
import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from flowgen.data import ImageDataModule
from flowgen.dequantization import UniformDequantization
from flowgen.errors import InvalidValueError
from flowgen.flows import ActNorm, Coupling, GlowConditioner
from flowgen.likelihood import bits_per_dim, log_likelihood_bound
from flowgen.models import Glow, RealNVP
from flowgen.training import FlowModule
from flowgen.training.diagnostics import FlowDiagnostics, flow_diagnostics
from tests.conftest import initialize_actnorms, perturb_parameters
from tests.train_runner import FAST, run_dir, run_entry

K = 17  # the digits' number of levels

# tiny tensors: one intra-op thread is fastest, and immune to a busy 2-core box
pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = {
    "glow": lambda: Glow(1, 8, scales=2, steps=2, hidden_channels=8, num_classes=10),
    "realnvp": lambda: RealNVP(1, 8, scales=2, hidden_channels=8, num_blocks=1),
}


def tiny(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model with non-trivial weights (scales away from their initial values), inputs and labels."""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    perturb_parameters(model, std=0.2)
    y, labels = torch.rand(5, 1, 8, 8, dtype=torch.float64) - 0.5, torch.arange(5)
    initialize_actnorms(model, y, y=labels)
    model.eval()
    return model, y, labels


@pytest.mark.parametrize("name", MODELS)
def test_parts_add_up_to_the_bpd_exactly(name):
    model, y, labels = tiny(name)
    log_q = -torch.rand(5, dtype=torch.float64)  # as a variational dequantizer's log q(u|x) would be
    d = {k: float(v) for k, v in flow_diagnostics(model, y, K, log_q, labels).items()}
    assert all(math.isfinite(v) for v in d.values())

    num_dims = 64
    with torch.no_grad():
        expected = bits_per_dim(log_likelihood_bound(model.log_prob(y, labels), num_dims, K, log_q), num_dims).mean()
    assert d["diagnostics/bpd"] == pytest.approx(float(expected), rel=1e-12)
    assert d["diagnostics/dequantization_bpd"] == pytest.approx(math.log2(K) + float(log_q.mean()) / (64 * math.log(2)))
    levels = range(len(model.scales))
    total = (sum(d[f"diagnostics/scale{i}/logdet_bpd"] for i in levels)
             + d["diagnostics/bpd"] * sum(d[f"diagnostics/scale{i}/prior_bpd_fraction"] for i in levels)
             + d["diagnostics/dequantization_bpd"])
    assert total == pytest.approx(d["diagnostics/bpd"], rel=1e-12)
    fractions = sum(v for k, v in d.items() if k.endswith("_bpd_fraction"))
    assert fractions + d["diagnostics/dequantization_bpd"] / d["diagnostics/bpd"] == pytest.approx(1.0, rel=1e-12)

    for i, level in zip(levels, model.scales, strict=True):
        actnorm = torch.cat([m.log_scale.detach().flatten() for m in level if isinstance(m, ActNorm)])
        assert d[f"diagnostics/scale{i}/actnorm_log_scale_min"] == float(actnorm.min())
        assert d[f"diagnostics/scale{i}/actnorm_log_scale_max"] == float(actnorm.max())
        low, mean, high = (d[f"diagnostics/scale{i}/coupling_log_scale_{s}"] for s in ("min", "mean", "max"))
        assert low < mean < high
        if name == "glow":
            assert high < 0  # log σ(h + 2) < 0


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("transform, scale", [("affine", "sigmoid"), ("affine", "tanh"), ("spline", "sigmoid")])
def test_coupling_log_scales_sum_to_its_logdet(mask, parity, transform, scale):
    """Only the transformed elements are counted: their log-scales sum to the coupling's log-det, image by image."""
    torch.manual_seed(0)
    coupling = Coupling(4, partial(GlowConditioner, hidden_channels=8), transform, scale, mask, parity).double()
    perturb_parameters(coupling, std=0.3)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    initialize_actnorms(coupling, x)
    coupling.eval()
    for image in x.split(1):
        s = coupling.log_scales(image)
        assert s.numel() == image.numel() // 2
        torch.testing.assert_close(s.sum(), coupling(image)[1][0], rtol=1e-12, atol=1e-12)


def test_additive_couplings_have_no_scale_to_report():
    model = Glow(1, 8, scales=1, steps=1, hidden_channels=4, coupling="additive")
    initialize_actnorms(model, torch.rand(4, 1, 8, 8) - 0.5)
    model.eval()
    d = flow_diagnostics(model, torch.rand(4, 1, 8, 8) - 0.5, K)
    assert not any("coupling_log_scale" in k for k in d) and "diagnostics/scale0/actnorm_log_scale_max" in d


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"num_images": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=f"diagnostics.{next(iter(bad))} must be an int >= 1"):
        FlowDiagnostics(**bad)


def _fit(tmp_path, memory: str, callbacks: list) -> torch.Tensor:
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=8, scales=2, steps=2, hidden_channels=8, memory=memory)
    module = FlowModule(model=model, dequantizer=UniformDequantization(K), num_levels=K,
                        optimizer=partial(torch.optim.Adam, lr=1e-3))
    data = ImageDataModule(name="digits", image_size=8, channels=1, n_bits=None, num_levels=K, batch_size=16,
                           num_workers=0, val_size=297)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", limit_val_batches=0,
                        logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    assert all(m.training for m in module.modules())  # the eval-mode pass gave every module its mode back
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("memory", ["standard", "checkpoint", "invertible"])
def test_the_callback_does_not_change_training(tmp_path, memory):
    diagnostics = FlowDiagnostics(every_n_steps=1, num_images=4)
    watched = _fit(tmp_path / "with", memory, [diagnostics])
    plain = _fit(tmp_path / "without", memory, [])
    assert torch.equal(watched, plain)  # same weights, bit for bit: same noise, same ActNorm, same steps
    assert diagnostics._last_step == 3 and all(math.isfinite(v) for v in diagnostics.last_metrics.values())


def test_a_training_run_logs_finite_diagnostics(tmp_path):
    args = ["logger=csv", "run_name=diag", "model.hidden_channels=8", "model.steps=2", *FAST, "test=false",
            "callbacks.diagnostics.every_n_steps=2",
            "callbacks.diagnostics.num_images=8"]
    run = run_entry("train.py", args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.output[-3000:]
    rows = list(csv.DictReader((run_dir(tmp_path, "diag") / "csv" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("diagnostics/bpd")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    names = [k for k in rows[0] if k.startswith("diagnostics/")]
    # bpd, dequantization_bpd, then per scale of the 2-scale Glow: 2 parts x (bpd, fraction), 2 groups x 3 scales
    assert len(names) == 2 + 2 * 10
    assert all(math.isfinite(float(r[k])) for r in logged for k in names)
    assert float(logged[0]["diagnostics/dequantization_bpd"]) == pytest.approx(math.log2(K))


def test_a_periodic_callback_is_due_once_per_multiple_of_every_n_steps():
    """With gradient accumulation several batches end at one global step: only the first of them measures."""
    from types import SimpleNamespace

    from flowgen.training.periodic import EveryNSteps

    callback = EveryNSteps(3, "probe")
    steps = [0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 9]
    assert [s for s in steps if callback.due(SimpleNamespace(global_step=s))] == [3, 6, 9]
    with pytest.raises(InvalidValueError, match="probe.every_n_steps must be an int >= 1, got True"):
        EveryNSteps(True, "probe")
