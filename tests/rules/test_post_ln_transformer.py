"""GA401 post-ln-transformer: nn.TransformerEncoderLayer and hand-written blocks, Post-LN vs Pre-LN."""

import pytest
import torch
import torch.nn as nn
from rulemodels import Encoder, HandTransformer, audit
from shown import shows

CODE = "GA401"


def torch_encoder(depth, norm_first):
    """nn.TransformerEncoder itself (the frontend traces through it)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


CASES = [
    pytest.param(lambda: Encoder(6, norm_first=False), ("layers.0.norm1", "warning"), id="encoder-post-ln-6"),
    pytest.param(lambda: Encoder(6, norm_first=True), None, id="encoder-pre-ln-6"),
    pytest.param(lambda: Encoder(5, norm_first=False), None, id="encoder-post-ln-5"),
    pytest.param(lambda: torch_encoder(6, False), ("layers.0.norm1", "warning"), id="nn-transformer-encoder-post-ln"),
    pytest.param(lambda: torch_encoder(6, True), None, id="nn-transformer-encoder-pre-ln"),
    pytest.param(lambda: HandTransformer(6, pre=False), ("blocks.0.ln", "warning"), id="hand-post-ln-6"),
    pytest.param(lambda: HandTransformer(8, pre=True), None, id="hand-pre-ln-8"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding(build, expect):
    found = audit(build(), torch.randn(2, 10, 32), CODE)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])


def _block_ratios(model, prefix, blocks=6):
    """Last-block / first-block gradient RMS: real dL/dW over each block's 2-D weights
    (autograd, L = <y, g>), and gradaudit's prediction at the weight layers' outputs."""
    import gradaudit

    report = gradaudit.audit(model, torch.randn(2, 10, 32), select=[])
    pred = []
    for i in (0, blocks - 1):
        v = [r.predicted.grad_rms for r in report.layers if r.depth and r.module.startswith(f"{prefix}.{i}.")]
        pred.append(sum(x * x for x in v) / len(v))
    torch.manual_seed(4)
    y = model(torch.randn(16, 10, 32))
    (y * torch.randn_like(y)).sum().backward()
    real = []
    for i in (0, blocks - 1):
        gs = [w.grad for w in model.get_submodule(f"{prefix}.{i}").parameters() if w.dim() == 2]
        real.append(float(torch.cat([g.reshape(-1) for g in gs]).pow(2).mean()))
    model.zero_grad()
    return (real[1] / real[0]) ** 0.5, (pred[1] / pred[0]) ** 0.5


@pytest.mark.parametrize(
    "post, pre, prefix",
    [
        (lambda: Encoder(6, norm_first=False), lambda: Encoder(6, norm_first=True), "layers"),
        (lambda: HandTransformer(6, pre=False), lambda: HandTransformer(6, pre=True), "blocks"),
    ],
)
def test_post_ln_skews_gradients_toward_the_output(post, pre, prefix):
    """Xiong et al. 2020: relative to Pre-LN, Post-LN puts more gradient on the blocks
    near the output. Real autograd on the same weights shows it (last/first ratio larger
    for Post-LN), and so does the prediction."""
    real_post, pred_post = _block_ratios(post(), prefix)
    real_pre, pred_pre = _block_ratios(pre(), prefix)
    assert real_post > real_pre
    assert pred_post > pred_pre


def test_message_carries_block_count_and_gradients():
    (f,) = audit(Encoder(6), torch.randn(2, 10, 32), CODE)
    assert f.data["blocks"] == 6 and "6 blocks" in f.message and "O(d sqrt(ln d))" in f.message
    assert shows(f.message, "{} in 'layers.0'", f.data["first_block_grad_rms"])


def test_fix_names_norm_first_for_encoder_layers():
    (f,) = audit(Encoder(6), torch.randn(2, 10, 32), CODE)
    assert f.fix.startswith("nn.TransformerEncoderLayer(32, nhead, norm_first=True)")
    (g,) = audit(HandTransformer(6), torch.randn(2, 10, 32), CODE)
    assert g.fix.startswith("x = x + f(model.blocks[0].ln(x))")
