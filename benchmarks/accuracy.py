"""How close the static prediction comes to real autograd, over a zoo of models.

For every model of the zoo below, the static audit's per-layer prediction (act_rms and
grad_rms of every call of a module that owns parameters, as the report lists them) is
compared with an independent measurement by real autograd (tests/measure.py, the same L
= sum <y, g>, g ~ N(0, 1) as DESIGN.md). For each statistic the error is

    e = |log10(predicted / measured)|      (decades; 0.15 = a factor 1.41, 0.3 = 2x)

and the table prints, per model, the median and p90 of e over its layers' statistics,
the fraction within 2x, and the measurement's own noise: the same p90 between two
independent measurements (different input batches drawn like the example's, different
cotangents and dropout masks). Families and the whole zoo are aggregated over all their
layer statistics. A statistic that is exactly zero in both is agreement; zero in one only
counts as an infinite error.

The prediction sees the example inputs (their real statistics); the measurement draws
each of its batches the way the example batch was made (``Model.draw``).

    python benchmarks/accuracy.py [--only REGEX] [--family NAME] [--draws N] [--json FILE]

Nothing is asserted: it prints. ``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TWO_X = math.log10(2.0)


# --------------------------------------------------------------------------- the zoo
@dataclass
class Model:
    """One zoo entry: ``build()`` -> (model, example inputs); ``draw(example, gen)`` makes
    a fresh batch the way the example batch was made (default: N(0, 1) for floating
    tensors, integer tensors as given)."""

    name: str
    family: str
    build: Callable[[], tuple[nn.Module, tuple]]
    draw: Callable[[tuple, torch.Generator], tuple] | None = None
    note: str = ""


def randn_like_inputs(inputs: tuple, gen: torch.Generator) -> tuple:
    return tuple(
        torch.randn(x.shape, generator=gen, dtype=x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in inputs
    )


def same_inputs(inputs: tuple, gen: torch.Generator) -> tuple:
    return inputs


ZOO: list[Model] = []


def zoo(name: str, family: str, draw=None, note: str = ""):
    def deco(fn):
        ZOO.append(Model(name, family, fn, draw, note))
        return fn

    return deco


# ---- examples/
def _example(name: str, inputs: Callable[[], tuple] | None = None):
    import runpy

    def build():
        ns = runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"), run_name=f"examples.{name}")
        x = inputs() if inputs else ns["example_inputs"]
        return ns["model"], x if isinstance(x, tuple) else (x,)

    return build


for _name in ("deep_sigmoid", "relu_he_30", "relu_xavier_30", "transformer_preln"):
    zoo(f"examples/{_name}", "examples")(_example(_name))
zoo("examples/resnet18 (4x3x64x64)", "examples")(_example("resnet18", lambda: (torch.randn(4, 3, 64, 64),)))


# ---- MLPs
def _mlp(depth: int, width: int, act: Callable[[], nn.Module], init: str, batch: int = 64, seed: int = 0):
    def build():
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            lin = nn.Linear(width, width if i < depth - 1 else 10)
            if init == "he":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
            elif init == "xavier":
                nn.init.xavier_normal_(lin.weight)
                nn.init.zeros_(lin.bias)
            elif init == "lecun":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="linear")
                nn.init.zeros_(lin.bias)
            elif init == "std1":
                nn.init.normal_(lin.weight, std=1.0)
                nn.init.zeros_(lin.bias)
            layers.append(lin)
            if i < depth - 1:
                layers.append(act())
        return nn.Sequential(*layers), (torch.randn(batch, width),)

    return build


for _n, _args in {
    "relu he d20 w256": (20, 256, nn.ReLU, "he"),
    "relu default d12 w128": (12, 128, nn.ReLU, "default"),
    "tanh xavier d20 w256": (20, 256, nn.Tanh, "xavier"),
    "tanh default d10 w32": (10, 32, nn.Tanh, "default"),
    "gelu default d16 w128": (16, 128, nn.GELU, "default"),
    "selu lecun d30 w128": (30, 128, nn.SELU, "lecun"),
    "silu he d16 w64": (16, 64, nn.SiLU, "he"),
    "sigmoid std1 d10 w32 seed1": (10, 32, nn.Sigmoid, "std1"),
    "sigmoid std1 d10 w32 seed2": (10, 32, nn.Sigmoid, "std1"),
    "leaky_relu he d24 w64": (24, 64, lambda: nn.LeakyReLU(0.1), "he"),
}.items():
    zoo(f"mlp/{_n}", "mlp")(_mlp(*_args, seed=int(_n[-1]) if _n[-1].isdigit() and "seed" in _n else 0))


# ---- residual CNNs
class ResBlock(nn.Module):
    """relu(x + norm(conv(relu(norm(conv(x)))))) with an optional scalar gate on the branch."""

    def __init__(self, c: int, norm: str, gate: str | None = None, blocks: int = 1) -> None:
        super().__init__()
        bias = norm == "none"
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=bias), nn.Conv2d(c, c, 3, padding=1, bias=bias)
        mk = {"bn": lambda: nn.BatchNorm2d(c), "gn": lambda: nn.GroupNorm(8, c), "none": nn.Identity}[norm]
        self.n1, self.n2 = mk(), mk()
        for conv in (self.c1, self.c2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.gate = None
        if gate == "fixup":  # Zhang et al. 2019: scale c1 by L^(-1/2), zero c2, scalar biases
            with torch.no_grad():
                self.c1.weight.mul_(blocks ** -0.5)
                self.c2.weight.zero_()
            self.bias = nn.Parameter(torch.zeros(1))
            self.scale = nn.Parameter(torch.ones(1))
        elif gate == "skipinit":  # De & Smith 2020: a scalar gate initialised at 0
            self.gate = nn.Parameter(torch.zeros(1))
        self.kind = gate

    def forward(self, x):
        h = self.n2(self.c2(F.relu(self.n1(self.c1(x)))))
        if self.kind == "fixup":
            h = h * self.scale + self.bias
        elif self.gate is not None:
            h = h * self.gate
        return F.relu(x + h)


class ResCNN(nn.Module):
    def __init__(self, blocks: int, c: int = 32, norm: str = "none", gate: str | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")
        self.blocks = nn.Sequential(*[ResBlock(c, norm, gate, blocks) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _rescnn(blocks: int, norm: str, gate: str | None = None, size: int = 16, batch: int = 2):
    def build():
        torch.manual_seed(0)
        return ResCNN(blocks, 32, norm, gate), (torch.randn(batch, 3, size, size),)

    return build


zoo("rescnn/plain 32 blocks (issue case)", "rescnn")(_rescnn(32, "none"))
zoo("rescnn/plain 8 blocks", "rescnn")(_rescnn(8, "none"))
zoo("rescnn/bn 32 blocks (issue case)", "rescnn")(_rescnn(32, "bn"))
zoo("rescnn/bn 8 blocks", "rescnn")(_rescnn(8, "bn"))
zoo("rescnn/bn 64 blocks", "rescnn")(_rescnn(64, "bn", size=8))
zoo("rescnn/gn 16 blocks", "rescnn")(_rescnn(16, "gn"))
zoo("rescnn/fixup 16 blocks", "rescnn")(_rescnn(16, "none", "fixup"))
zoo("rescnn/skipinit 16 blocks", "rescnn")(_rescnn(16, "none", "skipinit"))


# ---- transformers
class Encoder(nn.Module):
    """``layers`` nn.TransformerEncoderLayer blocks, each initialised on its own (as
    Hugging Face and timm models initialise theirs)."""

    def __init__(self, d: int, layers: int, norm_first: bool, heads: int = 4, ff: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff or 4 * d, dropout=dropout, batch_first=True, norm_first=norm_first)
            for _ in range(layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TiedEncoder(nn.Module):
    """nn.TransformerEncoder: its layers are deep copies of one layer, so every block
    starts with the same weights."""

    def __init__(self, d: int, layers: int, norm_first: bool, heads: int = 4, ff: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff or 4 * d, dropout=dropout, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(x)


class GPT(nn.Module):
    """Pre-LN decoder written the way minGPT/nanoGPT write it: token + position
    embeddings, causal scaled-dot-product attention, GELU MLP, final LayerNorm, head."""

    def __init__(self, d: int, layers: int, vocab: int = 256, seq: int = 32, heads: int = 4, scale: bool = True) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads, scale) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, scale: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads, self.scale = heads, scale

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scale = None if self.scale else 1.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class HandAttention(nn.Module):
    """Single-head self-attention stack with explicit softmax(q k^T [/ sqrt(d)]) v."""

    def __init__(self, d: int, layers: int, scale: bool) -> None:
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.scale = 1 / math.sqrt(d) if scale else 1.0
        self.d = d

    def forward(self, x):
        for qkv, norm in zip(self.qkv, self.norms):
            q, k, v = qkv(norm(x)).split(self.d, dim=-1)
            att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
            x = x + att @ v
        return x


def _encoder(d: int, layers: int, norm_first: bool, tokens: tuple[int, int] = (4, 32), tied: bool = False, **kw):
    def build():
        torch.manual_seed(0)
        return (TiedEncoder if tied else Encoder)(d, layers, norm_first, **kw), (torch.randn(*tokens, d),)

    return build


zoo("transformer/post-ln d128 L24 (issue case)", "transformer")(_encoder(128, 24, False, ff=2048))
zoo("transformer/pre-ln d128 L24 (issue case)", "transformer")(_encoder(128, 24, True, ff=2048))
zoo("transformer/post-ln d32 L6", "transformer")(_encoder(32, 6, False))
zoo("transformer/pre-ln d32 L48", "transformer")(_encoder(32, 48, True, dropout=0.0))
zoo("transformer/post-ln d512 L6", "transformer")(_encoder(512, 6, False, heads=8, tokens=(2, 16)))
zoo("transformer/pre-ln d256 L12", "transformer")(_encoder(256, 12, True, heads=8, tokens=(2, 16)))
zoo("tied-init/post-ln d128 L24 nn.TransformerEncoder", "tied-init")(_encoder(128, 24, False, ff=2048, tied=True))
zoo("tied-init/pre-ln d128 L24 nn.TransformerEncoder", "tied-init")(_encoder(128, 24, True, ff=2048, tied=True))
zoo("tied-init/post-ln d32 L6 nn.TransformerEncoder", "tied-init")(_encoder(32, 6, False, tied=True))


def _gpt(d: int, layers: int, scale: bool = True):
    def build():
        torch.manual_seed(0)
        return GPT(d, layers, scale=scale), (torch.randint(0, 256, (4, 32)),)

    return build


zoo("transformer/gpt d64 L8", "transformer")(_gpt(64, 8))
zoo("transformer/gpt d64 L8 unscaled attention", "transformer")(_gpt(64, 8, scale=False))


def _hand_attention(scale: bool):
    def build():
        torch.manual_seed(0)
        return HandAttention(64, 6, scale), (torch.randn(4, 24, 64),)

    return build


zoo("transformer/hand attention 1/sqrt(d)", "transformer")(_hand_attention(True))
zoo("transformer/hand attention unscaled", "transformer")(_hand_attention(False))


# ---- recurrent
class Recurrent(nn.Module):
    def __init__(self, kind, layers: int = 1, bidirectional: bool = False, vocab: int = 0, hidden: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32) if vocab else None
        self.rnn = kind(32, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), vocab or 10)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x)
        return self.head(self.rnn(x)[0])


class RecurrentLM(Recurrent):
    """A token model whose recurrent state is passed in (zeros at the start)."""

    def forward(self, ids, h0):
        return self.head(self.rnn(self.emb(ids), h0)[0])


def _rnn(kind, **kw):
    def build():
        torch.manual_seed(0)
        return Recurrent(kind, **kw), (torch.randn(4, 16, 32),)

    return build


zoo("recurrent/lstm 2 layers", "recurrent")(_rnn(nn.LSTM, layers=2))
zoo("recurrent/bi-gru", "recurrent")(_rnn(nn.GRU, bidirectional=True))


def _gru_lm_zero_h0():
    torch.manual_seed(0)
    model = RecurrentLM(nn.GRU, layers=2, vocab=100)
    return model, (torch.randint(0, 100, (4, 16)), torch.zeros(2, 4, 64))


zoo("recurrent/gru lm, h0 = 0 (real inputs)", "recurrent", draw=same_inputs)(_gru_lm_zero_h0)


# ---- normalizations written by hand, chains of normalizations, constant inputs
class HandNorms(nn.Module):
    """Linear layers, each followed by a hand-written RMSNorm (LLaMA) or LayerNorm."""

    def __init__(self, d: int, layers: int, kind: str, eps: float) -> None:
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.gains = nn.ParameterList(nn.Parameter(torch.ones(d)) for _ in range(layers))
        self.kind, self.eps = kind, eps

    def forward(self, x):
        for lin, g in zip(self.lins, self.gains):
            x = lin(x)
            if self.kind == "rms":
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g
            else:
                mu = x.mean(-1, keepdim=True)
                var = x.var(-1, keepdim=True, unbiased=False)
                x = (x - mu) / torch.sqrt(var + self.eps) * g
        return x


class NormChain(nn.Module):
    """Residual MLP blocks at small width with two LayerNorms in a row on every branch."""

    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(blocks)
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x))


def _hand_norm(kind: str, eps: float):
    def build():
        torch.manual_seed(0)
        return HandNorms(64, 3, kind, eps), (torch.randn(8, 16, 64),)

    return build


zoo("norms/hand rmsnorm eps 1e-6", "norms")(_hand_norm("rms", 1e-6))
zoo("norms/hand rmsnorm eps 1e-5", "norms")(_hand_norm("rms", 1e-5))
zoo("norms/hand layernorm eps 1e-6", "norms")(_hand_norm("ln", 1e-6))
zoo("norms/hand layernorm eps 1e-5", "norms")(_hand_norm("ln", 1e-5))


@zoo("norms/layernorm chains d32", "norms")
def _norm_chain():
    torch.manual_seed(0)
    return NormChain(32, 8), (torch.randn(8, 16, 32),)


class ConstantFed(nn.Module):
    """An MLP fed an image and a constant conditioning vector (a diffusion timestep
    embedding set to one value for the whole batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(64, 128)
        self.cond = nn.Linear(16, 128)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 10))

    def forward(self, x, c):
        return self.body(self.img(x) + self.cond(c))


