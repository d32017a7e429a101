"""``nn.MultiheadAttention`` as the torch exporters write it, recognised around the
attention core :mod:`gradaudit.frontends.onnx_attention` matched, and mapped onto the
IR's one ``multihead_attention`` node: the node torch.fx records for the module.

The module computes in the sequence-first layout (a batch-first module transposes its
input and output around it), with one packed in-projection::

    S = x @ W_in^T + b_in                           (L, B, 3E), x of shape (L, B, E)
    q, k, v = the heads of S[..., :E], S[..., E:2E], S[..., 2E:]
                                                    (B, H, L, d) or (B * H, L, d), E = H d
    Y = softmax(q k^T / sqrt(d)) v                  the matched core (no mask)
    O = heads of Y merged @ W_out^T + b_out         (L, B, E): on (L * B, E) then reshaped
                                                    back (a Gemm), or on (L, B, E)

Between S and q, k, v and between Y and the out-projection the exporters write
different layout nodes (``Reshape``, ``Unsqueeze``, ``Transpose``, ``Squeeze``,
``Gather``; the dynamo exporter adds ``Identity``; a hand-written split ``Split`` or
``Slice``). Whatever they are, they are checked exactly: the nodes run on element
indices (onnx's reference evaluator, S's and Y's flat positions as int64 values) and
each of q, k, v and the out-projection's input must hold, element for element, the
position the formulas above name.

Why not the core alone: behind the packed projection the heads are a split of its
channel axis, which the IR's layout statistics cannot follow (one set of statistics for
all heads), and the out-projection's ``(L * B, E)`` view merges positions with the batch
(their correlation is lost), while the ``multihead_attention`` handler keeps each head's
channels from the weights. Against autograd (the torch probe, 16 draws), on the
attention outputs of the agreement tests' models, the core alone is off by up to 27%
(6-layer ``nn.TransformerEncoderLayer`` stack) and 33% (the Pre-LN example), the
module's handler by up to 4% and 10%. (The same attention written with
``F.scaled_dot_product_attention`` in torch and captured by fx: up to 17% on the first.)

Recognised only as a whole, else the core stays ``scaled_dot_product_attention``: the
same x for q, k and v (self-attention; a cross-attention's two projections are not
recognised), the default scale 1/sqrt(d), no mask, biases on both projections or on
neither, an E -> E out-projection with constant weights, and every tensor from S to O
read by the pattern alone. The sequence-first layout is what marks the module's own
code: a hand-written batch-first attention is left as the torch capture sees it (its
core fused, its projections as linear layers).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

#: Ops that only move elements (their other inputs constant).
LAYOUT = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Gather", "Split", "Slice", "Identity",
                    "Flatten"})


@dataclass
class Mha:
    """One recognised module: input x and output O (ONNX tensors), the projections'
    constant names, the heads, the core's dropout, the qualified name, the pattern's
    node indices and the index of the core's output MatMul (its name and place)."""

    x: str
    out: str
    in_weight: str
    in_bias: str | None
    out_weight: tuple[str, Any]
    out_bias: tuple[str | None, Any]
    embed: int
    heads: int
    dropout_p: float
    core: int
    qualname: str | None = None
    inner: set[int] = field(default_factory=set)


class _NoMatch(Exception):
    pass


def match(b, producer: dict[str, int], core) -> Any:
    """The :class:`~gradaudit.frontends.onnx_ops.Fused` plan of the module around
    ``core`` (an :class:`~gradaudit.frontends.onnx_attention.Match`), or None."""
    from gradaudit.frontends.onnx_ops import Fused

    try:
        m = _Recogniser(b, producer, core).recognise()
    except _NoMatch:
        return None
    return max(m.inner), Fused(functools.partial(emit, m), (m.x,), frozenset(m.inner - {max(m.inner)}))


def _default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


