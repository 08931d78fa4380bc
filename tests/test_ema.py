"""The EMA of the weights: the warmed-up decay, copied buffers, and resume of the warm-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowgen.flows.actnorm import ActNorm
from flowgen.training.ema import EMA


def _model():
    torch.manual_seed(0)
    return nn.ModuleList([nn.Conv2d(3, 3, 1), ActNorm(3)])


def test_average_follows_the_warmed_up_decay():
    model = _model()
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
        ema.update(model)
    for e, p in zip(expected, ema.module.parameters(), strict=True):
        torch.testing.assert_close(p, e)
    assert int(ema.num_updates) == 30


def test_initial_weights_are_forgotten_quickly():
    # with a plain decay of 0.999 the initial weights would keep 0.999^100 = 90% after 100 steps
    model = _model()
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    for _ in range(100):
        ema.update(model)
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.ones_like(p), atol=1e-6, rtol=0)


def test_buffers_are_copied_and_no_gradient_flows():
    model = _model()
    ema = EMA(model, decay=0.99)
    model.train()
    with torch.no_grad():
        model[1](torch.randn(16, 3, 4, 4) * 3 + 1)  # the data-dependent init sets the flag
    ema.update(model)
    assert bool(ema.module[1].initialized)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_warm_up_resumes_from_a_state_dict():
    model = _model()
    ema = EMA(model, decay=0.999)
    for _ in range(7):
        ema.update(model)
    restored = EMA(_model(), decay=0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == ema.current_decay() == pytest.approx(8 / 17)


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(_model(), decay=1.0)
