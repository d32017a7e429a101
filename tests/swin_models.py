"""torchvision's Swin Transformer functions, written out (the tests that run on the oldest
torch have no torchvision): ``shifted_window_attention`` and ``_patch_merging_pad`` with
torchvision's signatures and arithmetic, leaves for torch.fx as they are there, and the
small Swin V2 the tests build from them."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.fx.wrap
def shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
                             attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None, logit_scale=None,
                             training=True):
    """torchvision.models.swin_transformer.shifted_window_attention's signature and
    arithmetic (a leaf for fx, as there; its dropouts left out)."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


@torch.fx.wrap
def _patch_merging_pad(x):
    """torchvision's patch merging: pad to even H, W; the four interleaved quarter maps
    side by side along the channels (a leaf for fx, as there)."""
    H, W, _ = x.shape[-3:]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


class QuarterMaps(nn.Module):
    """The patch merging's rearrangement alone (a call from this module, where fx wraps
    the function)."""

    def forward(self, x):
        return _patch_merging_pad(x)


def _swin_init(layer: nn.Linear) -> nn.Linear:
    """Swin's init of its linear layers: weights N(0, 0.02^2) truncated, biases 0."""
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class WindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention (``cosine``: V2's, logit scale log 10) at
    Swin's init, with a relative position bias 16 sigmoid(table) per head and pair of
    window positions (V2's continuous bias at its init: 8 plus a small spread)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, cosine: bool) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv = _swin_init(nn.Linear(dim, 3 * dim))
        self.proj = _swin_init(nn.Linear(dim, dim))
        self.table = nn.Parameter(0.1 * torch.randn(1, heads, window * window, window * window))
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1))) if cosine else None

    def forward(self, x):
        bias = 16 * torch.sigmoid(self.table)
        return shifted_window_attention(
            x, self.qkv.weight, self.proj.weight, bias, [self.window] * 2, self.heads, [self.shift] * 2,
            qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, logit_scale=self.logit_scale,
        )


class PostNormBlock(nn.Module):
    """A Swin V2 block: x + norm(attn(x)), then x + norm(mlp(x)) (res-post-norm)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.attn = WindowAttention(dim, heads, window, shift, cosine=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(_swin_init(nn.Linear(dim, 4 * dim)), nn.GELU(), _swin_init(nn.Linear(4 * dim, dim)))

    def forward(self, x):
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class SwinV2Stack(nn.Module):
    """A small Swin V2: a patch embedding (linear and norm), blocks under windows that
    cover the whole map (their outputs' shared part grows block by block), a patch
    merging (quarter maps, linear, norm), more blocks."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.embed_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(*(PostNormBlock(dim, 2, 4, 2 * (i % 2)) for i in range(4)))
        self.reduction, self.merge_norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(2 * dim)
        self.stage2 = nn.Sequential(*(PostNormBlock(2 * dim, 4, 4, 0) for _ in range(2)))
        self.head = nn.Linear(2 * dim, 10)

    def forward(self, x):
        x = self.stage1(self.embed_norm(self.embed(x)))
        x = self.stage2(self.merge_norm(self.reduction(_patch_merging_pad(x))))
        return self.head(x.mean((1, 2)))