@zoo("norms/constant-valued input (real inputs)", "norms", draw=lambda inputs, gen: (torch.randn(inputs[0].shape, generator=gen), inputs[1]))
def _constant_fed():
    torch.manual_seed(0)
    return ConstantFed(), (torch.randn(32, 64), torch.full((32, 16), 3.0))


# ---- torchvision (training mode, 64x64, batch 2, default init)
TORCHVISION = (
    "efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_y_400mf", "mobilenet_v3_small", "vgg11",
    "resnet50", "densenet121", "squeezenet1_0", "vgg11_bn", "swin_t", "resnet18", "alexnet", "convnext_tiny",
    "vit_b_16", "mobilenet_v2", "regnet_x_400mf",
)


def _torchvision(name: str):
    def build():
        import torchvision

        torch.manual_seed(0)
        size = 224 if name in ("vit_b_16",) else 64
        if name == "alexnet":
            size = 64
        model = getattr(torchvision.models, name)(weights=None)
        return model.train(), (torch.randn(2, 3, size, size),)

    return build


for _name in TORCHVISION:
    zoo(f"torchvision/{_name}", "torchvision")(_torchvision(_name))


# ---- class-token vision transformers (timm's code and init: class token std 1e-6,
# position embedding std 0.02, the head on token 0 or on the patch tokens' mean)
def _timm_vit(depth: int, pool: str, distilled: bool = False):
    def build():
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        kind = VisionTransformerDistilled if distilled else VisionTransformer
        model = kind(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=10, global_pool=pool)
        return model.train(), (torch.randn(8, 3, 32, 32),)

    return build


