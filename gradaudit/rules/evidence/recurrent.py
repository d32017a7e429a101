"""Recurrent evidence: the gate blocks of RNN/LSTM/GRU weights and their largest singular
values (Pascanu et al. 2013), and the gradient over time of a recurrent module or loop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis

#: gamma = max |phi'| (Pascanu et al. 2013): 1 for tanh and ReLU, 1/4 for the sigmoid.
GAMMA = {"tanh": 1.0, "relu": 1.0, "sigmoid": 0.25}
#: The family names of :mod:`gradaudit.propagation.recurrent` as the rules word them.
_FAMILY_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


@dataclass
class RecurrentBlock:
    param: str  # e.g. "weight_hh_l0"
    gate: str  # "input", "cell", ... or "hidden" for a plain RNN
    activation: str
    gamma: float
    sigma_max: float

    @property
    def threshold(self) -> float:
        return 1.0 / self.gamma


def recurrent_kind(node: Node) -> tuple[str, str] | None:
    """``(family, activation)`` of an RNN/LSTM/GRU module or cell: family is ``LSTM``,
    ``GRU`` or ``RNN`` (activation ``tanh`` or ``relu`` for the plain RNN)."""
    from gradaudit.propagation.recurrent import family

    fam = family(node.fn)
    if fam is None:
        return None
    return _FAMILY_NAMES[fam], "relu" if fam == "rnn_relu" else "tanh"


def recurrent_blocks(node: Node) -> list[RecurrentBlock]:
    """Largest singular value of each gate block of every recurrent weight
    (``weight_hh``, ``weight_hh_l{k}``, ``weight_hh_l{k}_reverse``) of the module."""
    from gradaudit.propagation.recurrent import block_sigmas, family

    fam = family(node.fn)
    if fam is None:
        return []
    out = []
    for pname, w in node.params.items():
        if pname.startswith("weight_hh") and w.dim() == 2:
            for gate, act, sigma in block_sigmas(w, fam):
                out.append(RecurrentBlock(pname, gate, act, GAMMA[act], sigma))
    return out


@dataclass
class TimeEvidence:
    """The gradient over time of a recurrent module (or loop) as a rule judges it: the
    measured curve when the probe ran, else the predicted one."""

    record: Any  # gradaudit.propagation.over_time.OverTime
    curve: Any  # gradaudit.propagation.over_time.Curve
    source: str  # "predicted" | "measured"

    @property
    def steps(self) -> int:
        return self.record.steps

    @property
    def within(self) -> bool:
        """Whether the curve crosses 1e-3 (or 1e3) inside the sequence."""
        return self.curve.horizon is not None and not self.curve.extrapolated

    def sentence(self) -> str:
        """``the predicted gradient of a loss on the last step falls below 1e-3 of its
        value after 13.1 of the 80 steps (0.598x per step back)``."""
        c = self.curve
        rate = f"{c.gain:.3g}x per step back" if c.gain is not None else "no steady rate"
        what = f"the {self.source} gradient of a loss on the last step"
        if c.horizon is None:
            return f"{what} stays within 1e-3 to 1e3 of its value over the {self.steps} steps ({rate})"
        verb = "falls below 1e-3" if c.direction == "vanishing" else "rises above 1e3"
        if c.extrapolated:
            return f"{what} {verb} of its value after {c.horizon:.3g} steps at this rate, past the {self.steps} steps ({rate})"
        return f"{what} {verb} of its value after {c.horizon:.3g} of the {self.steps} steps ({rate})"


def recurrent_time(analysis: Analysis, node: Node) -> TimeEvidence | None:
    """The over-time evidence of a recurrent module call, or of the unrolled loop a cell
    call belongs to; None when there is no over-time prediction (an op the handlers do
    not model)."""
    from gradaudit.propagation.over_time import over_time

    for record in over_time(analysis):
        if record.node == node.name or node.name in record.nodes:
            probe = analysis.config.get("probe")
            measured = getattr(probe, "over_time", {}).get(record.node) if probe is not None else None
            if measured is not None:
                return TimeEvidence(record, measured, "measured")
            return TimeEvidence(record, record.predicted, "predicted")
    return None


def recurrent_weights(analysis: Analysis) -> Iterator[tuple[Node, list[RecurrentBlock], str]]:
    """``(node, blocks, severity)`` for each recurrent module call with recurrent weights
    (:func:`recurrent_layers`, :func:`recurrent_blocks`). The severity of a finding on
    it is ``warning`` for a plain RNN and ``info`` for an LSTM or GRU, whose cell state
    carries gradient past the recurrent matrix."""
    cache = analysis.config.setdefault("recurrent_blocks", {})
    for node in recurrent_layers(analysis):
        if node.name not in cache:
            cache[node.name] = recurrent_blocks(node)
        blocks = cache[node.name]
        if blocks:
            yield node, blocks, "warning" if recurrent_kind(node)[0] == "RNN" else "info"


def recurrent_layers(analysis: Analysis) -> list:
    """Recurrent module calls, one per module (a cell called in a loop counts once)."""
    seen: set[str] = set()
    out = []
    for n in analysis.graph:
        if n.kind != "call_module" or recurrent_kind(n) is None:
            continue
        key = n.module or n.name
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out
