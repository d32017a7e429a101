"""Attention written out in ONNX nodes, recognised and mapped onto the IR node the torch
captures record for it: ``scaled_dot_product_attention`` (or, around it,
``nn.MultiheadAttention``'s ``multihead_attention``: :mod:`gradaudit.frontends.onnx_mha`).

The torch exporters write ``F.scaled_dot_product_attention`` (which
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call) as

    Y = MatMul(P, V)                                   the attention output
    P = Softmax(S, axis=-1)                            [-> Dropout(ratio)]
                                                       [-> Where(IsNaN(P), 0, P)]
    S = Add(L, M)  |  Where(C, -inf, L)  |  L          the mask, if any
    L = MatMul(Q', K')  [-> Mul(., s) | Div(., 1/s)]   the scaled logits
    Q' = Q [-> Mul(., a) | Div(., 1/a)]                (the scale folded into q and k:
    K' = K^T [-> Mul(., b) | Div(., 1/b)]               a = b = sqrt(s))

and hand-written attention looks the same (``softmax(q @ k.transpose(-2, -1) /
sqrt(d)) @ v``; nanoGPT's ``masked_fill(mask == 0, -inf)`` is a ``Where``). The
spellings differ by exporter: the TorchScript exporter scales q and k by sqrt(s) (a
``Mul`` by a ``Sqrt`` of the scale), writes K^T as one ``Transpose`` (whose
permutation may include the head split's: ``perm=[0, 2, 3, 1]`` from (B, L, H, d)), a
mask as a constant added to the logits, a boolean mask also as the NaN guard
``Where(IsNaN(P), 0, P)`` after the softmax; the dynamo exporter writes K^T as
``Reshape`` to (B * H, L, d), ``Transpose(perm=[0, 2, 1])``, ``Reshape`` back, and at
opset 23 and later may write one ``Attention`` node (:func:`attention_op`);
hand-written code scales the logits (``Mul``/``Div`` after the first MatMul). Any
number of scalar ``Mul``/``Div`` by constants on q, on K^T (before or after its
transpose) and on the logits multiply into the scale.

What is fused is what the torch captures fuse, so that an exported model gets the
prediction its torch capture gets: ``F.scaled_dot_product_attention`` (recognised by
the exporters' spelling: the scale split over q and k, or the dynamo exporter's record
of the call) and any attention with the causal mask (the torch captures fuse a
hand-written one, :func:`gradaudit.frontends.patterns.fuse_masked_attention`). A
hand-written attention without a mask stays op by op, as torch.fx sees it.

Recognised only when the match is exact, else the nodes stay as they are and the
propagation follows them one by one:

- every tensor between Q/K/V and Y is read by the next node of the pattern alone
  (and is no graph output): a score or probability also used elsewhere is not fused;
- the softmax runs over the last axis (keys), K^T really swaps K's last two axes,
  q, k, v have static shapes with the same leading (batch, head) axes, and v's head
  size is q's (what the IR's attention handler models);
- the mask is a constant (parameters and shapes only; the graph has been folded) that
  allows every key or is the causal lower triangle (``is_causal=True``), as
  :func:`gradaudit.frontends.aten.plain_mask` decides for the torch captures; a masked
  position must be filled with -inf (or the float type's lowest value). A padding mask
  computed from an input, or an additive bias (ALiBi, relative positions), is not
  fused (the IR's handler models no explicit mask);
- the dropout's ratio is a constant and its mask output unused.

The fused node has the arguments a torch capture records for
``F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p,
is_causal=causal, scale=s)`` (:func:`gradaudit.frontends.patterns.sdpa_kwargs`: the
scale only when it is not the default 1/sqrt(d)), and the name, scope and source line
of the ONNX node that computes Y. When K^T is one ``Transpose`` of a tensor other than
K (the head split folded in), K is that tensor under the ``Transpose``'s permutation
with the last two axes swapped back: an IR ``permute`` node named after it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from gradaudit.frontends.onnx import torch_op_of

#: Ops whose output only rescales their input by a constant scalar.
_SCALING = frozenset({"Mul", "Div"})


@dataclass
class Match:
    """One recognised attention: the ONNX tensors q, k (with tokens before the head
    axis, k itself not K^T) and v, its scale, mask and dropout, the ``Transpose`` that
    k is rewritten from (when k is not a tensor of the graph), and the pattern's inner
    node indices (skipped by the builder)."""

    output: int
    q: str
    k: str
    v: str
    scale: float
    causal: bool
    dropout_p: float
    key_perm: tuple[int, ...] | None = None
    key_node: int | None = None
    inner: set[int] = field(default_factory=set)
    #: Written as the exporters write ``F.scaled_dot_product_attention``: the scale split
    #: over q and k, or the dynamo exporter's record of the call.
    called: bool = False


class _NoMatch(Exception):
    pass


def find(b) -> dict:
    """Every attention in the builder's (folded) graph that is fused (module
    docstring), as :class:`~gradaudit.frontends.onnx_ops.Fused` plans by the index of
    the node that maps it (the output MatMul; the module's last node for
    ``nn.MultiheadAttention``); the nodes of different plans never overlap."""
    from gradaudit.frontends import onnx_mha
    from gradaudit.frontends.onnx_ops import Fused

    graph = b.proto.graph
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output if t}
    found: dict[int, Fused] = {}
    taken: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or not _default_domain(node):
            continue
        try:
            m = _Matcher(b, producer).match(i)
        except _NoMatch:
            continue
        found_mha = onnx_mha.match(b, producer, m)
        if found_mha is not None:
            at, plan = found_mha
        elif m.causal or m.called:
            at, plan = i, Fused(functools.partial(emit, m), (m.q, m.k, m.v), frozenset(m.inner))
        else:
            continue  # attention written by hand without a mask: op by op, as the torch captures see it
        if not ((plan.inner | {at}) & taken):
            found[at] = plan
            taken |= plan.inner | {at}
    return found


def _default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


class _Matcher:
    """Walks back from one MatMul, collecting the pattern's nodes; :class:`_NoMatch`
    as soon as something differs from the module docstring's forms."""

    def __init__(self, b, producer: dict[str, int]) -> None:
        self.b = b
        self.nodes = b.proto.graph.node
        self.producer = producer
        self.inner: set[int] = set()

    def take(self, tensor: str, op_types: tuple[str, ...] | frozenset) -> Any:
        """The node producing ``tensor`` when it is one of ``op_types`` (default
        domain), else None."""
        i = self.producer.get(tensor)
        if i is None or tensor in self.b.consts:
            return None
        node = self.nodes[i]
        if node.op_type not in op_types or not _default_domain(node):
            return None
        return i, node

    def need(self, tensor: str, op_types: tuple[str, ...]) -> tuple[int, Any]:
        """:meth:`take`, or :class:`_NoMatch`."""
        got = self.take(tensor, op_types)
        if got is None:
            raise _NoMatch
        return got

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The static shape of ``tensor`` (at least 2-d), or :class:`_NoMatch`."""
        shape = self.b.shape(tensor)
        if shape is None or len(shape) < 2:
            raise _NoMatch
        return shape

    def add(self, i: int) -> None:
        self.inner.add(i)

    def match(self, out: int) -> Match:
        b = self.b
        y = self.nodes[out]
        p, v = y.input[0], y.input[1]
        if v in b.consts or p in b.consts:
            raise _NoMatch
        s, dropout_p = self.probabilities(p)
        scores, causal = self.mask(s)
        scale, qk = self.scaling(scores)
        i, qk_node = self.need(qk, ("MatMul",))
        self.add(i)
        q_scaled, kt_scaled = qk_node.input[0], qk_node.input[1]
        scale_q, q = self.scaling(q_scaled)
        scale_k, kt = self.scaling(kt_scaled)
        k, perm, key_node = self.untranspose(kt)
        k_root = k
        scale_k2, k = self.scaling(k)  # a scalar commutes with the transpose
        scale *= scale_q * scale_k * scale_k2
        split = q != q_scaled and (kt != kt_scaled or k != k_root)
        self.check_users(out)
        self.check_shapes(q, k, v, perm)
        if not (math.isfinite(scale) and scale > 0):
            raise _NoMatch
        called = split or any("scaled_dot_product" in (torch_op_of(self.nodes[i]) or "") for i in self.inner)
        return Match(out, q, k, v, scale, causal, dropout_p, perm, key_node, set(self.inner), called)

    # -- the parts, from the output back ------------------------------------------
    def probabilities(self, p: str) -> tuple[str, float]:
        """P = Softmax(S) [-> Dropout] [-> NaN guard]: (S, dropout ratio)."""
        b = self.b
        dropout_p = 0.0
        got = self.take(p, ("Where",))
        if got is not None:  # Where(IsNaN(P), 0, P): a boolean mask's guard for rows with no key
            i, where = got
            guard = self.take(where.input[0], ("IsNaN",))
            if guard is None or b.scalar(where.input[1]) != 0 or guard[1].input[0] != where.input[2]:
                raise _NoMatch
            self.add(i)
            self.add(guard[0])
            p = where.input[2]
        got = self.take(p, ("Dropout",))
        if got is not None:
            i, node = got
            from gradaudit.frontends.onnx_ops import dropout_ratio

            ratio = dropout_ratio(b, node)
            if ratio is None:
                raise _NoMatch
            self.add(i)
            dropout_p = ratio
            p = node.input[0]
        i, sm = self.need(p, ("Softmax",))
        shape = self.shape(sm.input[0])
        axis = int(b.attrs(sm).get("axis", -1 if b.opset >= 13 else 1)) % len(shape)
        if axis != len(shape) - 1:
            raise _NoMatch
        self.add(i)
        return sm.input[0], dropout_p

    def mask(self, s: str) -> tuple[str, bool]:
        """S = L + M, Where(C, -inf, L), Where(C, L, -inf) or L: (L, causal)."""
        import numpy as np

        b = self.b
        got = self.take(s, ("Add", "Where"))
        if got is None:
            return s, False
        i, node = got
        if node.op_type == "Add":
            consts = [t for t in node.input if t in b.consts]
            if len(consts) != 1:
                raise _NoMatch  # a sum of two run-time values: a mask or bias computed from an input
            scores = node.input[1] if node.input[0] in b.consts else node.input[0]
            m = np.asarray(b.consts[consts[0]])
            if m.dtype.kind != "f":
                raise _NoMatch
            kind = mask_kind(m)
        else:
            cond, a, c = node.input
            cv = b.consts.get(cond)
            if cv is None or np.asarray(cv).dtype != np.bool_:
                raise _NoMatch
            if _fill(b, a) and c not in b.consts:
                allowed, scores = ~np.asarray(cv), c
            elif _fill(b, c) and a not in b.consts:
                allowed, scores = np.asarray(cv), a
            else:
                raise _NoMatch
            kind = mask_kind(allowed)
        if kind is None:
            raise _NoMatch
        self.add(i)
        return scores, kind == "causal"

    def scaling(self, t: str) -> tuple[float, str]:
        """Strip scalar ``Mul``/``Div`` by constants off ``t``: (their product, the
        tensor under them)."""
        b = self.b
        scale = 1.0
        while True:
            got = self.take(t, _SCALING)
            if got is None:
                return scale, t
            i, node = got
            x, c = node.input
            factor = b.scalar(c) if c in b.consts else None
            if node.op_type == "Mul" and factor is None and x in b.consts:
                x, c = c, x
                factor = b.scalar(c)
            if not isinstance(factor, float) or factor == 0 or x in b.consts or b.shape(x) != b.shape(t):
                return scale, t
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
            self.add(i)
            t = x

    def untranspose(self, kt: str) -> tuple[str, tuple[int, ...] | None, int | None]:
        """K from K^T: (k tensor, the permutation that gives k from it or None when it is
        k itself, the ``Transpose`` node index it replaces)."""
        b = self.b
        i, node = self.need(kt, ("Transpose", "Reshape"))
        shape = self.shape(node.input[0])
        if node.op_type == "Transpose":
            perm = list(b.attrs(node).get("perm", reversed(range(len(shape)))))
            if len(perm) < 2:
                raise _NoMatch
            perm[-2], perm[-1] = perm[-1], perm[-2]
            self.add(i)
            if perm == list(range(len(perm))):
                return node.input[0], None, None
            return node.input[0], tuple(perm), i
        # Reshape to (N, L, d) -> Transpose(0, 2, 1) -> Reshape back, N the product of the leading axes
        mid = self.take(node.input[0], ("Transpose",))
        first = self.take(mid[1].input[0], ("Reshape",)) if mid is not None else None
        if first is None or list(b.attrs(mid[1]).get("perm", [])) != [0, 2, 1]:
            raise _NoMatch
        k = first[1].input[0]
        ks, flat, out = b.shape(k), b.shape(first[1].output[0]), b.shape(kt)
        if ks is None or flat is None or out is None or len(ks) < 2:
            raise _NoMatch
        lead = ks[:-2]
        if flat != (math.prod(lead), *ks[-2:]) or out != (*lead, ks[-1], ks[-2]):
            raise _NoMatch
        self.inner |= {i, mid[0], first[0]}
        return k, None, None

    # -- checks ---------------------------------------------------------------------
    def check_users(self, out: int) -> None:
        """Every inner tensor is read by pattern nodes alone and is no graph output."""
        b = self.b
        inside = self.inner | {out}
        for i in self.inner:
            for t in self.nodes[i].output:
                if not t:
                    continue
                if t in b.outputs or any(u not in inside for u in b.consumers.get(t, ())):
                    raise _NoMatch

    def check_shapes(self, q: str, k: str, v: str, perm: tuple[int, ...] | None) -> None:
        b = self.b
        sq, sk, sv = b.shape(q), b.shape(k), b.shape(v)
        if sq is None or sk is None or sv is None:
            raise _NoMatch
        if perm is not None:
            if len(perm) != len(sk):
                raise _NoMatch
            sk = tuple(sk[p] for p in perm)
        if not (len(sq) == len(sk) == len(sv) >= 3):
            raise _NoMatch
        if sq[:-2] != sk[:-2] or sk[:-2] != sv[:-2] or sq[-1] != sk[-1] or sk[-2] != sv[-2] or sv[-1] != sq[-1]:
            raise _NoMatch
        if not all(b.is_float(t) for t in (q, k, v)):
            raise _NoMatch


def mask_kind(mask) -> str | None:
    """:func:`gradaudit.frontends.aten.plain_mask` of a constant boolean (allowed
    positions) or additive mask (numpy): ``"none"``, ``"causal"`` or None."""
    import numpy as np
    import torch

    from gradaudit.frontends.aten import plain_mask

    mask = np.ascontiguousarray(mask)
    return plain_mask(torch.from_numpy(mask if mask.dtype == np.bool_ else mask.astype(np.float32)))


def _fill(b, name: str) -> bool:
    """Whether constant ``name`` is a masked position's fill: -inf, or the lowest value
    of float32 or below (what ``plain_mask`` reads as masked)."""
    import torch

    value = b.scalar(name)
    return isinstance(value, float) and value <= torch.finfo(torch.float32).min / 2


# --------------------------------------------------------------------------- emitting
def emit(m: Match, b, node) -> str:
    """The IR node of match ``m`` at its output MatMul ``node``."""
    import torch
    import torch.nn.functional as F

    from gradaudit.frontends.patterns import sdpa_kwargs
    from gradaudit.ir import Ref, TensorMeta

    k = b.ref(m.k)
    if m.key_perm is not None:
        meta = b.known(m.k)
        permuted = TensorMeta(tuple(meta.shape[p] for p in m.key_perm), meta.dtype)
        k = Ref(b.emit("permute", torch.permute, (k, m.key_perm), tensors=[], metas=[permuted], at=m.key_node))
    d = b.known(m.q).shape[-1]
    kwargs = sdpa_kwargs(m.scale, d, m.causal, m.dropout_p)
    return b.emit("scaled_dot_product_attention", F.scaled_dot_product_attention, (b.ref(m.q), k, b.ref(m.v)),
                  kwargs)


def attention_op(b, node) -> None:
    """The opset-23 ``Attention`` node as ``scaled_dot_product_attention``: with 4-d
    inputs (B, H, L, d), as many heads in q, k and v, no past key/value, no softcap, and
    no mask or a constant one as in the module docstring;
    :class:`~gradaudit.frontends.onnx_ops.Fallback` (onnxruntime runs the node) for the
    other variants."""
    import torch.nn.functional as F

    from gradaudit.frontends.onnx_ops import Fallback
    from gradaudit.frontends.patterns import sdpa_kwargs

    a = b.attrs(node)
    ins = list(node.input) + [""] * (6 - len(node.input))
    q, k, v, mask = ins[:4]
    if any(ins[4:]) or any(t and b.used(t) for t in node.output[1:]):
        raise Fallback("past key/value")
    if float(a.get("softcap", 0.0)) != 0.0:
        raise Fallback("softcap")
    shapes = [b.shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        raise Fallback("3-d attention inputs")
    sq, sk, sv = shapes
    if not (sq[:2] == sk[:2] == sv[:2] and sq[-1] == sk[-1] == sv[-1] and sk[-2] == sv[-2]):
        raise Fallback("grouped heads or head sizes that differ")
    causal = bool(a.get("is_causal", 0))
    if mask:
        mv = b.const(mask)
        if mv is None or causal:
            raise Fallback("computed mask")
        kind = mask_kind(mv)
        if kind is None:
            raise Fallback("a mask other than none or causal")
        causal = kind == "causal"
    d = sq[-1]
    scale = float(a["scale"]) if "scale" in a else 1.0 / math.sqrt(d)
    b.emit("scaled_dot_product_attention", F.scaled_dot_product_attention, (b.ref(q), b.ref(k), b.ref(v)),
           sdpa_kwargs(scale, d, causal, 0.0), tensors=[node.output[0]], metas=[b.meta(node.output[0])])


__all__ = ["Match", "find", "emit", "attention_op"]