zoo("vision-transformer/vit d64 L12 class token", "vision-transformer")(_timm_vit(12, "token"))
zoo("vision-transformer/vit d64 L24 class token", "vision-transformer")(_timm_vit(24, "token"))
zoo("vision-transformer/vit d64 L12 mean of patch tokens", "vision-transformer")(_timm_vit(12, "avg"))
zoo("vision-transformer/deit d64 L12 class + distillation tokens", "vision-transformer")(_timm_vit(12, "token", distilled=True))


# --------------------------------------------------------------------------- measuring
def predict(model: nn.Module, inputs: tuple):
    """The static audit's layer records (what a user's report shows)."""
    from gradaudit.api import Settings, analyse, build_report, capture
    from gradaudit.state import preserved

    with preserved(model):
        graph = capture(model, inputs)
        analysis = analyse(graph, inputs, None, Settings())
        report = build_report(analysis, [], target="zoo", input_source="given", inputs=inputs)
    return report.layers


def measured(model: nn.Module, entry: Model, inputs: tuple, seed: int, draws: int) -> dict[str, tuple[float, float]]:
    """Per-node (act_rms, grad_rms) over ``draws`` batches drawn like the example's."""
    from measure import measure

    draw = entry.draw or randn_like_inputs
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = [draw(inputs, gen) for _ in range(draws)]
    sums: dict[str, list[float]] = {}
    for k, batch in enumerate(batches):
        got = measure(model, batch, seed=seed * 100 + k, draws=1, redraw=False)
        for name, (a, g) in got.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += a * a
            acc[1] += g * g
    return {n: (math.sqrt(a / draws), math.sqrt(g / draws)) for n, (a, g) in sums.items()}


