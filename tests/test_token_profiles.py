"""Positions that differ along the token axis, against real autograd.

A vision transformer prepends a class token (initialised near 0) to its patch tokens and
reads only that token at the head. Its residual stream there is small (the class token
plus what each block adds) beside the patch tokens', so every LayerNorm divides it by a
smaller sigma, and the whole gradient enters through it. A per-token average misses
both: the gradient came out 0.3 decades low at the last block and 1.2 at the first of
timm's ViT-Tiny. The position profile along the token axis (``Stats.prof`` /
``Stats.gprof``) carries them: ``cat`` makes it, each LayerNorm's backward weighs it by
its per-token 1 / sigma^2, ``x[:, 0]`` puts the gradient on token 0, attention's keys
and values spread it again.

Every model here is checked layer by layer (act_rms and grad_rms within 2x of the
measurement, p90 of |log10(predicted / measured)| within 0.2), as in
tests/test_coherence.py.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_coherence import assert_agrees  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.propagation import channels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """timm's attention: one qkv projection, heads split by reshape/permute/unbind,
    ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class MHA(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, d: int, heads: int, attention: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads) if attention == "sdpa" else MHA(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A class-token vision transformer written the way timm's is: conv patches,
    flatten + transpose, cat with an expanded class token (std 1e-6), a position
    embedding (std 0.02), Pre-LN blocks, a final LayerNorm, the head on a pooling of
    the tokens: ``token`` (x[:, 0]), ``two`` (DeiT's class and distillation tokens,
    each read by its own head, the two averaged), ``avg`` (the mean of the patch
    tokens, x[:, 1:])."""

    def __init__(self, depth: int = 16, d: int = 32, heads: int = 2, attention: str = "sdpa", pool: str = "token") -> None:
        super().__init__()
        self.pool = pool
        self.prefix = 2 if pool == "two" else 1
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, self.prefix, d) * 1e-6)
        self.pos = nn.Parameter(torch.randn(1, 16 + self.prefix, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        self.head_dist = nn.Linear(d, 10) if pool == "two" else None

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        if self.pool == "two":
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        x = x[:, 0] if self.pool == "token" else x[:, self.prefix :].mean(dim=1)
        return self.head(x)


def _vit(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(**kw)


#: 8 images and 8 draws: the first block's gradient is carried by the one or two class
#: tokens, which its LayerNorm divides by a ~1000x smaller variance; measured on 2 images
#: and 4 draws it spreads over 0.025-0.045 between seeds (0.26 decades), on 64 samples
#: over 0.037-0.043.
IMAGES = (torch.randn(8, 3, 16, 16),)


@pytest.mark.parametrize("attention", ["sdpa", "mha"])
@pytest.mark.parametrize("pool", ["token", "two", "avg"])
def test_class_token_transformer_of_16_blocks(attention, pool):
    """The class token's stream is ~10x smaller than the patch tokens' in the first
    blocks; with the head on it, its gradient is what every block sees."""
    assert_agrees(_vit(attention=attention, pool=pool), IMAGES, draws=8)


@pytest.mark.parametrize("frontend", ["export", "hooks"])
def test_class_token_transformer_under_other_captures(monkeypatch, frontend):
    """torch.export spells x[:, 0] ``select`` and slices ``slice``; the module-hook capture
    sees the same ops in torch-function form. The probe's measured statistics (real
    autograd at the same layers) must agree within 2x on at least 90% of them."""
    from gradaudit.frontends import chain

    monkeypatch.setattr(chain, "FRONTENDS", tuple(f for f in chain.FRONTENDS if f[0] == frontend))
    report = gradaudit.audit(_vit(depth=8), IMAGES, probe=True, draws=8)
    assert report.frontend == frontend
    errors = []
    for layer in report.layers:
        m = layer.measured
        assert m is not None, layer.node
        errors += [abs(math.log10(layer.predicted.act_rms / m.act_rms)), abs(math.log10(layer.predicted.grad_rms / m.grad_rms))]
    within = sum(e <= math.log10(2) for e in errors) / len(errors)
    assert within >= 0.9, f"{within:.0%} of {len(errors)} statistics within 2x"


class TokenNorm(nn.Module):
    """One small token beside large ones, two LayerNorms on the token axis, the head on
    the small token: the LayerNorms' backward there is (sigma_big / sigma_small)^2 =
    100x the average token's."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.small = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.lin = nn.Linear(d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = torch.cat([self.small.expand(x.shape[0], -1, -1) + 0.1 * x[:, :1], x[:, 1:]], dim=1)
        x = self.n2(self.lin(self.n1(x)) + x)
        return self.head(x[:, 0])


def test_layer_norm_divides_each_token_by_its_own_sigma():
    torch.manual_seed(0)
    assert_agrees(TokenNorm(), (torch.randn(4, 8, 16),), draws=8)


# --------------------------------------------------------------------------- the profile maps
def test_weighted_positions_is_the_mean_of_the_product():
    """A gradient with profile (3, 1/2, 1/2) scaled by (4, 1, 1) position by position has
    level (12 + 1/2 + 1/2) / 3 = 13/3 and profile (12, 1/2, 1/2) / (13/3)."""
    factor, prof = channels.weighted_positions(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64), (3,), (torch.tensor([3.0, 0.5, 0.5], dtype=torch.float64),))
    assert factor == pytest.approx(13 / 3)
    assert prof[0].tolist() == pytest.approx([36 / 13, 1.5 / 13, 1.5 / 13])


def test_position_map_gathers_and_scatters():
    """cat's piece [1, 3) of a 4-token output whose gradient profile is (2, 1, 1, 0): level
    x1, profile (1, 1); x[:, 0] of 4 tokens: the whole profile on token 0 (4, 0, 0, 0)."""
    out = (torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64),)
    piece = channels.PositionMap(1.0, (2,), ((0, torch.arange(1, 3)),), gather=True)
    assert channels.mapped_profile(piece, out) == (1.0, None)
    first = channels.PositionMap(0.25, (4,), ((None, torch.tensor([0])),))
    factor, prof = channels.mapped_profile(first, None)
    assert factor == 1.0 and prof[0].tolist() == [4.0, 0.0, 0.0, 0.0]
    g = channels.apply_gain(first, channels.Grad(8.0), None)
    assert g.g == pytest.approx(2.0) and g.prof[0].tolist() == [4.0, 0.0, 0.0, 0.0]
