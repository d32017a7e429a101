"""GA402 unscaled-attention: hand-written, SDPA and nn.MultiheadAttention, against real logits."""

import pytest
import torch
from rulemodels import MHA, SDPA, HandAttention, ScaledBigQK, audit

CODE = "GA402"

CASES = [
    pytest.param(lambda: HandAttention(64, scale=False), ("softmax", "warning"), id="hand-unscaled-d64"),
    pytest.param(lambda: HandAttention(64, scale=True), None, id="hand-scaled-d64"),
    pytest.param(lambda: ScaledBigQK(64), ("softmax", "warning"), id="hand-scaled-oversized-qk"),
    pytest.param(lambda: HandAttention(8, scale=False), None, id="hand-unscaled-d8"),
    pytest.param(lambda: SDPA(64, scale=1.0), ("scaled_dot_product_attention", "warning"), id="sdpa-scale-1"),
    pytest.param(lambda: SDPA(64), None, id="sdpa-default-scale"),
    pytest.param(lambda: MHA(64, in_std=0.5), ("attn", "warning"), id="mha-oversized-projection"),
    pytest.param(lambda: MHA(64), None, id="mha-default"),
]


def x_attn():
    torch.manual_seed(1)
    return torch.randn(2, 16, 64)


@pytest.mark.parametrize("build, expect", CASES)
def test_finding_and_real_logits(build, expect):
    """Reported iff the real logit std is >= 5; the predicted std within 25% of it."""
    model = build()
    if isinstance(model, HandAttention) and model.d != 64:
        model = HandAttention(model.d, model.scale)
        x = torch.randn(2, 16, model.d)
    else:
        x = x_attn()
    found = audit(model, x[:1], CODE)
    assert [(f.module or f.node, f.severity) for f in found] == ([expect] if expect else [])
    torch.manual_seed(2)
    with torch.no_grad():
        real = float(model.logits(torch.randn(64, 16, x.shape[-1])).std())
    assert (real >= 5) == (expect is not None)
    for f in found:
        assert f.data["logit_std"] == pytest.approx(real, rel=0.25)


def test_saturated_softmax_for_real():
    """The reported softmax is saturated in a real forward pass: its largest weight
    averages above 0.5 over 16 keys (uniform: 1/16)."""
    model = HandAttention(64)
    (f,) = audit(model, x_attn()[:1], CODE)
    with torch.no_grad():
        p = torch.softmax(model.logits(torch.randn(64, 16, 64)), dim=-1)
    assert float(p.max(-1).values.mean()) > 0.5
    assert "no 1/sqrt(d) scale" in f.message and "d = 64" in f.message
    assert f.fix.startswith("scores = q @ k.transpose(-2, -1) / math.sqrt(64)")


def test_sdpa_message_names_the_scale():
    (f,) = audit(SDPA(64, scale=1.0), x_attn()[:1], CODE)
    assert "scale=1 instead of 1/sqrt(64) = 0.125" in f.message


def test_oversized_projections_fix_names_them():
    (f,) = audit(ScaledBigQK(64), x_attn()[:1], CODE)
    assert "scaled but q and k are too large" in f.message
    assert f.fix == "nn.init.xavier_uniform_(model.q.weight); nn.init.xavier_uniform_(model.k.weight)"
