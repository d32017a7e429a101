"""The probe and gradcheck leave the model bitwise as found: parameters, buffers (BN
running statistics, num_batches_tracked), .grad (same objects, same values), modes,
requires_grad, hooks and the RNG states — also when the forward raises."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.errors import GradauditError
from gradaudit.state import fingerprint, rng_fingerprint
from probe_models import small_models

pytestmark = pytest.mark.oldest


class Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class Everything(nn.Module):
    """BN, dropout, a frozen layer, a custom Function, a backward hook, existing .grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(6, 3)
        self.a.weight.requires_grad_(False)
        self.b.register_full_backward_hook(lambda m, gi, go: None)
        self.b.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return self.b(self.drop(Scaled.apply(self.bn(self.a(x)))))


def _with_grads(model):
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model


def _models():
    torch.manual_seed(11)
    out = {name: model for name, (model, _) in small_models().items()}
    out["everything"] = Everything()
    out["everything_eval"] = Everything().eval()
    out["with_grads"] = _with_grads(Everything())
    return out


def _inputs(name, model):
    if name.startswith(("everything", "with_grads")):
        return (torch.randn(5, 6),)
    return small_models()[name][1]


MODELS = list(_models())
RUNS = [
    {"probe": True},
    {"probe": True, "dtype": "fp16"},
    {"probe": True, "dtype": "bf16", "draws": 3},
    {"gradcheck": True},
]


@pytest.mark.parametrize("options", RUNS, ids=["probe", "fp16", "bf16", "gradcheck"])
@pytest.mark.parametrize("name", MODELS)
def test_model_and_rng_left_bitwise_as_found(name, options):
    model = _models()[name]
    inputs = _inputs(name, model)
    if name == "with_grads":
        grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    before = fingerprint(model)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    rng_before = rng_fingerprint()
    gradaudit.audit(model, inputs, **options)
    assert fingerprint(model) == before
    assert rng_fingerprint() == rng_before
    if name == "with_grads":
        assert all(p.grad is g for p, g in grads)


def test_bn_running_stats_really_move_during_the_probe():
    """The restoration is not vacuous: a training-mode forward changes BN's buffers."""
    model = Everything()
    before = model.bn.running_mean.clone()
    model(torch.randn(5, 6) + 3)
    assert not torch.equal(model.bn.running_mean, before)


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.bn(self.a(x))
        return self.b(h.view(-1, 4)[torch.tensor([0, 99])] if self.training else h)


def test_forward_that_raises_leaves_model_untouched_and_is_one_error():
    torch.manual_seed(0)
    model = Raises()
    before = fingerprint(model)
    with pytest.raises(GradauditError, match="probe's forward failed at node 'getitem'"):
        gradaudit.audit(model, (torch.randn(3, 4),), probe=True)
    assert fingerprint(model) == before
    assert all(not getattr(m, "_forward_hooks") for m in model.modules())


def test_probe_runs_in_training_mode_and_restores_eval():
    """A model handed over in eval mode is measured as training runs it: BatchNorm with
    batch statistics (the output of a training-mode BN has per-channel mean 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    x = torch.randn(64, 6)
    report = gradaudit.audit(model, (x,), probe=True, draws=1)
    (bn,) = [layer for layer in report.layers if layer.module == "1"]
    with torch.no_grad():
        h = model[0](x)
        expected = ((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)).pow(2).mean().sqrt()
    assert bn.measured.act_rms == pytest.approx(float(expected), rel=1e-4)
    assert not model.training and not model[1].training
