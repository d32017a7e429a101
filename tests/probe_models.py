"""Small models for the probe tests, and an independent measurement of them.

:func:`hook_measure` shares no code with the probe: it calls ``model(x)`` directly with
module forward hooks on the layers and tensor hooks on their outputs, and differentiates
L = sum over floating outputs y of <y, g>, g ~ N(0, 1), with ``torch.autograd.grad``.
It follows the probe's documented seeding (torch seeded with SEED + d before the
forward, g drawn afterwards from a generator seeded with SEED + d), so both see the same
dropout masks and the same g.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(val, out):
    if isinstance(val, (tuple, list)):
        for v in val:
            _flat(v, out)
    elif isinstance(val, dict):
        for v in val.values():
            _flat(v, out)
    elif isinstance(val, torch.Tensor) and val.is_floating_point():
        out.append(val)


def hook_measure(
    model: nn.Module, inputs: tuple, modules: list[str], seed: int, draws: int
) -> list[tuple[float, float]]:
    """(act_rms, grad_rms) of the k-th call of each layer module, in call order.

    ``modules`` lists the qualified names of layer modules, one entry per call in
    execution order (a module called twice appears twice)."""
    named = dict(model.named_modules())
    acc = [[0.0, 0.0] for _ in modules]
    for d in range(draws):
        calls: dict[str, int] = {}
        slots: list = []
        handles = []
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(modules):
            positions.setdefault(name, []).append(i)

        def make(name):
            def hook(mod, args, out):
                k = calls.get(name, 0)
                calls[name] = k + 1
                i = positions[name][k]
                y = out[0] if isinstance(out, tuple) else out
                acc[i][0] += float(y.detach().double().pow(2).mean())
                if y.requires_grad:
                    y.register_hook(lambda g, i=i: slots.append((i, float(g.detach().double().pow(2).mean()))))

            return hook

        for name in positions:
            handles.append(named[name].register_forward_hook(make(name)))
        try:
            torch.manual_seed(seed + d)
            gen = torch.Generator().manual_seed(seed + d)
            xs = tuple(x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs)
            out = model(*xs)
            ys: list = []
            _flat(out, ys)
            ys = [y for y in ys if y.requires_grad]
            gs = [torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.dtype) for y in ys]
            leaves = [p for p in model.parameters() if p.requires_grad] + [x for x in xs if x.is_floating_point()]
            torch.autograd.grad(ys, leaves, gs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for i, g2 in slots:
            acc[i][1] += g2
    return [((a / draws) ** 0.5, (g / draws) ** 0.5) for a, g in acc]


class ConvBNDrop(nn.Module):
    """Conv + BN + ReLU + dropout + linear head: BN running stats, dropout masks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(h, 1))


class Tied(nn.Module):
    """One Linear called twice (weight sharing) and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))
        return self.head(h), h


class Frozen(nn.Module):
    """A frozen first layer, LayerNorm and GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.b = nn.Linear(24, 6)
        for p in self.a.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.norm(self.a(x))))


def small_models() -> dict[str, tuple[nn.Module, tuple]]:
    torch.manual_seed(3)
    return {
        "conv_bn_dropout": (ConvBNDrop(), (torch.randn(4, 3, 8, 8),)),
        "tied_tuple_output": (Tied(), (torch.randn(8, 16),)),
        "frozen_layernorm": (Frozen(), (torch.randn(10, 12),)),
    }
