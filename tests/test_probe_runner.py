"""The probe's three ways of running a draw measure the same numbers.

Node by node (the first draw: unit counts, batch cosines), the compiled forward with
each layer reduced as it passes (hooks: a model with in-place ops, or large layers), and
the compiled forward with layer outputs and gradients reduced together at the end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradaudit.api import Settings, analyse, capture
from gradaudit.probe import runner as runner_mod
from gradaudit.probe.gradients import SEED
from gradaudit.probe.runner import Runner, graph_module
from gradaudit.propagation.engine import ACTIVATIONS
from gradaudit.state import preserved

pytestmark = pytest.mark.oldest


def _runner(model, inputs):
    graph = capture(model, inputs)
    analysis = analyse(graph, inputs, None, Settings())
    layers = {n.name: n.module for n in analysis.layers()}
    acts = {n.name: n.op for n in graph if n.op in ACTIVATIONS}
    return Runner(model, graph_module(model), graph, layers, acts, Settings())


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    in_place = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 36, 5))

    class Frozen(nn.Module):
        """A frozen first layer on a detached input: its output requires no gradient."""

        def __init__(self) -> None:
            super().__init__()
            self.stem, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
            self.stem.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.tanh(self.stem(x.detach())))

    return {
        "mlp-dropout": (mlp, (torch.randn(8, 16),)),
        "inplace-relu": (in_place, (torch.randn(4, 3, 8, 8),)),
        "detached-layer": (Frozen(), (torch.randn(8, 16),)),
    }


@pytest.mark.parametrize("name", sorted(_models()))
@pytest.mark.parametrize("budget", [runner_mod.HELD_NUMEL, 0], ids=["held", "hooked"])
def test_compiled_draw_measures_what_the_node_by_node_draw_does(name, budget, monkeypatch):
    monkeypatch.setattr(runner_mod, "HELD_NUMEL", budget)
    model, inputs = _models()[name]
    with preserved(model):
        model.train()
        run = _runner(model, inputs)
        assert run._batchable == (budget > 0 and name != "inplace-relu")
        slow = run.run(inputs, seed=SEED, device="cpu", units=True)  # node by node
        fast = run.run(inputs, seed=SEED, device="cpu")
    assert run._program is not None  # the second draw ran the compiled forward
    for field in ("act_sq", "grad_sq", "weight_grad_sq"):
        a, b = getattr(slow, field), getattr(fast, field)
        assert a.keys() == b.keys() and (a or field == "grad_sq")
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (field, k)
    assert fast.grad_norm == pytest.approx(slow.grad_norm, rel=1e-6)


def test_a_compiled_draw_that_fails_is_rerun_node_by_node():
    """The error names the node, as the node-by-node forward's does."""

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).view(3, -1)

    model, inputs = Bad(), (torch.randn(2, 4),)
    run = _runner(model, (torch.randn(3, 4),))
    with pytest.raises(Exception, match="node 'view'"):
        run.run(inputs, seed=SEED, device="cpu")
