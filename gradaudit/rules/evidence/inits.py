"""Weight initialisation: the gain n E[w^2] of each linear/conv layer against the gain its
next activation needs (He et al. 2015), and whether its rows are all equal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradaudit.rules.evidence.ops import DENSE_OPS, RELU_FAMILY
from gradaudit.rules.evidence.structure import (followed_by_norm, has_successor, next_activation_node, structure,
                                                trained)

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis


def weight_matrix(node: Node):
    """The node's weight as a (fan_out, fan_in) matrix view, or None.

    For ``nn.Linear`` that is ``weight``; for a convolution ``weight`` reshaped to
    (C_out, C_in/groups * prod(kernel)), whose row length is the fan-in (He et al. 2015).
    """
    if node.op not in DENSE_OPS:
        return None
    w = node.params.get("weight")
    if w is None or getattr(w, "dim", lambda: 0)() < 2:
        return None
    w = w.detach()
    return w.reshape(w.shape[0], -1)


def _storage_key(w) -> tuple | None:
    """What identifies the values of ``w``: its storage, offset, shape, strides, dtype and
    version (None for a tensor without plain storage)."""
    try:
        return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, w._version)
    except (RuntimeError, NotImplementedError):
        return None


def fan_in_gain(w) -> float:
    """n E[w^2] over the rows of a (fan_out, fan_in) matrix: the factor a layer applies to
    the second moment of independent zero-mean inputs (He et al. 2015, Eq. 7)."""
    import torch

    return float(torch.linalg.vector_norm(w.float(), dim=1).pow(2).double().mean())


def rows_equal(w) -> bool:
    """True when every row of ``w`` equals the first (constant or zero init)."""
    import torch

    if w.shape[0] < 2 or not torch.equal(w[0], w[1]):
        return False
    return bool((w == w[:1]).all())


def leaky_slope(node: Node | None) -> float:
    """The negative slope of a leaky ReLU node: its module's, or the functional call's
    ``negative_slope`` argument (torch's default 0.01 when neither says)."""
    v = getattr(getattr(node, "fn", None), "negative_slope", None)
    if v is None and node is not None and node.kind != "call_module":
        v = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.01


def needed_gain(act: str | None, act_node: Node | None = None) -> tuple[float, str]:
    """The n Var[w] that keeps the second moment through ``act`` (He et al. 2015).

    ReLU family: 2 (He; 2 / (1 + a^2) for leaky ReLU with slope a). SELU: 1 (LeCun,
    Klambauer et al. 2017). tanh, sigmoid, linear and the rest: 1 (LeCun / Xavier for a
    square layer; tanh with zero bias is critical at sigma_w^2 = 1, Schoenholz et al. 2017).
    """
    if act == "leaky_relu":
        a = leaky_slope(act_node)
        return 2.0 / (1.0 + a * a), "He (leaky ReLU)"
    if act in RELU_FAMILY:
        return 2.0, "He"
    if act == "selu":
        return 1.0, "LeCun"
    return 1.0, "LeCun/Xavier"


def init_mismatch(analysis: Analysis, node: Node) -> float | None:
    """n E[w^2] of a linear/conv layer divided by the gain its next activation needs
    (:func:`needed_gain`); None for other layers."""
    li = layer_inits(analysis).get(node.name)
    return li.ratio if li is not None else None


@dataclass
class LayerInit:
    """How a linear/conv layer's weights compare with what its activation needs."""

    node: object
    gain: float  # n E[w^2]
    act: str | None
    needed: float
    scheme: str  # "He", "LeCun", ...
    fan_in: int
    fan_out: int
    normalized: bool  # a norm rescales the output before the next weight layer
    symmetric: bool  # every row equal (constant or zero init)
    hidden: bool  # the output feeds another weight layer

    @property
    def ratio(self) -> float:
        return self.gain / self.needed

    @property
    def xavier_like(self) -> bool:
        """n Var[w] within 25% of LeCun's 1 or of Glorot's 2 n_in / (n_in + n_out)."""
        glorot = 2.0 * self.fan_in / (self.fan_in + self.fan_out)
        return any(0.75 <= self.gain / t <= 1.0 / 0.75 for t in (1.0, glorot))


def layer_inits(analysis: Analysis) -> dict[str, LayerInit]:
    """:func:`layer_init` of every linear/conv weight layer, by node name (computed once
    per analysis; a module called several times is measured once)."""
    st = structure(analysis)
    if st.inits is not None:
        return st.inits
    out: dict[str, LayerInit] = {}
    by_module: dict[str, tuple[float, bool]] = {}
    by_tensor: dict[tuple, tuple[float, bool]] = {}
    for n in trained(analysis.weight_layers()):  # a frozen layer's weights are no initialisation to judge
        w = weight_matrix(n)
        if w is None:
            continue
        key = n.module or n.name
        if key not in by_module:
            # layers reading one tensor (a meta model's stand-in shares a draw between its
            # decoder layers) read it once: the same values give the same answers
            same = _storage_key(w)
            by_module[key] = by_tensor.get(same) if same is not None and same in by_tensor else (fan_in_gain(w), rows_equal(w))
            if same is not None:
                by_tensor[same] = by_module[key]
        gain, sym = by_module[key]
        act, act_node = next_activation_node(analysis, n)
        needed, scheme = needed_gain(act, act_node)
        out[n.name] = LayerInit(
            node=n,
            gain=gain,
            act=act,
            needed=needed,
            scheme=scheme,
            fan_in=w.shape[1],
            fan_out=w.shape[0],
            normalized=followed_by_norm(analysis, n),
            symmetric=sym,
            hidden=has_successor(analysis, n),
        )
    st.inits = out
    return out
