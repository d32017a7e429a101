"""GA105 unreached-layer: weight layers that no gradient reaches.

Oracle: real autograd. Each failing model's listed layers get ``None`` from
``torch.autograd.grad(..., allow_unused=True)``; each passing model's layers get a
gradient (zero behind a zero head, but a gradient).
"""

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, mlp, x_for, zero_classifier

import gradaudit

CODE = "GA105"


class RoundTrip(nn.Module):
    """The first layer's output makes a round trip through numpy."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.from_numpy(self.proj(x).detach().numpy()))


class Unused(nn.Module):
    """A layer computed and then dropped (an auxiliary head nobody adds to the loss)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        self.aux(h)
        return self.head(h)


class Frozen(Unused):
    """The same unused layer, frozen on purpose."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.aux.requires_grad_(False)


def _unreached(model, x) -> set[str]:
    """Modules whose parameters autograd gives no gradient (the oracle)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    y = model(x)
    grads = torch.autograd.grad(y.sum(), [p for _, p in params], allow_unused=True)
    return {name.rsplit(".", 1)[0] for (name, _), g in zip(params, grads) if g is None}


CASES = [
    pytest.param(RoundTrip, ("proj", "warning"), id="numpy-round-trip"),
    pytest.param(Unused, ("aux", "warning"), id="unused-layer"),
    pytest.param(Frozen, None, id="frozen-unused-layer"),
    pytest.param(lambda: mlp(4, 16, nn.ReLU), None, id="plain-mlp"),
    pytest.param(lambda: zero_classifier(), None, id="zero-head"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    model = build()
    x = torch.randn(4, 8) if not isinstance(model, nn.Sequential) else x_for(model)
    found = audit(model, x, CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])
    assert _unreached(model, x) == ({expect[0]} if expect else set())


class _NoBackward(torch.autograd.Function):
    """The identity whose backward passes nothing on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


class Stopped(RoundTrip):
    """The first layer's output goes through a function whose backward passes nothing."""

    def forward(self, x):
        if x.sum() > -1e9:  # a data-dependent branch: the probe runs the model's own forward
            return self.head(_NoBackward.apply(self.proj(x)))
        return self.head(self.proj(x))


def test_the_probe_finds_a_cut_the_capture_cannot_see():
    """A custom autograd function whose backward returns nothing: the captured graph
    is connected, so the prediction gives 'proj' a gradient; the probe's backward finds
    none, as autograd says."""
    model = Stopped()
    x = torch.randn(16, 8)
    assert _unreached(model, x) == {"proj"}
    assert not audit(model, x, CODE)
    found = audit(model, x, CODE, probe=True)
    assert [(f.module, f.data["source"]) for f in found] == [("proj", "measured")]
