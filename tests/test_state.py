"""The audit leaves the user's model and the global RNG states exactly as it found them.

DESIGN.md lists what that covers: parameters, buffers, ``training`` flags,
``requires_grad``, ``.grad``, hooks, device, dtype, and the torch / numpy / Python RNG
states. ``gradaudit.state.fingerprint`` hashes all of the model's part bitwise
(including the identity of every ``.grad`` tensor); we compare it, the RNG
fingerprint, every module's training flag and the autograd mode before and after
``gradaudit.audit`` on models chosen to tempt each kind of change.
"""

from __future__ import annotations

import os
import random
import runpy

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.state import fingerprint, rng_fingerprint

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


def resnet18():
    """BatchNorm running statistics and ``num_batches_tracked`` would move in training mode."""
    ns = runpy.run_path(os.path.join(EXAMPLES, "resnet18.py"))
    return ns["model"], (torch.randn(2, 3, 32, 32),)


def mlp_with_dropout():
    """Dropout draws from the global torch RNG when it runs."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    return model, (torch.randn(8, 16),)


def frozen_parameters():
    """Some parameters have requires_grad=False (a frozen backbone)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    return model, (torch.randn(8, 16),)


def grads_and_hooks():
    """Existing .grad values (as after a backward) and registered hooks of every kind."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    model(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    model[0].register_forward_hook(lambda m, i, o: None)
    model[0].register_forward_pre_hook(lambda m, i: None)
    model[4].register_full_backward_hook(lambda m, gi, go: None)
    model[1].register_forward_hook(lambda m, args, kwargs, o: None, with_kwargs=True)
    model.register_forward_hook(lambda m, i, o: None)
    return model, (torch.randn(4, 3, 8, 8),)


def eval_mode():
    """A model in eval mode (BatchNorm uses running statistics, dropout is off)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))
    model(torch.randn(8, 16))  # move the running statistics away from their init
    model.eval()
    return model, (torch.randn(8, 16),)


def mixed_modes_and_attention():
    """Half the modules in eval mode, attention and an LSTM (leaf modules with state)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, dropout=0.1)
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.emb(x)
            a, _ = self.attn(h, h, h)
            o, _ = self.lstm(a)
            return self.head(o)

    torch.manual_seed(5)
    model = Net()
    model.attn.eval()
    return model, (torch.randn(4, 6, 8),)


def deep_copied_layers():
    """nn.TransformerEncoder's deep-copied layers with dropout: the audit runs the stack
    on sampled inputs (gradaudit.propagation.tied), drawing dropout masks."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x)

    torch.manual_seed(6)
    return Net(), (torch.randn(2, 5, 16),)


MODELS = {
    "resnet18-batchnorm": resnet18,
    "deep-copied-layers": deep_copied_layers,
    "mlp-dropout": mlp_with_dropout,
    "frozen-parameters": frozen_parameters,
    "grads-and-hooks": grads_and_hooks,
    "eval-mode": eval_mode,
    "mixed-modes-attention-lstm": mixed_modes_and_attention,
}


def _snapshot(model: nn.Module) -> dict:
    return {
        "model": fingerprint(model),
        "rng": rng_fingerprint(),
        "training": [(name, m.training) for name, m in model.named_modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "grad_ids": [(name, id(p.grad)) for name, p in model.named_parameters()],
        "grad_mode": torch.is_grad_enabled(),
        "devices": sorted({str(t.device) for t in list(model.parameters()) + list(model.buffers())}),
        "dtypes": sorted({str(t.dtype) for t in list(model.parameters()) + list(model.buffers())}),
    }


def _seed_all(seed):
    """Seed the torch, Python and numpy RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_audit_leaves_model_and_rng_untouched(name):
    model, inputs = MODELS[name]()
    _seed_all(123)
    before = _snapshot(model)
    gradaudit.audit(model, inputs)
    after = _snapshot(model)
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"audit changed: {changed}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rng_stream_continues_as_if_no_audit(name):
    """The next random numbers after an audit are those we would have drawn without it."""
    model, inputs = MODELS[name]()
    _seed_all(7)
    expected = (torch.rand(4).tolist(), random.random(), np.random.rand())
    _seed_all(7)
    gradaudit.audit(model, inputs)
    assert (torch.rand(4).tolist(), random.random(), np.random.rand()) == expected


def test_forward_hooks_do_not_see_the_audit():
    """A user's forward hook (a logger) is not called by the static pass: it must not
    receive fake tensors or count extra calls."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    seen: list = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(o).__name__))
    gradaudit.audit(model, (torch.randn(8, 16),))
    assert seen == [], f"the user's forward hook ran during the audit on {seen}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_measurement_helper_leaves_model_untouched(name):
    """tests/measure.py runs real forward/backward passes (BatchNorm statistics, dropout
    masks); the agreement tests rely on it restoring everything too."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from measure import measure

    model, inputs = MODELS[name]()
    before = _snapshot(model)
    measure(model, inputs, draws=2)
    after = _snapshot(model)
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"measure() changed: {changed}"
