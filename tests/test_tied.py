"""Stacks of deep-copied layers (nn.TransformerEncoder) against real autograd.

Independent weights per layer are the moment propagation's premise; deep copies break
it (the same Jacobian N times). gradaudit.propagation.tied evaluates such a stack on
sampled inputs. The measured gradient is heavy-tailed from draw to draw (the alignment
with the dominant direction varies), so both sides average 16 draws."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_coherence import assert_agrees  # noqa: E402

from gradaudit.api import Settings, analyse, capture  # noqa: E402
from gradaudit.propagation import tied  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Encoder(nn.Module):
    def __init__(self, layers: int, norm_first: bool, d: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x)


def encoder(layers: int, norm_first: bool, d: int = 64):
    torch.manual_seed(0)
    return Encoder(layers, norm_first, d), (torch.randn(4, 16, d),)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_deep_copied_encoder_of_16_layers(norm_first):
    """Independent-layer moments put the Post-LN input gradient >2 decades low here."""
    model, inputs = encoder(16, norm_first)
    assert_agrees(model, inputs, draws=16)


def test_the_stack_and_its_gains():
    model, inputs = encoder(6, False)
    analysis = analyse(capture(model, inputs), inputs, None, Settings())
    (stack,) = analysis.tied
    assert (stack.container, stack.blocks, stack.input) == ("enc.layers", 6, "x")
    assert stack.measured_gain > 0 and stack.predicted_gain > 0
    # the stack's output gradient is the propagation's own; the input's is the measured ratio
    g_out = analysis.stat(stack.output).g2
    assert analysis.stat(stack.input).g2 == pytest.approx(stack.measured_gain * g_out, rel=1e-9)


def test_shared_storage_is_not_a_deep_copy():
    """The meta stand-in shares one draw between identical blocks (standing for
    independent draws); a tied parameter is one tensor: neither is a stack."""
    model, inputs = encoder(4, True)
    for layer in model.enc.layers[1:]:
        for (name, p), p0 in zip(layer.named_parameters(), model.enc.layers[0].parameters()):
            p.data = p0.data  # same storage
    assert tied.find(capture(model, inputs)) == []
