"""Small models with known gradient behaviour for the rule tests, and a real-autograd
measurement that shares nothing with gradaudit's propagation.

Every builder seeds torch's RNG itself (``torch.manual_seed``) and restores nothing
else: tests call them, not the audit.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradaudit


def audit(model: nn.Module, x, code: str, **kw):
    """The findings of rule ``code`` (only that rule selected). Every finding must carry
    a fix that is valid Python and a message with at least one number."""
    report = gradaudit.audit(model, x, select=[code], **kw)
    found = [f for f in report.findings if f.rule == code]
    for f in found:
        assert f.fix, f"{code} finding without a fix"
        compile(f.fix, "<fix>", "exec")
        assert any(ch.isdigit() for ch in f.message)
    return found


# ----------------------------------------------------------------------------- MLPs
def normal(std):
    return lambda w: nn.init.normal_(w, std=std)


def scaled(n_var):
    """Gaussian weights with n Var[w] = n_var (n = fan-in)."""
    return lambda w: nn.init.normal_(w, std=math.sqrt(n_var / w.shape[1]))


def he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def lecun(w):
    nn.init.kaiming_normal_(w, nonlinearity="linear")


def default(w):
    """Leave PyTorch's default init, U(+-1/sqrt(fan_in)): n Var[w] = 1/3."""


