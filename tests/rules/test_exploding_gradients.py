"""GA102 exploding-gradients: failing and passing models, checked against real autograd."""

import pytest
import torch
import torch.nn as nn
from rulemodels import audit, check_gradient_crossing, he, measure_layers, mlp, normal, scaled, x_for
from shown import shows

CODE = "GA102"

CASES = [
    pytest.param(lambda: mlp(24, 64, nn.ReLU, scaled(4.0)), ("0", "error"), id="relu-twice-he-24"),
    pytest.param(lambda: mlp(16, 64, nn.Tanh, normal(1.0)), ("8", "error"), id="tanh-normal-1"),
    pytest.param(lambda: mlp(16, 64, nn.ReLU, scaled(4.0)), ("0", "warning"), id="relu-twice-he-16"),
    pytest.param(lambda: mlp(12, 64, nn.ReLU, scaled(4.0)), None, id="relu-twice-he-12"),
    pytest.param(lambda: mlp(24, 64, nn.ReLU, he), None, id="relu-he-24"),
    pytest.param(lambda: mlp(16, 64, nn.Tanh, normal(1.0), norm=nn.LayerNorm), None, id="tanh-normal-1-layernorm"),
]


@pytest.mark.parametrize("build, expect", CASES)
def test_finding_and_real_gradients(build, expect):
    """The finding appears exactly when real autograd shows the first layer's gradient at
    >= 1e3 times the last one's (error), or short of that at >= 1e2 (warning)."""
    check_gradient_crossing(build(), CODE, expect, +1)


def test_message_carries_ratio_and_rate():
    model = mlp(24, 64, nn.ReLU, scaled(4.0))
    (f,) = audit(model, x_for(model), CODE)
    real = [g for _, g in measure_layers(model, x_for(model)).values()]
    assert f.data["ratio"] == pytest.approx(real[0] / real[-1], rel=0.5)
    assert shows(f.message, "grows {}x", f.data["ratio"]) and "10x every" in f.message
    assert f.fix == "nn.init.kaiming_normal_(model[0].weight, nonlinearity='relu')"



class TinyBERT(nn.Module):
    """BertModel's layout at its init: word + position embeddings N(0, 0.02^2) summed
    into a LayerNorm, Post-LN blocks of N(0, 0.02^2) linear layers, and two outputs: the
    hidden states and a pooler on the first token."""

    def __init__(self, depth=2, d=32, vocab=50, n=12):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.ln = nn.Embedding(vocab, d), nn.Embedding(n, d), nn.LayerNorm(d)
        self.ff = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.pooler = nn.Linear(d, d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))
        for ff, norm in zip(self.ff, self.norms):
            x = norm(x + ff(x))
        return x, torch.tanh(self.pooler(x[:, 0]))


@pytest.mark.parametrize("probe", [False, True])
def test_embeddings_summed_into_a_layernorm_are_scale_free(probe):
    """A sum of embeddings that a LayerNorm rescales as a whole is scale-invariant, like a
    layer followed by a norm: its large gradient is no explosion (BertModel at its init
    trains). Real autograd gives the embeddings' output >= 20x the pooler's gradient
    RMS (the norm divides by their 0.03 scale); GA102 stays silent."""
    model, ids = TinyBERT(), torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(2))
    probe_model, outs = TinyBERT(), {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out
        return hook

    for name in ("tok", "pooler"):
        getattr(probe_model, name).register_forward_hook(keep(name))
    gen = torch.Generator().manual_seed(3)
    sum((y * torch.randn(y.shape, generator=gen)).sum() for y in probe_model(ids)).backward()
    rms = lambda t: float(t.grad.pow(2).mean().sqrt())  # noqa: E731
    assert rms(outs["tok"]) >= 20 * rms(outs["pooler"])
    assert audit(model, ids, CODE, probe=probe) == []


@pytest.mark.parametrize("probe", [False, True])
def test_squeeze_and_excitation_gates_are_no_explosion(probe):
    """An SE gate's weight gradient is the gradient of the map it scales, summed over
    the map's positions: it inherits the growth of the BatchNorm path it gates, which the
    normalizations make harmless (those layers are scale-invariant and GA102 does not
    judge them). torchvision's EfficientNet-B0 at its init, real autograd: the first
    gate's fc1 gets >= 3x the classifier's output gradient. GA102 stays silent (it said
    'exploding' on every stock EfficientNet and RegNetY)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    twin, outs = torchvision.models.efficientnet_b0(), {}
    twin.load_state_dict(model.state_dict())
    for name in ("features.1.0.block.1.fc1", "classifier.1"):
        twin.get_submodule(name).register_forward_hook(lambda _m, _a, out, name=name: (out.retain_grad(), outs.__setitem__(name, out))[0])
    y = twin(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    rms = {name: float(out.grad.pow(2).mean().sqrt()) for name, out in outs.items()}
    assert rms["features.1.0.block.1.fc1"] >= 3 * rms["classifier.1"], rms
    assert audit(model, x, CODE, probe=probe) == []