def log_err(pred: float, meas: float) -> float:
    if pred == meas:
        return 0.0
    if pred <= 0 or meas <= 0 or not math.isfinite(pred) or not math.isfinite(meas):
        return math.inf
    return abs(math.log10(pred / meas))


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default), inf-safe."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if v[hi] == math.inf:
        return math.inf if pos > lo or v[lo] == math.inf else v[lo]
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Result:
    name: str
    family: str
    errors: list[float]
    noise: list[float]
    worst: list[tuple[float, str]]
    seconds: float
    failure: str | None = None

    def row(self) -> dict[str, Any]:
        e = self.errors
        return {
            "model": self.name,
            "family": self.family,
            "stats": len(e),
            "median": quantile(e, 0.5),
            "p90": quantile(e, 0.9),
            "within_2x": sum(x <= TWO_X for x in e) / len(e) if e else math.nan,
            "noise_p90": quantile(self.noise, 0.9),
            "seconds": round(self.seconds, 1),
            "worst": [f"{name} {err:.2f}" for err, name in self.worst],
            "failure": self.failure,
        }


def evaluate(entry: Model, draws: int) -> Result:
    start = time.perf_counter()
    try:
        model, inputs = entry.build()
        layers = predict(model, inputs)
        first = measured(model, entry, inputs, seed=1, draws=draws)
        second = measured(model, entry, inputs, seed=2, draws=draws)
    except Exception as exc:  # a zoo model the tool cannot take: reported, not hidden
        return Result(entry.name, entry.family, [], [], [], time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:200])
    errors, noise, worst = [], [], []
    for layer in layers:
        if layer.node not in first:
            continue
        (a1, g1), (a2, g2) = first[layer.node], second[layer.node]
        both = (math.sqrt((a1 * a1 + a2 * a2) / 2), math.sqrt((g1 * g1 + g2 * g2) / 2))
        for what, pred, meas, m1, m2 in (
            ("act", layer.predicted.act_rms, both[0], a1, a2),
            ("grad", layer.predicted.grad_rms, both[1], g1, g2),
        ):
            err = log_err(pred, meas)
            errors.append(err)
            noise.append(log_err(m1, m2))
            worst.append((err, f"{layer.module or layer.node}.{what}"))
    worst = sorted(worst, reverse=True)[:3]
    return Result(entry.name, entry.family, errors, noise, worst, time.perf_counter() - start)