def mlp(depth, width, act=nn.ReLU, init=default, *, norm=None, bias=True, seed=0, dtype=None):
    """Linear(width, width) x depth with ``act`` (and ``norm`` before it) after every
    layer but the last."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, bias=bias)
        init(lin.weight)
        layers.append(lin)
        if i < depth - 1:
            if norm is not None:
                layers.append(norm(width))
            layers.append(act())
    model = nn.Sequential(*layers)
    return model.to(dtype) if dtype is not None else model


def x_for(model: nn.Module, batch: int = 4, dtype=None):
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    torch.manual_seed(1)
    return torch.randn(batch, first.in_features, dtype=dtype or first.weight.dtype)


class ResMLP(nn.Module):
    """x = x + relu(block(x)), no normalization."""

    def __init__(self, depth=24, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return x


class FixupBlock(nn.Module):
    """Residual branch whose last layer is zero-initialised (Fixup / SkipInit style)."""

    def __init__(self, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        nn.init.zeros_(self.b.weight)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x)


def constant_hidden(value=0.01, width=32, seed=0):
    torch.manual_seed(seed)
    fc = nn.Linear(width, width)
    nn.init.constant_(fc.weight, value)
    return nn.Sequential(fc, nn.ReLU(), nn.Linear(width, 10))


def all_constant(depth=3, width=32, value=0.05):
    """Every weight constant and every bias zero: exactly symmetric units."""
    model = mlp(depth, width, nn.ReLU)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.weight, value)
            nn.init.zeros_(m.bias)
    return model


def zero_classifier(width=32, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(width, 10)
    nn.init.zeros_(head.weight)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), head)


# ----------------------------------------------------------------------------- transformers
class Encoder(nn.Module):
    """``depth`` nn.TransformerEncoderLayer blocks called in a loop."""

    def __init__(self, depth=6, norm_first=False, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
                for _ in range(depth)
            ]
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class FFBlock(nn.Module):
    def __init__(self, d=32, pre=False):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pre = pre

    def forward(self, x):
        if self.pre:
            return x + self.ff(self.ln(x))
        return self.ln(x + self.ff(x))


class HandTransformer(nn.Module):
    """Hand-written residual blocks, Post-LN (``ln(x + f(x))``) or Pre-LN (``x + f(ln(x))``)."""

    def __init__(self, depth=6, pre=False, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([FFBlock(d, pre) for _ in range(depth)])
        self.final = nn.LayerNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.final(x)


def xavier_qkv(d):
    """Three d x d linear projections (q, k, v) with Xavier-normal weights."""
    q, k, v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    for lin in (q, k, v):
        nn.init.xavier_normal_(lin.weight)
    return q, k, v


class HandAttention(nn.Module):
    """softmax(q @ k^T [/ sqrt(d)]) @ v with Xavier-initialised projections."""

    def __init__(self, d=64, scale=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = xavier_qkv(d)
        self.scale = scale
        self.d = d

    def logits(self, x):
        s = self.q(x) @ self.k(x).transpose(-2, -1)
        return s / math.sqrt(self.d) if self.scale else s

    def forward(self, x):
        return torch.softmax(self.logits(x), dim=-1) @ self.v(x)


class SDPA(nn.Module):
    def __init__(self, d=64, scale=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = xavier_qkv(d)
        self.scale = scale

    def logits(self, x):
        s = 1 / math.sqrt(self.q.out_features) if self.scale is None else self.scale
        return s * self.q(x) @ self.k(x).transpose(-2, -1)

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), scale=self.scale)


class MHA(nn.Module):
    def __init__(self, d=64, heads=1, in_std=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        if in_std is not None:
            nn.init.normal_(self.attn.in_proj_weight, std=in_std)

    def logits(self, x):
        e, h = self.attn.embed_dim, self.attn.num_heads
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(x, w[:e], b[:e]).unflatten(-1, (h, e // h)).transpose(1, 2)
        k = F.linear(x, w[e : 2 * e], b[e : 2 * e]).unflatten(-1, (h, e // h)).transpose(1, 2)
        return q @ k.transpose(-2, -1) / math.sqrt(e // h)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


# ----------------------------------------------------------------------------- recurrent
class Recurrent(nn.Module):
    def __init__(self, kind=nn.RNN, init=None, hidden=32, seed=0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = kind(16, hidden, **kw)
        if init is not None:
            init(self.rnn)

    def forward(self, x):
        return self.rnn(x)[0]


class Cell(nn.Module):
    def __init__(self, kind=nn.RNNCell, init=None, hidden=32, seed=0, steps=5):
        super().__init__()
        torch.manual_seed(seed)
        self.cell = kind(16, hidden)
        self.steps = steps
        if init is not None:
            init(self.cell)

    def forward(self, x):
        h = self.cell(x[0])
        for t in range(1, self.steps):
            h = self.cell(x[t], h)
        return h


def seq_input(steps=5, batch=2, features=16):
    torch.manual_seed(1)
    return torch.randn(steps, batch, features)


# ----------------------------------------------------------------------------- measurement
def measure_layers(model: nn.Module, x: torch.Tensor, draws: int = 2, batch: int = 256):
    """Real RMS of the output and of dL/d(output) of every nn.Linear, with
    L = <y, g>, g ~ N(0, 1): ``{qualified name: (act_rms, grad_rms)}``. Runs on a
    deep copy, so the model under test is untouched."""
    import copy

    m = copy.deepcopy(model)
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    acc = {n: [0.0, 0.0] for n in layers}
    gen = torch.Generator().manual_seed(123)
    for _ in range(draws):
        store = {}
        hooks = [
            mod.register_forward_hook(lambda _m, _i, out, n=n, store=store: (out.retain_grad(), store.__setitem__(n, out))[0])
            for n, mod in layers.items()
        ]
        xin = torch.randn((batch,) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
        y = m(xin)
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        (y * g).sum().backward()
        for h in hooks:
            h.remove()
        for n in layers:
            acc[n][0] += store[n].detach().double().pow(2).mean().item() / draws
            acc[n][1] += store[n].grad.double().pow(2).mean().item() / draws
    return {n: (math.sqrt(a), math.sqrt(b)) for n, (a, b) in acc.items()}



def _median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def check_gradient_crossing(model: nn.Module, code: str, expect, direction: int) -> None:
    """GA101 (``direction`` -1) / GA102 (+1) on ``model`` against real autograd.

    The finding ``expect`` ((module, severity) or None) appears exactly when, in the real
    gradients, the change from the last layer to the first, estimated from the medians
    of the last and the first quarter and scaled to the depth, is past 1e3x (+1) or 1e-3x
    (-1) (error, naming the layer nearest the output past it, within one), or, short of
    that, already 100x / 0.01x (warning).
    """
    found = audit(model, x_for(model), code)
    assert [(f.module, f.severity) for f in found] == ([expect] if expect else [])
    real = [g for _, g in measure_layers(model, x_for(model)).values()]
    n, q = len(real), max(1, len(real) // 4)
    early, late = _median(real[:q]), _median(real[-q:])
    decades = math.log10(early / late) * ((n - 1) / (n - q) if n > q else 1.0)
    change = direction * decades
    if expect is not None and expect[1] == "error":
        assert change >= 3
        limit = 10.0 ** (3 * direction)
        past = operator.ge if direction > 0 else operator.le
        # the layer nearest the output past the limit (the first layer when the estimate,
        # not a single layer, is past it)
        crossed = max((i for i, g in enumerate(real) if past(g, limit * late)), default=0) + 1
        assert abs(found[0].data["layer_index"] - crossed) <= 1
        assert found[0].data["decades"] == pytest.approx(decades, abs=0.3)
    else:
        assert change < 3
        assert (change >= 2) == (expect is not None)


class ScaledBigQK(HandAttention):
    """Scaled dot-product attention whose q/k projections are 4x too large (std 4/sqrt(d))."""

    def __init__(self, d=64, seed=0):
        super().__init__(d, scale=True, seed=seed)
        for lin in (self.q, self.k):
            nn.init.normal_(lin.weight, std=4 / math.sqrt(d))


def cifar_cnn(init=default, seed=0):
    """Five 3x3 convs with ReLU and max pools, a global average pool over 8x8, a classifier."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )
    for m in model:
        if isinstance(m, nn.Conv2d):
            init(m.weight)
    return model


def weight_grad_per_input(model: nn.Module, x: torch.Tensor, batch: int = 64, draws: int = 16):
    """Real RMS of dL/dW per sample, divided by the RMS of the layer's input, for every
    conv/linear layer in order (L = <y, g>, g ~ N(0, 1), mean square over ``draws``
    draws of g: one draw is noisy when activations share a large mean); on a deep copy."""
    import copy

    m = copy.deepcopy(model)
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    ins = {}
    hooks = [mod.register_forward_hook(lambda _m, i, _o, k=k: ins.__setitem__(k, i[0].detach())) for k, mod in enumerate(layers)]
    gen = torch.Generator().manual_seed(11)
    xs = torch.randn((batch,) + tuple(x.shape[1:]), generator=gen)
    y = m(xs)
    for h in hooks:
        h.remove()
    sq = [0.0] * len(layers)
    for _ in range(draws):
        grads = torch.autograd.grad((y * torch.randn(y.shape, generator=gen)).sum(), [l.weight for l in layers], retain_graph=True)
        for k, gw in enumerate(grads):
            sq[k] += float(gw.pow(2).mean()) / draws
    return [math.sqrt(sq[k] / batch) / float(ins[k].pow(2).mean().sqrt()) for k in range(len(layers))]
