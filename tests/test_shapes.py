"""Shape rules (gradaudit.frontends.shapes) against torch's fake-tensor pass.

Every rule in the two tables has a case here (a rule without one fails
``test_every_rule_has_a_case``); each case must be covered by the rules alone (no
fallback) and give, node by node, the shapes and dtypes FakeTensorProp gives.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from gradaudit.frontends import shapes
from gradaudit.frontends.fx import _propagate_fake_shapes, _Tracer

pytestmark = pytest.mark.oldest

ROOT = Path(__file__).resolve().parents[1]


class Fn(nn.Module):
    """A model that applies ``fn`` to its input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a):
        return self.fn(a)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 10, shape, dtype=dtype)


MODULE_CASES = {
    nn.Linear: (nn.Linear(6, 4), (x(3, 5, 6),)),
    nn.Conv1d: (nn.Conv1d(3, 5, 3, stride=2, padding=1), (x(2, 3, 11),)),
    nn.Conv2d: (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (x(2, 3, 9, 8),)),
    nn.Conv3d: (nn.Conv3d(2, 3, 3, padding="same"), (x(1, 2, 5, 6, 7),)),
    nn.ConvTranspose1d: (nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1, output_padding=1), (x(2, 3, 7),)),
    nn.ConvTranspose2d: (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (x(2, 3, 5, 6),)),
    nn.ConvTranspose3d: (nn.ConvTranspose3d(2, 2, 2, stride=2), (x(1, 2, 3, 3, 3),)),
    nn.BatchNorm1d: (nn.BatchNorm1d(4), (x(3, 4, 5),)),
    nn.BatchNorm2d: (nn.BatchNorm2d(4), (x(3, 4, 5, 5),)),
    nn.BatchNorm3d: (nn.BatchNorm3d(2), (x(2, 2, 3, 3, 3),)),
    nn.GroupNorm: (nn.GroupNorm(2, 4), (x(2, 4, 5),)),
    nn.InstanceNorm1d: (nn.InstanceNorm1d(3, affine=True), (x(2, 3, 6),)),
    nn.InstanceNorm2d: (nn.InstanceNorm2d(3), (x(2, 3, 4, 4),)),
    nn.LayerNorm: (nn.LayerNorm([5, 6]), (x(2, 5, 6),)),
    nn.RMSNorm: (nn.RMSNorm(6), (x(2, 3, 6),)),
    nn.MaxPool1d: (nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), (x(2, 3, 10),)),
    nn.MaxPool2d: (nn.MaxPool2d(3, stride=2, padding=1, dilation=2), (x(2, 3, 11, 9),)),
    nn.MaxPool3d: (nn.MaxPool3d(2), (x(1, 2, 5, 4, 4),)),
    nn.AvgPool1d: (nn.AvgPool1d(2), (x(2, 3, 9),)),
    nn.AvgPool2d: (nn.AvgPool2d(3, stride=2, ceil_mode=True), (x(2, 3, 10, 10),)),
    nn.AvgPool3d: (nn.AvgPool3d(2, padding=1), (x(1, 2, 4, 5, 4),)),
    nn.AdaptiveAvgPool1d: (nn.AdaptiveAvgPool1d(3), (x(2, 3, 10),)),
    nn.AdaptiveAvgPool2d: (nn.AdaptiveAvgPool2d((1, None)), (x(2, 3, 7, 5),)),
    nn.AdaptiveAvgPool3d: (nn.AdaptiveAvgPool3d(2), (x(1, 2, 4, 5, 6),)),
    nn.AdaptiveMaxPool1d: (nn.AdaptiveMaxPool1d(4), (x(2, 3, 9),)),
    nn.AdaptiveMaxPool2d: (nn.AdaptiveMaxPool2d(2), (x(2, 3, 7, 7),)),
    nn.AdaptiveMaxPool3d: (nn.AdaptiveMaxPool3d(1), (x(1, 2, 3, 3, 3),)),
    nn.Flatten: (nn.Flatten(1, 2), (x(2, 3, 4, 5),)),
    nn.Embedding: (nn.Embedding(10, 6), (x(2, 7, dtype=torch.int64),)),
    nn.Dropout1d: (nn.Dropout1d(0.2), (x(2, 3, 5),)),
    nn.Dropout2d: (nn.Dropout2d(0.2), (x(2, 3, 4, 4),)),
    nn.Dropout3d: (nn.Dropout3d(0.2), (x(1, 2, 3, 3, 3),)),
}


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, q, kv):
        return self.attn(q, kv, kv)[0]


