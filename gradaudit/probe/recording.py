"""What one forward/backward run keeps: tensors reduced to floats as they pass.

Activations are reduced to their 2-norm when they are computed, gradients inside their
tensor hooks, so no activation or gradient tensor outlives the draw. Sums of squares are
accumulated in float32 at least (float64 for float64 tensors), so float16 values do not
overflow while being squared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.probe.nonfinite import NonFinite
    from gradaudit.probe.units import UnitStats


@dataclass
class DrawRecord:
    """What one forward/backward run observed (tensors are reduced to floats)."""

    act_sq: dict[str, float] = field(default_factory=dict)
    grad_sq: dict[str, float] = field(default_factory=dict)
    grad_zero: dict[str, int] = field(default_factory=dict)
    weight_grad_sq: dict[str, float] = field(default_factory=dict)
    weight_grad_zero: dict[str, int] = field(default_factory=dict)
    grad_norm: float = float("nan")
    cosine: dict[str, float] = field(default_factory=dict)
    units: list[UnitStats] = field(default_factory=list)
    first_forward: NonFinite | None = None
    first_backward: NonFinite | None = None
    absmax: dict[str, float] = field(default_factory=dict)
    out_dtype: dict[str, str] = field(default_factory=dict)
    finite: bool = True
    seconds: float = 0.0
    #: With the user's loss: its value and the largest |entry| of any parameter gradient.
    loss: float | None = None
    grad_absmax: float | None = None


def leaves(val: Any, out: list) -> None:
    """Append every floating tensor inside ``val`` (tuples, lists, dicts) to ``out``."""
    import torch

    if isinstance(val, (tuple, list)):
        for v in val:
            leaves(v, out)
    elif isinstance(val, dict):
        for v in val.values():
            leaves(v, out)
    elif isinstance(val, torch.Tensor) and val.is_floating_point():
        out.append(val)


#: Below this 2-norm the squares of float32 entries underflow (2^-126 ~ 1.2e-38): such
#: a norm is computed again in float64, so a vanishing gradient of 1e-30 is measured as
#: 1e-30 and not as exactly 0.
TINY = 1e-18


def sumsq(t):
    """The 2-norm of ``t`` as a 0-dim tensor (square it for the sum of squares),
    accumulated in float32 at least (float64 for float64 input, and below :data:`TINY`)."""
    import torch

    d = t.detach()
    if d.dtype in (torch.float16, torch.bfloat16):
        norm = torch.linalg.vector_norm(d, 2, dtype=torch.float32)
    else:
        norm = torch.linalg.vector_norm(d, 2)
    if d.dtype != torch.float64 and d.numel() and float(norm) < TINY:
        return torch.linalg.vector_norm(d.double(), 2)
    return norm


def sums_of_squares(tensors: list) -> list[float]:
    """Sum of squares of each tensor, with one fused norm kernel when available (norms
    below :data:`TINY` again in float64)."""
    import torch

    if not tensors:
        return []
    half = (torch.float16, torch.bfloat16)
    with torch.no_grad():  # (values that require grad: no graph is recorded for the norms)
        try:
            norms = torch._foreach_norm([t.float() if t.dtype in half else t for t in tensors])
        except (AttributeError, RuntimeError):
            norms = [sumsq(t) for t in tensors]
        values = torch.stack(list(norms)).double().tolist()
    for i, (v, t) in enumerate(zip(values, tensors)):
        if v < TINY and t.dtype != torch.float64 and t.numel():
            values[i] = float(torch.linalg.vector_norm(t.detach().double(), 2))
    return [v * v for v in values]


def absmax(tensors: list) -> float:
    """The largest |entry| over all ``tensors`` (nan when one holds a nan; 0 for none)."""
    import torch

    peaks = [t.detach().abs().amax().float() for t in tensors if t.numel()]
    return float(torch.stack(peaks).max()) if peaks else 0.0


def batch_cosine(x) -> float:
    """Mean cosine similarity between distinct samples (dim 0) of ``x``."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 2:
        return float("nan")
    v = x.detach().reshape(x.shape[0], -1).float()
    norms = v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    u = v / norms
    s = u.sum(dim=0)
    b = x.shape[0]
    return float((s.dot(s) - b) / (b * (b - 1)))


def reduce(g, zeros: bool) -> tuple:
    """What is kept of a gradient: its sum of squares, size and (optionally) zero count.
    Reduced inside the hook, so no gradient tensor outlives the backward pass."""
    d = g.detach()
    return sumsq(d), d.numel(), (d == 0).sum() if zeros else None


def grab(slots: dict, name: str, zeros: bool):
    """A tensor hook keeping the first gradient that reaches ``name``, reduced."""

    def hook(g):
        # None: a custom autograd function's backward passed nothing on (no gradient)
        if g is not None and name not in slots:
            slots[name] = reduce(g, zeros)
        return None

    return hook


def order(backward: list, name: str, slots: dict | None, zeros: bool):
    """A tensor hook recording, in backward execution order, whether the gradient of
    ``name`` is finite (a copy of it when it is not), and reducing it into ``slots``."""
    import torch

    def hook(g):
        if g is None:
            return None
        finite = bool(torch.isfinite(g).all())
        backward.append((name, finite, None if finite else g.detach().clone()))
        if slots is not None and name not in slots:
            slots[name] = reduce(g, zeros)
        return None

    return hook