class _Recogniser:
    def __init__(self, b, producer: dict[str, int], core) -> None:
        self.b = b
        self.nodes = b.proto.graph.node
        self.producer = producer
        self.core = core

    def recognise(self) -> Mha:
        b, core = self.b, self.core
        sq, sy = b.shape(core.q), b.shape(self.nodes[core.output].output[0])
        d = sq[-1]
        if core.causal or not math.isclose(core.scale, 1.0 / math.sqrt(d), rel_tol=1e-6) or len(sq) not in (3, 4):
            raise _NoMatch
        sources, chains = zip(*(self.back(t) for t in (core.q, core.k, core.v)))
        if len(set(sources)) != 1:
            raise _NoMatch
        s = sources[0]
        x, in_weight, in_bias, proj = self.in_projection(s)
        shape = b.shape(s)
        if shape is None or len(shape) != 3 or shape[2] % 3 or (shape[2] // 3) % d:
            raise _NoMatch
        seq, batch, e3 = shape
        e = e3 // 3
        heads = e // d
        if sq != ((batch, heads, seq, d) if len(sq) == 4 else (batch * heads, seq, d)):
            raise _NoMatch
        self.check_heads(s, shape, set().union(*chains), heads, d)
        out_chain, out, out_inner, out_weight, out_bias = self.out_projection(sy, seq, batch, heads, d, e)
        if (in_bias is None) != (out_bias[1] is None):
            raise _NoMatch
        inner = set().union(*chains) | proj | core.inner | {core.output} | out_chain | out_inner
        self.check_users(inner, out)
        return Mha(x, out, in_weight, in_bias, out_weight, out_bias, e, heads, core.dropout_p, core.output,
                   self.qualname(in_weight, core.output), inner)

    # -- the input side ------------------------------------------------------------
    def back(self, t: str) -> tuple[str, set[int]]:
        """(the tensor ``t`` is a rearrangement of, the layout nodes in between)."""
        chain: set[int] = set()
        while True:
            i = self.producer.get(t)
            if i is None or t in self.b.consts:
                return t, chain
            node = self.nodes[i]
            if node.op_type not in LAYOUT or not _default_domain(node):
                return t, chain
            if any(x and x not in self.b.consts for x in node.input[1:]):
                raise _NoMatch
            chain.add(i)
            t = node.input[0]

    def in_projection(self, s: str) -> tuple[str, str, str | None, set[int]]:
        """S = x @ W [+ b] with constant W (E, 3E): (x, W, b or None, node indices)."""
        b = self.b
        i = self.producer.get(s)
        if i is None:
            raise _NoMatch
        node = self.nodes[i]
        bias, nodes = None, {i}
        if node.op_type == "Add" and _default_domain(node):
            consts = [t for t in node.input if t in b.consts]
            if len(consts) != 1:
                raise _NoMatch
            bias = consts[0]
            mm = node.input[1] if node.input[0] == bias else node.input[0]
            j = self.producer.get(mm)
            if j is None or b.consumers.get(mm) != [i]:
                raise _NoMatch
            node, nodes = self.nodes[j], nodes | {j}
        if node.op_type != "MatMul" or not _default_domain(node):
            raise _NoMatch
        x, w = node.input
        wv = b.const(w)
        if x in b.consts or wv is None or wv.ndim != 2 or wv.shape[1] != 3 * wv.shape[0]:
            raise _NoMatch
        if bias is not None and b.const(bias).size != wv.shape[1]:
            raise _NoMatch
        return x, w, bias, nodes

    def check_heads(self, s: str, shape: tuple[int, ...], chain: set[int], heads: int, d: int) -> None:
        """q, k, v hold S's elements where the module's head split puts them."""
        import numpy as np

        core = self.core
        seq, batch, e3 = shape
        e = e3 // 3
        got = _run(self.b, chain, s, np.arange(math.prod(shape), dtype=np.int64).reshape(shape),
                   [core.q, core.k, core.v])
        if got is None:
            raise _NoMatch
        if core.key_perm is not None:
            got[1] = got[1].transpose(core.key_perm)
        b_, h_, l_, j_ = np.ix_(range(batch), range(heads), range(seq), range(d))
        for part, value in enumerate(got):  # (B, H, L, d), or (B * H, L, d): the same order
            want = (l_ * batch + b_) * e3 + part * e + h_ * d + j_
            if not np.array_equal(value.reshape(-1), want.reshape(-1)):
                raise _NoMatch

    # -- the output side -----------------------------------------------------------
    def out_projection(self, sy, seq: int, batch: int, heads: int, d: int, e: int):
        """Y's heads merged to (L * B, E) or (L, B, E), then the out-projection
        (:meth:`projection`): (layout nodes, output O, the projection's nodes, its
        (weight name, weight), its (bias name, bias))."""
        import numpy as np

        y = t = self.nodes[self.core.output].output[0]
        chain: set[int] = set()
        while True:
            user = self.single_user(t)
            if user is None:
                raise _NoMatch
            j, node = user
            if node.op_type not in LAYOUT or not _default_domain(node) or len(node.output) != 1:
                break
            if node.input[0] != t or any(x and x not in self.b.consts for x in node.input[1:]):
                raise _NoMatch
            chain.add(j)
            t = node.output[0]
        merged = self.b.shape(t)
        if not chain or merged not in ((seq * batch, e), (seq, batch, e)) or node.input[0] != t:
            raise _NoMatch
        got = _run(self.b, chain, y, np.arange(math.prod(sy), dtype=np.int64).reshape(sy), [t])
        l_, b_, h_, j_ = np.ix_(range(seq), range(batch), range(heads), range(d))
        want = ((b_ * heads + h_) * seq + l_) * d + j_  # Y's element at (l, b, h * d + j)
        if got is None or not np.array_equal(got[0].reshape(-1), want.reshape(-1)):
            raise _NoMatch
        return (chain, *self.projection(j, node, merged, seq, batch, e))

    def projection(self, j: int, node, merged: tuple[int, ...], seq: int, batch: int, e: int):
        """The out-projection at node ``j`` (``Gemm``, or ``MatMul`` [+ ``Add``] by
        constants; on (L * B, E) followed by a ``Reshape`` to (L, B, E)): (output O, its
        nodes, (weight name, weight), (bias name, bias)), as ``nn.Linear`` holds them."""
        from gradaudit.frontends.onnx_ops import Fallback, gemm_parts

        b = self.b
        nodes = {j}
        if node.op_type == "Gemm" and _default_domain(node) and len(merged) == 2:
            try:
                weight, bias, bias_name = gemm_parts(b, node)
            except Fallback:
                raise _NoMatch from None
            if b.attrs(node).get("transA", 0):
                raise _NoMatch
            out = node.output[0]
        elif node.op_type == "MatMul" and _default_domain(node) and b.const(node.input[1]) is not None:
            weight, bias, bias_name = b.tensor(node.input[1]).t(), None, None
            out = node.output[0]
            add = self.single_user(out)
            other = [t for t in add[1].input if t != out] if add is not None else []
            if add is not None and add[1].op_type == "Add" and _default_domain(add[1]) and len(other) == 1 \
                    and other[0] in b.consts and b.const(other[0]).size == e:
                bias_name, bias = other[0], b.tensor(other[0]).reshape(-1)
                nodes.add(add[0])
                out = add[1].output[0]
        else:
            raise _NoMatch
        if tuple(weight.shape) != (e, e):
            raise _NoMatch
        if len(merged) == 2:
            back = self.single_user(out)
            if back is None or back[1].op_type != "Reshape" or not _default_domain(back[1]):
                raise _NoMatch
            nodes.add(back[0])
            out = back[1].output[0]
        if b.shape(out) != (seq, batch, e):
            raise _NoMatch
        return out, nodes, (node.input[1], weight), (bias_name, bias)

    def single_user(self, t: str):
        """(index, node) of the one node reading ``t``, when ``t`` is no graph output."""
        users = self.b.consumers.get(t, [])
        if len(users) != 1 or t in self.b.outputs:
            return None
        return users[0], self.nodes[users[0]]

    # -- checks and names ------------------------------------------------------------
    def check_users(self, inner: set[int], out: str) -> None:
        b = self.b
        for i in inner:
            for t in self.nodes[i].output:
                if t and t != out and (t in b.outputs or any(u not in inner for u in b.consumers.get(t, ()))):
                    raise _NoMatch

    def qualname(self, in_weight: str, core: int) -> str | None:
        """The module's name: its in-projection weight's name without ``.in_proj_weight``
        (``blocks.0.attn``), else the exporter's scope of the core."""
        from gradaudit.frontends.onnx import scope_of

        source = self.b.origin.get(in_weight, in_weight)
        if source.endswith(".in_proj_weight"):
            return source[: -len(".in_proj_weight")]
        return scope_of(self.nodes[core])[0]


def _run(b, indices: set[int], src: str, value, outputs: list[str]) -> list | None:
    """The layout nodes ``indices`` run on ``value`` fed as ``src`` (onnx's reference
    evaluator): the values of ``outputs``, None when it cannot run them."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    nodes = [b.proto.graph.node[i] for i in sorted(indices)]
    consts = sorted({t for n in nodes for t in n.input[1:] if t})
    graph = helper.make_graph(
        nodes, "layout", [helper.make_tensor_value_info(src, onnx.TensorProto.INT64, value.shape)],
        [helper.make_value_info(t, onnx.TypeProto()) for t in outputs],
        [numpy_helper.from_array(b.consts[t], t) for t in consts],
    )
    model = helper.make_model(graph, opset_imports=list(b.proto.opset_import))
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        return [v for v in ReferenceEvaluator(model).run(None, {src: value})]
    except Exception:  # noqa: BLE001 - an op the evaluator rejects: not recognised
        return None


def emit(m: Mha, b, node) -> None:
    """The ``multihead_attention`` node of ``m`` (nn.MultiheadAttention, sequence first,
    called as ``attn(x, x, x, need_weights=False)``) and the getitem of its output."""
    import torch.nn as nn

    module = b.module(nn.MultiheadAttention, m.embed, m.heads, dropout=m.dropout_p, bias=m.in_bias is not None)
    params = b.attach(module, in_proj_weight=(m.in_weight, b.tensor(m.in_weight).t()),
                      in_proj_bias=(m.in_bias, b.tensor(m.in_bias).reshape(-1) if m.in_bias else None))
    out_params = b.attach(module.out_proj, weight=m.out_weight, bias=m.out_bias)
    params.update({f"out_proj.{k}": v for k, v in out_params.items()})
    x = b.ref(m.x)
    name = b.emit("multihead_attention", module, (x, x, x), {"need_weights": False}, tensors=[m.out, ""],
                  metas=[b.meta(m.out), None], module=module, params=params, at=m.core, layer=m.qualname)
    b.tensor_of[name] = m.out


__all__ = ["Mha", "match", "emit", "LAYOUT"]