MODULE_CASES[nn.MultiheadAttention] = (_SelfAttention(), (x(2, 5, 8), x(2, 7, 8)))
_CTOR_ARGS = {nn.Threshold: (0.1, 0.0), nn.Softmax: (-1,), nn.LogSoftmax: (-1,), nn.Softmin: (-1,)}
for cls in shapes._SAME_MODULES:
    MODULE_CASES.setdefault(cls, (cls(*_CTOR_ARGS.get(cls, ())), (x(2, 3, 4),)))


FUNCTION_CASES = {
    "relu": (lambda a: torch.relu(a)), "relu6": (lambda a: F.relu6(a)), "leaky_relu": (lambda a: F.leaky_relu(a, 0.2)),
    "elu": F.elu, "selu": torch.selu, "celu": F.celu, "gelu": F.gelu, "silu": F.silu, "mish": F.mish,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardtanh": F.hardtanh, "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish, "softplus": F.softplus, "softsign": F.softsign, "logsigmoid": F.logsigmoid,
    "tanhshrink": F.tanhshrink, "softshrink": F.softshrink, "hardshrink": F.hardshrink,
    "threshold": (lambda a: F.threshold(a, 0.1, 0.0)), "exp": torch.exp, "log": (lambda a: torch.log(a.abs())),
    "sqrt": (lambda a: a.abs().sqrt()), "rsqrt": (lambda a: torch.rsqrt(a.abs() + 1)), "abs": torch.abs,
    "neg": (lambda a: -a), "sin": torch.sin, "cos": torch.cos, "erf": torch.erf, "square": torch.square,
    "clamp": (lambda a: a.clamp(min=0)), "clamp_min": (lambda a: a.clamp_min(0.1)),
    "clamp_max": (lambda a: torch.clamp_max(a, 0.1)), "reciprocal": (lambda a: (a + 3).reciprocal()),
    "dropout": (lambda a: F.dropout(a, 0.1)), "softmax": (lambda a: a.softmax(-1)),
    "log_softmax": (lambda a: F.log_softmax(a, dim=1)), "contiguous": (lambda a: a.transpose(0, 1).contiguous()),
    "clone": (lambda a: a.clone()), "detach": (lambda a: a.detach()),
    "layer_norm": (lambda a: F.layer_norm(a, (4,))), "batch_norm": (lambda a: F.batch_norm(a, None, None, training=True)),
    "group_norm": (lambda a: F.group_norm(a, 1)), "rms_norm": (lambda a: F.rms_norm(a, (4,))),
    "add": (lambda a: a + a[:, :1] + 1), "sub": (lambda a: 2 - a), "mul": (lambda a: a * torch.sigmoid(a)),
    "div": (lambda a: a / (a.size(0) * 2)), "pow": (lambda a: a ** 2),
    "floor_divide": (lambda a: a.view(a.size(0) // 2, -1)), "maximum": (lambda a: torch.maximum(a, a[:1])),
    "minimum": (lambda a: torch.minimum(a[:, :1], a)),
    "linear": (lambda a: F.linear(a, torch.ones(5, 4))), "view": (lambda a: a.view(-1, 2)),
    "reshape": (lambda a: a.reshape((a.shape[0], 2, -1))), "flatten": (lambda a: torch.flatten(a.unsqueeze(0), 1)),
    "permute": (lambda a: a.unsqueeze(1).permute(2, 0, 1)), "transpose": (lambda a: a.transpose(-1, 0)),
    "unsqueeze": (lambda a: a.unsqueeze(-1)), "squeeze": (lambda a: a.unsqueeze(1).squeeze(1)),
    "size": (lambda a: a.view(a.size(0), a.size()[1])), "to": (lambda a: a.to(torch.float64)),
    "float": (lambda a: a.double().float()), "double": (lambda a: a.double()), "half": (lambda a: a.half()),
    "bfloat16": (lambda a: a.bfloat16()), "matmul": (lambda a: a @ a.t()), "t": (lambda a: a[:, :3].t()),
    "mean": (lambda a: a.mean(-1, keepdim=True)), "sum": (lambda a: a.sum(0) + a.sum()),
    "cat": (lambda a: torch.cat([a, a * 2], dim=-1)), "chunk": (lambda a: a.chunk(3, dim=1)[1]),
    "split": (lambda a: torch.split(a, [1, 3], dim=1)[0]),
    "scaled_dot_product_attention": (lambda a: F.scaled_dot_product_attention(*(a.view(1, 2, 4, 2),) * 3)),
    "getitem": (lambda a: a[None, ..., 1:3]), "dim": (lambda a: a.view(a.dim(), -1)),
}


@pytest.mark.parametrize(
    "table, key",
    [("module", k) for k in shapes.MODULE_RULES] + [("function", k) for k in shapes.FUNCTION_RULES],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_every_rule_has_a_case(table, key):
    cases = MODULE_CASES if table == "module" else FUNCTION_CASES
    assert key in cases, f"shape rule {key} has no case in tests/test_shapes.py"


def _both(model, inputs):
    gm = fx.GraphModule(model, _Tracer().trace(model))
    shapes.infer(gm, inputs)  # must not fall back
    ours = {n.name: _norm(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output"}
    _propagate_fake_shapes(gm, inputs)
    fake = {n.name: _norm(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output"}
    return ours, fake


def _norm(v):
    if isinstance(v, (tuple, list)):
        return tuple(_norm(i) for i in v)
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return (tuple(v.shape), v.dtype)
    return v


@pytest.mark.parametrize("cls", list(MODULE_CASES), ids=lambda c: c.__name__)
def test_module_rule_matches_fake_tensors(cls):
    module, inputs = MODULE_CASES[cls]
    model = module if isinstance(module, (Fn, _SelfAttention)) else nn.Sequential(module)
    ours, fake = _both(model, inputs)
    assert ours == fake


@pytest.mark.parametrize("name", list(FUNCTION_CASES))
def test_function_rule_matches_fake_tensors(name):
    ours, fake = _both(Fn(FUNCTION_CASES[name]), (x(4, 4),) if name not in ("batch_norm", "group_norm") else (x(2, 4, 3),))
    assert ours == fake


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.stem)
def test_examples_need_no_fake_tensors(path):
    ns = runpy.run_path(str(path))
    inputs = ns["example_inputs"] if isinstance(ns["example_inputs"], tuple) else (ns["example_inputs"],)
    ours, fake = _both(ns["model"], inputs)
    assert ours == fake


@pytest.mark.parametrize(
    "model, inputs",
    [
        (nn.Linear(5, 3), (x(2, 4),)),  # in_features
        (nn.Conv2d(3, 4, 3), (x(2, 2, 8, 8),)),  # channels
        (nn.BatchNorm2d(3), (x(2, 4, 5, 5),)),  # channels
        (nn.LayerNorm(6), (x(2, 5),)),  # normalized_shape
        (Fn(lambda a: a + a.t()), (x(2, 3),)),  # broadcast
        (Fn(lambda a: a @ a), (x(2, 3),)),  # inner dims
        (Fn(lambda a: a.view(5, -1)), (x(2, 3),)),  # numel
        (Fn(lambda a: torch.cumsum(a, 0)), (x(2, 3),)),  # no rule
    ],
)
def test_mismatch_or_unknown_op_falls_back(model, inputs):
    model = nn.Sequential(model) if not isinstance(model, Fn) else model
    gm = fx.GraphModule(model, _Tracer().trace(model))
    with pytest.raises(shapes.NoRule):
        shapes.infer(gm, inputs)


@pytest.mark.parametrize("a, b", [((3, 1, 5), (4, 1)), ((1,), (2, 3)), ((), (2,)), ((2, 1), (2, 7))])
def test_broadcast_shapes_is_numpy_broadcasting(a, b):
    assert shapes.broadcast_shapes(a, b) == torch.broadcast_shapes(a, b)


def test_unbroadcastable_shapes_raise():
    with pytest.raises(shapes.NoRule):
        shapes.broadcast_shapes((2, 3), (4, 3))
    with pytest.raises(RuntimeError):
        torch.broadcast_shapes((2, 3), (4, 3))