def table(results: list[Result]) -> str:
    head = f"{'model':52s} {'stats':>5s} {'median':>7s} {'p90':>6s} {'in 2x':>6s} {'noise90':>7s}  worst"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.failure:
            lines.append(f"{r.name:52s} FAILED: {r.failure}")
            continue
        row = r.row()
        lines.append(
            f"{r.name:52s} {row['stats']:5d} {row['median']:7.3f} {row['p90']:6.3f} {row['within_2x']:6.0%} {row['noise_p90']:7.3f}"
            f"  {', '.join(row['worst'][:2])}"
        )
    lines.append("")
    lines.append(f"{'family':20s} {'models':>6s} {'stats':>6s} {'median':>7s} {'p90':>6s} {'in 2x':>6s} {'noise90':>7s}")
    families: dict[str, list[Result]] = {}
    for r in results:
        families.setdefault(r.family, []).append(r)
    for fam, rs in list(families.items()) + [("OVERALL", results)]:
        e = [x for r in rs for x in r.errors]
        n = [x for r in rs for x in r.noise]
        ok = [r for r in rs if not r.failure]
        if not e:
            continue
        lines.append(
            f"{fam:20s} {len(ok):6d} {len(e):6d} {quantile(e, 0.5):7.3f} {quantile(e, 0.9):6.3f} "
            f"{sum(x <= TWO_X for x in e) / len(e):6.0%} {quantile(n, 0.9):7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="regular expression on model names")
    parser.add_argument("--family", help="one family")
    parser.add_argument("--draws", type=int, default=2, help="batches per measurement (two measurements)")
    parser.add_argument("--json", help="write the per-model rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    chosen = [m for m in ZOO if (not args.only or re.search(args.only, m.name)) and (not args.family or m.family == args.family)]
    results = []
    for entry in chosen:
        r = evaluate(entry, args.draws)
        results.append(r)
        row = r.row()
        status = f"FAILED {r.failure}" if r.failure else f"median {row['median']:.3f} p90 {row['p90']:.3f}"
        print(f"  {entry.name}: {status} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.row() for r in results], fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
