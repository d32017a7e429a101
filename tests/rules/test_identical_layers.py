"""GA206 identical-layers: stacks of deep-copied layers, whose gradients are evaluated
numerically (gradaudit.propagation.tied), found and explained; others left alone.

Oracle for the numbers: real autograd on the same model (tests/test_tied.py)."""

import copy

import pytest
import torch
import torch.nn as nn

import gradaudit

CODE = "GA206"


def encoder(layers=6, norm_first=False, d=32):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), (torch.randn(2, 8, d),)


class Copies(nn.Module):
    """``[copy.deepcopy(block)] * n`` written by hand; ``share``: one block object n times;
    ``redraw``: each copy re-initialised."""

    def __init__(self, n=5, d=16, share=False, redraw=False):
        super().__init__()
        torch.manual_seed(1)
        block = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.blocks = nn.ModuleList([block] * n if share else [copy.deepcopy(block) for _ in range(n)])
        if redraw:
            for b in self.blocks:
                b[0].reset_parameters()

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def findings(model, inputs):
    return [f for f in gradaudit.audit(model, inputs).findings if f.rule == CODE]


CASES = [
    pytest.param(lambda: encoder(6, False), 6, id="post-ln-encoder"),
    pytest.param(lambda: encoder(4, True), 4, id="pre-ln-encoder"),
    pytest.param(lambda: (Copies(5), (torch.randn(8, 16),)), 5, id="deepcopy-list"),
    pytest.param(lambda: (Copies(5, share=True), (torch.randn(8, 16),)), None, id="shared-module"),  # weight sharing
    pytest.param(lambda: (Copies(5, redraw=True), (torch.randn(8, 16),)), None, id="redrawn-copies"),
]


@pytest.mark.parametrize("build, blocks", CASES)
def test_found_only_for_deep_copies(build, blocks):
    model, inputs = build()
    found = findings(model, inputs)
    if blocks is None:
        assert found == []
        return
    assert len(found) == 1
    f = found[0]
    assert f.severity == "info" and f.data["blocks"] == blocks
    assert f"{blocks} layers" in f.message and "decades" in f.message
    assert "inf" not in f.message and "nan" not in f.message
