"""Spell common multi-op patterns as the one op they compute.

Attention written out by hand with a mask, as nanoGPT and minGPT write it::

    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
    att = F.softmax(att, dim=-1)          # (then, maybe, a dropout)
    y = att @ v

is ``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)`` when the mask
is the causal one: op by op, the masked logits are -inf and have no finite moments,
while the attention as a whole does. The rewrite happens only when every intermediate
value is used by the next step alone and the mask is a constant (computed from
parameters and buffers only) equal to the causal mask; an additive mask of 0 and -inf
works the same way. The same pattern without a mask is left as it is: its ops have
finite moments one by one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from gradaudit.ir import PARAMETER_LAYER, Graph, Node, Ref, iter_refs, map_refs
from gradaudit.frontends import functions
from gradaudit.frontends.aten import plain_mask


def constant(graph: Graph, ref: Any, memo: dict | None = None) -> torch.Tensor | None:
    """The value of ``ref`` when it depends on parameters, buffers and constants only."""
    memo = {} if memo is None else memo
    if not isinstance(ref, Ref):
        return ref if isinstance(ref, torch.Tensor) else None
    if ref.name in memo:
        return memo[ref.name]
    node = graph[ref.name]
    value = None
    if node.op == "param":
        value = node.params.get("value")
    elif node.kind in ("call_function", "call_method") and node.fn is not None and node.op not in ("dropout", "input"):
        args = [constant(graph, r, memo) for r in _refs(node)]
        if all(a is not None for a in args):
            lookup = {r.name: a for r, a in zip(_refs(node), args)}
            try:
                with torch.no_grad():
                    value = node.fn(*map_refs(node.args, lambda r: lookup[r.name]), **map_refs(node.kwargs, lambda r: lookup[r.name]))
            except Exception:  # noqa: BLE001 - not computable ahead of time: not a constant
                value = None
            value = value if isinstance(value, torch.Tensor) else None
    memo[ref.name] = value
    return value


def _refs(node: Node) -> list[Ref]:
    from gradaudit.ir import iter_refs

    return list(iter_refs((node.args, node.kwargs)))


def fuse_masked_attention(graph: Graph) -> Graph:
    """``softmax(mask(q @ k^T * s)) @ v`` with a causal constant mask -> one
    ``scaled_dot_product_attention`` node (see the module docstring)."""
    replace: dict[str, Node] = {}
    drop: set[str] = set()
    memo: dict = {}
    for node in graph:
        if node.op != "matmul" or node.name in drop:
            continue
        found = _match(graph, node, memo)
        if found is None:
            continue
        new, dead = found
        replace[node.name] = new
        drop |= dead
    if not replace:
        return graph
    nodes = [replace.get(n.name, n) for n in graph if n.name not in drop]
    out = Graph(nodes=nodes, frontend=graph.frontend, input_names=graph.input_names, output_refs=graph.output_refs,
                input_args=graph.input_args, notes=graph.notes, program=graph.program)
    return out


def _only_user(graph: Graph, name: str, user: str) -> bool:
    return [u.name for u in graph.users(name)] == [user] and name not in graph.output_refs


def _match(graph: Graph, y: Node, memo: dict):
    p_ref, v = y.args[0] if y.args else None, y.args[1] if len(y.args) > 1 else None
    if not isinstance(p_ref, Ref) or not isinstance(v, Ref):
        return None
    chain = [p_ref.name]
    p = graph[p_ref.name]
    dropout_p = 0.0
    if p.op == "dropout":
        dropout_p = float(p.fn.p if p.kind == "call_module" else (p.args[1] if len(p.args) > 1 else p.kwargs.get("p", 0.5)))
        p = graph[p.args[0].name] if p.args and isinstance(p.args[0], Ref) else None
        if p is None:
            return None
        chain.append(p.name)
    if p.op != "softmax" or not p.args or not isinstance(p.args[0], Ref):
        return None
    dim = p.fn.dim if p.kind == "call_module" else (p.args[1] if len(p.args) > 1 else p.kwargs.get("dim"))
    if dim not in (-1, len(p.shape or ()) - 1):
        return None
    masked = graph[p.args[0].name]
    chain.append(masked.name)
    logits, mask = _unmask(graph, masked, memo)
    if logits is None or plain_mask(mask) != "causal":
        return None
    scale, qk = 1.0, logits
    if qk.op in ("mul", "div") and len(qk.args) == 2:
        a, b = qk.args
        if isinstance(a, Ref) and isinstance(b, (int, float)):
            scale, qk = (float(b) if qk.op == "mul" else 1.0 / float(b)), graph[a.name]
        elif isinstance(b, Ref) and isinstance(a, (int, float)) and qk.op == "mul":
            scale, qk = float(a), graph[b.name]
        else:
            return None
        chain.append(logits.name)
    if qk.op != "matmul" or len(qk.args) != 2 or not all(isinstance(a, Ref) for a in qk.args):
        return None
    chain.append(qk.name)
    q, kt = qk.args
    kt_node = graph[kt.name]
    if kt_node.op != "transpose" or {_dim(a, len(kt_node.shape)) for a in kt_node.args[1:3]} != {len(kt_node.shape) - 2, len(kt_node.shape) - 1}:
        return None
    k = kt_node.args[0]
    chain.append(kt_node.name)
    order = [y.name] + chain
    for name, user in zip(chain, order):
        if not _only_user(graph, name, user):
            return None
    d = graph[q.name].shape[-1] if graph[q.name].shape else None
    if d is None:
        return None
    kwargs = sdpa_kwargs(scale, d, True, dropout_p)
    new = Node(name=y.name, op="scaled_dot_product_attention", kind="call_function", fn=F.scaled_dot_product_attention,
               args=(q, k, v), kwargs=kwargs, outputs=y.outputs, structure=y.structure, module=y.module,
               module_type=y.module_type, location=masked.location or y.location)
    return new, set(chain)


def sdpa_kwargs(scale: float, d: int, causal: bool, dropout_p: float = 0.0) -> dict[str, Any]:
    """The keyword arguments of ``F.scaled_dot_product_attention(q, k, v, ...)`` for an
    attention recognised from its parts: no explicit mask, the scale only when it is
    not the default 1/sqrt(d) (d the head size), as the call would be written."""
    kwargs: dict[str, Any] = {"attn_mask": None, "dropout_p": float(dropout_p), "is_causal": bool(causal)}
    if not math.isclose(scale, 1.0 / math.sqrt(d), rel_tol=1e-6):
        kwargs["scale"] = float(scale)
    return kwargs


def _dim(d: Any, nd: int) -> int:
    return d + nd if isinstance(d, int) and d < 0 else d


def _unmask(graph: Graph, node: Node, memo: dict):
    """(logits node, allowed-positions mask) of ``masked_fill(s, m, -inf)`` or ``s + m``."""
    if node.op == "masked_fill" and len(node.args) >= 3 and isinstance(node.args[0], Ref):
        fill = node.args[2]
        if not (isinstance(fill, float) and fill == float("-inf")):
            return None, None
        m = constant(graph, node.args[1], memo)
        if m is None or m.dtype != torch.bool:
            return None, None
        return graph[node.args[0].name], ~m
    if node.op == "add" and len(node.args) == 2:
        for s, m in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if isinstance(s, Ref) and graph[s.name].op in ("mul", "div", "matmul"):
                value = constant(graph, m, memo)
                if value is not None and value.is_floating_point():
                    return graph[s.name], value
    return None, None


#: Ops whose value is uninitialised memory: only their shape and dtype mean anything
#: (the code fills them next, as DropPath's ``x.new_empty(shape).bernoulli_(keep)``).
UNINITIALISED = frozenset({"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided"})


def fill_uninitialised(graph: Graph) -> Graph:
    """Each ``empty``-like node becomes a constant of zeros of its shape and dtype.

    Its value is whatever the allocator returns -- NaN or 1e38 on one machine, zeros on
    another -- and the code overwrites it in place (``bernoulli_``, ``fill_``, ``copy_``);
    read as it is, it would make the audit depend on the machine's memory."""
    nodes, changed = [], False
    for node in graph:
        meta = node.outputs[0] if len(node.outputs) == 1 else None
        if node.op in UNINITIALISED and node.kind != "get_attr" and meta is not None:
            value = torch.zeros(meta.shape, dtype=getattr(torch, meta.dtype))
            node = Node(name=node.name, op="param", kind="get_attr", params={"value": value}, outputs=[meta],
                        module=node.module, module_type=node.module_type, location=node.location)
            changed = True
        nodes.append(node)
    if not changed:
        return graph
    return Graph(nodes=nodes, frontend=graph.frontend, input_names=graph.input_names, output_refs=graph.output_refs,
                 input_args=graph.input_args, notes=graph.notes, program=graph.program)


