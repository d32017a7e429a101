"""Dead and saturated units, counted on the first draw.

Dead units (DeepDiagnosis; AUTOTRAINER): a unit of a ReLU-family activation is dead when
its output is exactly 0 for at least ``dead_fraction`` (70%) of the batch. Saturated
units: a sigmoid/tanh whose pre-activations have |x| >= ``saturation_abs`` (5) for more
than ``saturation_fraction`` (50%) of the entries. A unit is a channel (dim 1) after a
convolution or for 4-d and larger tensors, else the last dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradaudit.probe.thresholds import threshold

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.probe.recording import DrawRecord
    from gradaudit.probe.runner import Runner

#: Activations whose output is exactly 0 on a whole half-line: "dead" is measurable.
ZERO_REGION = frozenset({"relu", "relu6", "threshold", "hardswish", "hardshrink", "softshrink"})
#: Saturating activations checked for |pre-activation| >= 5.
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid"})
#: Ops an activation's input may pass through after a convolution and still have channels.
_CHANNEL_PRESERVING = ("batch_norm", "group_norm", "instance_norm", "add", "dropout", "identity")


@dataclass
class UnitStats:
    """Dead or saturated units of one activation node (draw 0)."""

    node: str
    op: str
    kind: str  # "dead" | "saturated"
    fraction: float  # dead: fraction of units dead; saturated: fraction of entries
    units: int
    count: int
    #: Observations behind each unit's figure (batch x positions); dead units only.
    samples: int = 0


def count_saturated(runner: Runner, n, args, rec: DrawRecord) -> None:
    """Saturation: |pre-activation| >= threshold for the activation's input."""
    import torch

    op = runner.acts[n.name]
    if op not in SATURATING or not args or not isinstance(args[0], torch.Tensor):
        return
    x = args[0].detach()
    if not x.is_floating_point() or x.numel() == 0:
        return
    limit = threshold(runner.settings, "saturation_abs")
    count = int((x.abs() >= limit).sum())
    rec.units.append(UnitStats(n.name, op, "saturated", count / x.numel(), x.numel(), count))


def count_dead(runner: Runner, n, value, rec: DrawRecord) -> None:
    """Dead units: per unit, the fraction of the batch where the output is exactly 0."""
    import torch

    op = runner.acts[n.name]
    if op not in ZERO_REGION or not isinstance(value, torch.Tensor) or value.dim() < 2:
        return
    y = value.detach()
    channels = y.dim() >= 4 or n.name in runner.conv_inputs or _feeds_from_conv(runner, n)
    unit_dim = 1 if channels else y.dim() - 1
    zero = (y == 0).movedim(unit_dim, 0).reshape(y.shape[unit_dim], -1).float().mean(dim=1)
    dead = int((zero >= threshold(runner.settings, "dead_fraction")).sum())
    units = int(zero.numel())
    samples = y.numel() // max(units, 1)
    rec.units.append(UnitStats(n.name, op, "dead", dead / max(units, 1), units, dead, samples))


def _feeds_from_conv(runner: Runner, n) -> bool:
    """Whether the activation's input comes (through norms) from a convolution."""
    seen = 0
    cur = n
    while cur is not None and seen < 4:
        ins = cur.all_input_nodes
        if not ins:
            return False
        cur = ins[0]
        op = runner.ir_op(cur.name)
        if op in ("conv", "conv_transpose"):
            return True
        if op not in _CHANNEL_PRESERVING:
            return False
        seen += 1
    return False
