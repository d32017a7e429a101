"""Every static rule on a small zoo of real architectures: no crash, fixes are code, and
the healthy designs stay clean."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rulemodels import Encoder, Recurrent, seq_input

import gradaudit
from gradaudit.rules.base import all_rules

STATIC = [c for c, cls in all_rules().items() if cls.stage == "static" and "GA100" < c < "GA600"]


class Basic(nn.Module):
    def __init__(self, i, o, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.down = None if stride == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + idt)


class SmallResNet(nn.Module):
    """BasicBlock ResNet (He et al. 2016) with He init: the reference healthy design."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Basic(16, 16), Basic(16, 16), Basic(16, 32, 2), Basic(32, 32), Basic(32, 64, 2), Basic(64, 64))
        self.fc = nn.Linear(64, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyGPT(nn.Module):
    """Pre-LN decoder with token and position embeddings and a final LayerNorm."""

    def __init__(self, depth=4, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(50, d), nn.Embedding(12, d)
        self.ln1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.attn = nn.ModuleList([nn.MultiheadAttention(d, 4, batch_first=True) for _ in range(depth)])
        self.ln2 = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(depth)])
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, 50)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(12))
        for ln1, attn, ln2, mlp in zip(self.ln1, self.attn, self.ln2, self.mlp):
            h = ln1(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + mlp(ln2(x))
        return self.head(self.lnf(x))


class EagerCausalGPT(nn.Module):
    """Pre-LN decoder whose attention is written out as transformers' eager attention
    does it: scores plus an additive causal mask of 0 and float32's smallest number
    (a buffer), then softmax."""

    def __init__(self, depth=2, d=32, heads=4, n=12):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.tok, self.pos = nn.Embedding(50, d), nn.Embedding(n, d)
        self.ln1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(depth)])
        self.proj = nn.ModuleList([nn.Linear(d, d) for _ in range(depth)])
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, 50)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        self.register_buffer("mask", torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min))

    def forward(self, ids):
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t))
        for ln, qkv, proj in zip(self.ln1, self.qkv, self.proj):
            q, k, v = qkv(ln(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + self.mask[:t, :t]
            x = x + proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        return self.head(self.lnf(x))


class ConvTransposeBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bil = nn.Bilinear(8, 8, 4)

    def forward(self, x):
        z = self.grouped(torch.relu(self.up(x))).mean((2, 3))
        return self.bil(z, torch.cumsum(z, dim=-1))  # cumsum: no handler, estimated


ZOO = [
    pytest.param(SmallResNet, lambda: torch.randn(2, 3, 32, 32), True, id="resnet"),
    pytest.param(TinyGPT, lambda: torch.randint(0, 50, (2, 12)), True, id="pre-ln-gpt"),
    pytest.param(EagerCausalGPT, lambda: torch.randint(0, 50, (2, 12)), True, id="eager-causal-gpt"),
    pytest.param(lambda: Encoder(6), lambda: torch.randn(2, 10, 32), False, id="post-ln-encoder"),
    pytest.param(lambda: Recurrent(nn.LSTM, num_layers=2, bidirectional=True), seq_input, False, id="bilstm"),
    pytest.param(ConvTransposeBilinear, lambda: torch.randn(2, 8, 8, 8), False, id="convtranspose-bilinear"),
]


@pytest.mark.parametrize("build, inputs, healthy", ZOO)
def test_static_rules_on_the_zoo(build, inputs, healthy):
    """Healthy designs (He-initialised BN ResNet, Pre-LN GPTs) get no warning or error from
    GA1xx-GA5xx; on every model each finding's fix compiles."""
    report = gradaudit.audit(build(), inputs(), select=STATIC)
    for f in report.findings:
        assert f.fix and f.message
        compile(f.fix, "<fix>", "exec")
    if healthy:
        assert [(f.rule, f.severity) for f in report.findings if f.severity != "info"] == []