def _drop_rows(x: torch.Tensor, p: float, mode: str = "row", training: bool = True) -> torch.Tensor:
    """Stochastic depth as torchvision and timm compute it: ``x * mask / (1 - p)`` with one
    Bernoulli(1 - p) draw per sample (``row``) or per batch."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    shape = [x.shape[0]] + [1] * (x.dim() - 1) if mode == "row" else [1] * x.dim()
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


def fuse_drop_path(graph: Graph) -> Graph:
    """``x * (bernoulli(empty(shape), keep) / keep)`` -> one ``stochastic_depth`` node.

    torch.export and the hook capture see DropPath / stochastic depth as the ops it is
    made of; a local Monte Carlo estimate of the random mask draws a handful of values
    (one per sample) and reads the branch as mostly kept or mostly dropped. Spelled as
    the op it is, its handler gives the exact moments of inverted dropout.
    """
    replace: dict[str, Node] = {}
    drop: set[str] = set()
    memo: dict = {}
    for node in graph:
        if node.name in drop:
            continue
        outer = None  # x * mask / keep: the division comes last
        if node.op == "div" and len(node.args) == 2 and isinstance(node.args[0], Ref) and isinstance(node.args[1], (int, float)):
            outer, node = node, graph[node.args[0].name]
        if node.op != "mul" or len(node.args) != 2 or not all(isinstance(a, Ref) for a in node.args):
            continue
        for x, m in (node.args, node.args[::-1]):
            found = _drop_mask(graph, graph[m.name], memo, float(outer.args[1]) if outer is not None else None)
            if found is None or graph[x.name].shape != node.shape:
                continue
            keep, chain, row, in_place = found
            if outer is not None:
                chain, node = [node.name, *chain], outer
            # the mask's nodes feed nothing else (an in-place division: the mask feeds it and the product)
            users_ok = [_only_user(graph, a, b) for a, b in zip(chain, [node.name] + chain)]
            if in_place is not None:
                users_ok[-1] = True
                chain = [*chain, in_place]
            if not all(users_ok):
                continue
            replace[node.name] = Node(
                name=node.name, op="stochastic_depth", kind="call_function", fn=_drop_rows,
                args=(x, 1.0 - keep, "row" if row else "batch", True), outputs=node.outputs, structure=node.structure,
                module=node.module, module_type=node.module_type, location=node.location,
            )
            drop |= set(chain)
            break
    if not replace:
        return graph
    nodes = [replace.get(n.name, n) for n in graph if n.name not in drop]
    return Graph(nodes=nodes, frontend=graph.frontend, input_names=graph.input_names, output_refs=graph.output_refs,
                 input_args=graph.input_args, notes=graph.notes, program=graph.program)


def _drop_mask(graph: Graph, node: Node, memo: dict, scale: float | None = None):
    """(keep, [mask nodes], per-sample) of ``bernoulli(c, keep) / keep`` with ``c`` a
    constant (``scale``: the division already found after the product), or None. The
    division may be in place, as timm's ``drop_path`` writes it (``random_tensor =
    x.new_empty(shape).bernoulli_(keep); random_tensor.div_(keep); x * random_tensor``):
    the product then reads the Bernoulli node, whose other user is the unused ``div_``."""
    chain: list[str] = []
    if scale is None and node.op == "div" and len(node.args) == 2 and isinstance(node.args[0], Ref) and isinstance(node.args[1], (int, float)):
        scale, chain = float(node.args[1]), [node.name]
        node = graph[node.args[0].name]
    in_place = None
    if scale is None and node.op == "bernoulli":
        divs = [u for u in graph.users(node.name) if _divides_in_place(graph, u, node.name)]
        if len(divs) == 1 and len(graph.users(node.name)) == 2:
            scale, in_place = float(divs[0].args[1]), divs[0].name
    if node.op != "bernoulli" or not node.args or constant(graph, node.args[0], memo) is None:
        return None
    keep = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    if not isinstance(keep, (int, float)) or scale is None or not math.isclose(float(keep), scale, rel_tol=1e-6):
        return None
    shape = node.shape or ()
    row = len(shape) >= 1 and all(d == 1 for d in shape[1:])
    return float(keep), chain + [node.name], row, in_place


def _divides_in_place(graph: Graph, node: Node, source: str) -> bool:
    """Whether ``node`` is ``source.div_(number)`` and nothing reads its result."""
    name = getattr(node.fn, "__name__", "") or ""
    return (
        node.op == "div" and name.endswith("_") and len(node.args) == 2 and isinstance(node.args[0], Ref)
        and node.args[0].name == source and isinstance(node.args[1], (int, float))
        and not graph.users(node.name) and node.name not in graph.output_refs
    )


#: Functional ops that are weight layers when they read a trainable parameter as their
#: weight: op -> (index, keyword) of the weight and of the bias among the arguments.
FUNCTIONAL_LAYERS = {
    "linear": ((1, "weight"), (2, "bias")),
    **{conv: ((1, "weight"), (2, "bias")) for conv in ("conv", "conv1d", "conv2d", "conv3d", "conv_transpose",
                                                        "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    "embedding": ((1, "weight"), None),
}
#: The op a module call of the same layer has (``F.conv2d`` -> ``conv``, as ``nn.Conv2d``).
_LAYER_OP = {"conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "conv_transpose1d": "conv_transpose",
             "conv_transpose2d": "conv_transpose", "conv_transpose3d": "conv_transpose",
             "grouped_mm_fallback": "grouped_mm", "_grouped_mm": "grouped_mm"}
#: Products of two operands, one of which may be a parameter: ``x @ self.W``,
#: ``torch.addmm(self.b, x, self.W)`` (GPT-2's ``Conv1D``),
#: ``torch.einsum("bi,ij->bj", x, self.W)``.
PRODUCTS = frozenset({"matmul", "mm", "addmm", "einsum"})
#: A mixture of experts' grouped product (input, stacked expert weights, offsets):
#: transformers' op, ATen's, torch.nn.functional's; as a layer, ``grouped_mm``.
GROUPED_PRODUCTS = frozenset({"grouped_mm", "grouped_mm_fallback", "_grouped_mm"})
#: The key prefix, in a functional layer's ``params``, of the parameters its weight is
#: computed from (``weight`` is then the computed value).
SOURCE = "from:"
#: Ops that only lay a parameter out again (``self.W.t()``) on the way to a product.
RELAYOUT = frozenset({"t", "transpose", "permute", "contiguous", "view", "reshape", "expand", "unsqueeze", "to",
                       "type_as"})


def _argument(node: Node, where: tuple[int, str] | None) -> Any:
    if where is None:
        return None
    index, keyword = where
    return node.args[index] if len(node.args) > index else node.kwargs.get(keyword)


def parameter_node(graph: Graph, ref: Any, through: frozenset = frozenset()) -> Node | None:
    """The ``param`` node that ``ref`` reads, directly or through the ops in ``through``."""
    while isinstance(ref, Ref):
        node = graph[ref.name]
        if node.op == "param":
            return node
        if node.op not in through or not node.args:
            return None
        ref = node.args[0]
    return None


def _parameter(graph: Graph, ref: Any, through: frozenset = frozenset()) -> tuple[str, torch.Tensor, dict] | None:
    """(qualified name, tensor, {}) of the trainable parameter that ``ref`` reads,
    directly or through the layout ops in ``through``; for a constant that a frontend
    computed from parameters (``torch.export`` folds ``self.W.t()``), (the first
    parameter's name, the constant, {name: parameter})."""
    node = parameter_node(graph, ref, through)
    if node is None:
        return None
    value = node.params.get("value")
    if isinstance(value, torch.nn.Parameter) and value.requires_grad:
        return node.module or node.name, value, {}
    sources = {k[len(SOURCE):]: p for k, p in node.params.items() if k.startswith(SOURCE)}
    if sources and isinstance(value, torch.Tensor):
        return min(sources), value, sources
    return None


def _computed_weight(graph: Graph, ref: Any, memo: dict) -> tuple[str, torch.Tensor, dict] | None:
    """(name, value, {qualified name: parameter}) of a weight computed from trainable
    parameters alone (``F.conv2d(x, standardize(self.weight))``, a hand-written weight
    norm), named after its first parameter."""
    if not isinstance(ref, Ref) or graph[ref.name].op == "param":
        return None
    value = constant(graph, ref, memo)
    if value is None:
        return None
    sources: dict[str, torch.Tensor] = {}
    todo, seen = [ref.name], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = graph[name]
        v = node.params.get("value") if node.op == "param" else None
        if isinstance(v, torch.nn.Parameter) and v.requires_grad:
            sources[node.module or node.name] = v
        todo.extend(r.name for r in _refs(node))
    if not sources:
        return None
    return min(sources), value.detach(), sources


def functional_layers(graph: Graph) -> Graph:
    """A functional op that multiplies by a trainable parameter is a weight layer, as the
    module call would be: ``F.linear(x, self.weight, self.bias)`` in a hand-written
    layer, ``F.conv2d``, ``F.embedding``, and ``x @ self.W`` or a two-operand einsum with a
    2-d parameter (also through ``.t()``, a transpose, ``expand`` or a cast), a mixture of
    experts' grouped product with its stacked 3-d expert weights, and a linear, conv or embedding
    whose weight is computed from parameters alone (weight standardization, a hand-written
    weight norm).

    The node keeps its op and arguments. It gets the parameters it reads as ``params``
    (``weight``, ``bias``; a computed weight's value as ``weight`` and the parameters it
    comes from under :data:`SOURCE`), and a module name: the weight's owner (``blocks.3``
    for ``blocks.3.weight``) or, when the weight is not named ``weight``, the weight's own
    qualified name (a computed weight keeps the enclosing module's name when the frontend
    gave one); ``F.conv2d`` takes the op of ``nn.Conv2d``, ``conv``. Without this, a
    network written with ``F.linear`` had no layers and passed as healthy whatever its
    depth."""
    memo: dict = {}
    for node in graph.nodes:
        if node.kind not in ("call_function", "call_method") or node.params:
            continue
        found = None
        if node.op in FUNCTIONAL_LAYERS:
            weight_at, bias_at = FUNCTIONAL_LAYERS[node.op]
            found = _parameter(graph, _argument(node, weight_at))
            if found is None:
                found = _computed_weight(graph, _argument(node, weight_at), memo)
            bias = _parameter(graph, _argument(node, bias_at)) if found is not None else None
        elif node.op in PRODUCTS and len(node.args) >= 2:
            given = list(node.args[1:] if node.op == "einsum" else node.args[1:3] if node.op == "addmm" else node.args[:2])
            if len(given) == 1 and isinstance(given[0], (list, tuple)):  # einsum(eq, [a, b])
                given = list(given[0])
            operands = [_parameter(graph, a, RELAYOUT) for a in given] if len(given) == 2 else [None]
            if sum(o is not None for o in operands) == 1:
                found = next(o for o in operands if o is not None)
                found = found if found[1].dim() == 2 else None
            bias = None
        elif node.op in GROUPED_PRODUCTS and len(node.args) >= 2:
            found = _parameter(graph, node.args[1], RELAYOUT)
            found = found if found is not None and found[1].dim() == 3 else None
            bias = None
        elif node.op == functions.OP:
            _function_layer(graph, node, memo)
        if found is None:
            continue
        name, weight, sources = found
        functional, node.op = node.op, _LAYER_OP.get(node.op, node.op)
        node.params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias[1]}
        node.params.update({f"{SOURCE}{q}": p for q, p in sources.items()})
        if node.module is None or not sources or functional in GROUPED_PRODUCTS:  # named after the weight read as it is
            # (a mixture of experts' two or three grouped products share one module)
            owned = name.endswith(".weight")
            node.module = name[: -len(".weight")] if owned else name
            node.module_type = f"F.{functional}" if owned else PARAMETER_LAYER
    return graph


def _function_layer(graph: Graph, node: Node, memo: dict) -> None:
    """A custom ``autograd.Function`` (:mod:`gradaudit.frontends.functions`) that reads
    trainable parameters and a value of the forward is a layer, like a module the hook
    capture cannot see into: its parameters (by qualified name) are the node's, and it is
    named after the owner of the first matrix among them (``blocks.3`` for
    ``blocks.3.weight``). The propagation estimates its output and its input gradient on
    sampled inputs; the coverage check then counts it, and the probe measures its
    parameters' gradients. One that reads parameters alone (a weight quantised by a
    straight-through estimator, ``F.linear(x, STE.apply(self.weight))``) computes a
    weight: the layer is the op that multiplies by it."""
    read = [found for ref in iter_refs((node.args, node.kwargs)) if (found := _parameter(graph, ref, RELAYOUT))]
    if not read or constant(graph, Ref(node.name), memo) is not None:
        return
    node.params = {name: value for name, value, _ in read}
    for name, value, sources in read:
        node.params.update({f"{SOURCE}{q}": p for q, p in sources.items()})
    first = next((name for name, value, _ in read if value.dim() >= 2), read[0][0])
    node.module = first.rpartition(".")[0] or first
    node.module_type = functions.function_name(node.fn) or functions.OP


__all__ = ["fuse_masked_attention", "fuse_drop_path", "fill_uninitialised", "functional_layers", "constant",
           "parameter_node", "UNINITIALISED", "FUNCTIONAL_LAYERS", "PRODUCTS", "RELAYOUT", "SOURCE", "sdpa_kwargs"]
