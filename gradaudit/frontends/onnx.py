"""ONNX capture: a checked :class:`~gradaudit.frontends.onnx_load.OnnxModel` ->
:class:`gradaudit.ir.Graph`, with the same ops the torch.fx frontend produces.

1. The graph inputs get the example inputs' shapes; ``onnx.shape_inference`` (strict,
   with data propagation) gives every tensor a static shape.
2. Constant folding: every node whose inputs are all constants (initializers, graph
   inputs that have an initializer -- the older opsets' convention --, ``Constant``
   nodes) or whose output only depends on static shapes (``Shape``, ``Size``) is
   evaluated once with onnx's reference evaluator. Weights stored as
   ``ConstantOfShape``, casts and reshapes of initializers, shape arithmetic: all
   become plain constants. A constant sequence (the dynamo exporter's
   ``SplitToSequence`` of a packed weight) feeds the nodes that read it (``SequenceAt``)
   and goes once none but folded nodes read it. What they may materialise is capped
   (``max_bytes``).
3. Shape inference runs again on the folded graph, then every remaining node is mapped
   by :mod:`gradaudit.frontends.onnx_ops` onto IR nodes (attention written out in nodes
   first recognised as one, :mod:`gradaudit.frontends.onnx_attention`): parameterized ops become
   ``call_module`` nodes of the torch module they correspond to (``Conv`` ->
   ``nn.Conv2d`` holding the file's weights, ``Gemm`` -> ``nn.Linear`` ...), the rest
   ``call_function`` nodes of the equivalent torch function, so the propagation
   handlers and the elementwise fusion read them exactly as they read a torch.fx graph.
   An op without a mapping runs through onnxruntime as a single node (its statistics
   are estimated by the local Monte Carlo and listed).

Names and places: the IR node is named after the ONNX node; module qualified names
come from the weights' names (``layer1.0.conv1.weight``), the torch exporters' scopes
(``/layer1/layer1.0/conv1/Conv``; the dynamo exporter's ``pkg.torch.onnx.name_scopes``)
or the weight's name; locations from the dynamo exporter's
``pkg.torch.onnx.stack_trace`` (the user's line that created the op).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import LoadError
from gradaudit.frontends.onnx_load import (
    OnnxModel,
    human_bytes,
    ordered_inputs,
    require_onnx,
    torch_dtype_name,
    type_name,
)
from gradaudit.ir import Graph, Location, Node, Ref, TensorMeta

#: Ops never folded: their value must stay a run-time value.
_NO_FOLD = frozenset({"Dropout", "If", "Loop", "Scan"})
#: Ops whose result size is not bounded by their inputs' sizes.
_EXPANDING = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot"})


@dataclass
class OnnxGraph(Graph):
    """The IR graph of an ONNX model, with what the ONNX probe needs to run it.

    ``tensor_of`` maps an IR node to the ONNX tensor holding its output; ``params_of``
    maps a layer node to ``{param name: ONNX tensor name}`` (``{"weight": "fc.weight"}``);
    ``folded`` is the model after constant folding (constants as initializers),
    ``consts`` the folded values and ``shapes`` the inferred shapes by tensor name;
    ``facts`` what the capture noticed (for the inference-export rule).
    """

    tensor_of: dict[str, str] = field(default_factory=dict)
    params_of: dict[str, dict[str, str]] = field(default_factory=dict)
    folded: Any = None
    consts: dict[str, Any] = field(default_factory=dict)
    #: ONNX tensor -> (static shape or None, ONNX element type), from shape inference.
    shapes: dict[str, tuple] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def capture(model: OnnxModel, inputs: Any) -> OnnxGraph:
    """Map ``model`` with inputs of the shapes of ``inputs`` (see
    :func:`~gradaudit.frontends.onnx_load.ordered_inputs`); raise CaptureError or LoadError."""
    onnx = require_onnx()
    tensors, keys = ordered_inputs(model, inputs)
    skel = _skeleton(model.proto, onnx)
    _set_input_shapes(model, skel, tensors)
    shapes = _infer(model, skel, onnx)
    consts, folded_nodes, origin = _fold(model, skel, shapes, onnx)
    clean = _folded_model(skel, consts, folded_nodes, onnx)
    shapes = _infer(model, clean, onnx)
    from gradaudit.frontends import onnx_ops

    builder = onnx_ops.Builder(model, clean, consts, shapes, onnx, origin)
    graph = builder.build()
    graph.folded = clean
    graph.input_args = keys
    return graph


# --------------------------------------------------------------------------- shapes
#: Tensors up to this many elements keep their values in the skeleton (shape tensors).
_SMALL = 4096


def _skeleton(proto, onnx):
    """The model without the data of its large initializers (dims and types kept): what
    shape inference and the graph mapping need, without copying the weights, whose
    values the folding reads from ``proto`` directly."""
    skel = onnx.ModelProto()
    skel.ir_version = proto.ir_version
    skel.opset_import.extend(proto.opset_import)
    skel.functions.extend(proto.functions)
    skel.producer_name, skel.producer_version = proto.producer_name, proto.producer_version
    src, g = proto.graph, skel.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        _add_initializer(g, t, t.name, t.dims, t.data_type)
    return skel


def _add_initializer(graph, tensor, name: str, dims, data_type: int) -> None:
    if math.prod(dims) <= _SMALL and tensor is not None:
        graph.initializer.append(tensor)
    else:
        stub = graph.initializer.add()
        stub.name, stub.data_type = name, data_type
        stub.dims.extend(dims)


def _set_input_shapes(model: OnnxModel, skel, tensors: tuple) -> None:
    """Give the real graph inputs the example inputs' shapes (in graph-input order)."""
    real = {i.name for i in model.input_infos()}
    for info, x in zip([i for i in skel.graph.input if i.name in real], tensors):
        t = info.type.tensor_type
        t.ClearField("shape")
        for d in x.shape:
            t.shape.dim.add().dim_value = int(d)


def _infer(model: OnnxModel, proto, onnx) -> dict[str, tuple[tuple[int, ...] | None, int]]:
    """Strict shape inference: ``{tensor name: (static shape or None, elem type)}``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        text = str(exc)
        if "No Op registered" in text or "is not a registered function/op" in text:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        else:
            raise LoadError(f"{model.label}: shape inference failed: {_first_line(text)}") from None
    out: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if not vi.type.HasField("tensor_type"):
            continue
        t = vi.type.tensor_type
        shape = None
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shape = tuple(int(d.dim_value) for d in t.shape.dim)
        out[vi.name] = (shape, t.elem_type)
    for t in g.initializer:
        out[t.name] = (tuple(int(d) for d in t.dims), t.data_type)
    return out


def _first_line(text: str) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.strip())
    return (text.splitlines() or [""])[0][:300]


# --------------------------------------------------------------------------- folding
#: Folded ops whose output is their first input rearranged: it keeps that input's name.
_SAME_VALUES = frozenset({"Transpose", "Reshape", "Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


def _fold(model: OnnxModel, proto, shapes: dict, onnx) -> tuple[dict[str, Any], set[int], dict[str, str]]:
    """Evaluate the constant part of the graph (module docstring, step 2). ``proto`` is
    the skeleton; initializer values come from the model itself. Returns the constants,
    the indices of the folded nodes and, for constants that are an initializer
    rearranged (``Transpose(fc.weight)``), that initializer's name."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    consts: dict[str, Any] = {}
    budget = model.max_bytes
    for t in model.proto.graph.initializer:
        consts[t.name] = numpy_helper.to_array(t)
    used = sum(a.nbytes for a in consts.values())
    folded: set[int] = set()
    origin: dict[str, str] = {}
    opsets = list(proto.opset_import)
    seqs: dict[str, list] = {}  # constant sequences (SplitToSequence of a weight), never initializers
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
            continue
        if any(a.HasField("g") or a.graphs for a in node.attribute):
            continue
        names = [n for n in node.input if n]
        if node.op_type in ("Shape", "Size") and names and shapes.get(names[0], (None, 0))[0] is not None:
            consts.update(_shape_value(node, shapes[names[0]][0], np))
            folded.add(i)
            continue
        if node.op_type == "CastLike" and names[0] in consts and shapes.get(names[1], (None, 0))[1]:
            # the second input only lends its type (the dynamo exporter's zero biases)
            target = onnx.helper.tensor_dtype_to_np_dtype(shapes[names[1]][1])
            consts[node.output[0]] = np.asarray(consts[names[0]]).astype(target)
            origin[node.output[0]] = origin.get(names[0], names[0])
            folded.add(i)
            continue
        if not all(n in consts or n in seqs for n in names):
            continue
        size = _output_bytes(node, shapes, consts, np)
        if size is not None and used + size > budget:
            raise LoadError(
                f"{model.label}: node '{node.name or node.output[0]}' ({node.op_type}) would materialise "
                f"{human_bytes(size)} of constants, over the {human_bytes(budget)} limit (--max-model-size)"
            )
        values = _evaluate(node, consts, seqs, opsets, onnx)
        if values is None:
            continue
        if any(isinstance(v, (list, tuple)) for v in values):  # folded once nothing else reads it
            seqs.update({name: [np.asarray(a) for a in v] for name, v in zip(node.output, values) if name})
            used += sum(a.nbytes for name in node.output if name for a in seqs[name])
            continue
        for name, v in zip(node.output, values):
            if name:
                consts[name] = np.asarray(v)
                used += consts[name].nbytes
        if used > budget:
            raise LoadError(f"{model.label}: constants of more than {human_bytes(used)} exceed the "
                            f"{human_bytes(budget)} limit (--max-model-size)")
        if node.op_type in _SAME_VALUES and names:
            origin[node.output[0]] = origin.get(names[0], names[0])
        folded.add(i)
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, set()).add(i)
    outputs = {o.name for o in graph.output}
    for i, node in enumerate(graph.node):
        made = [name for name in node.output if name]
        if made and all(name in seqs and name not in outputs and readers.get(name, set()) <= folded for name in made):
            folded.add(i)
    return consts, folded, origin


def _shape_value(node, shape: tuple[int, ...], np) -> dict[str, Any]:
    if node.op_type == "Size":
        return {node.output[0]: np.array(math.prod(shape), dtype=np.int64)}
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return {node.output[0]: np.array(shape[slice(start, end if "end" in attrs else None)], dtype=np.int64)}


def _output_bytes(node, shapes: dict, consts: dict, np) -> int | None:
    """Bytes the node's outputs will take: from inferred shapes, else (for the ops that
    expand) from their constant inputs; None when small enough not to matter."""
    from onnx import helper

    total = 0
    for name in node.output:
        shape, elem = shapes.get(name, (None, 0))
        if shape is None:
            if node.op_type not in _EXPANDING:
                continue
            shape = _expanded_shape(node, consts, np)
            if shape is None:
                return None
        try:
            size = helper.tensor_dtype_to_np_dtype(elem).itemsize if elem else 8
        except (KeyError, ValueError, TypeError):
            size = 8
        total += math.prod(shape) * size
    return total


def _expanded_shape(node, consts: dict, np) -> tuple[int, ...] | None:
    ins = [consts.get(n) for n in node.input]
    try:
        if node.op_type == "ConstantOfShape":
            return tuple(int(d) for d in ins[0].reshape(-1))
        if node.op_type == "Expand":
            return tuple(np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1].reshape(-1))))
        if node.op_type == "Tile":
            return tuple(int(a) * int(b) for a, b in zip(ins[0].shape, ins[1].reshape(-1)))
        if node.op_type == "Range":
            start, limit, delta = (float(v) for v in ins[:3])
            return (max(int(math.ceil((limit - start) / delta)), 0),) if delta else None
    except (TypeError, ValueError, AttributeError, IndexError):
        return None
    return None


def _evaluate(node, consts: dict, seqs: dict, opsets, onnx) -> list | None:
    """One node through onnx's reference evaluator (``seqs``: the constant sequences);
    None when it cannot evaluate it."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs, feeds = [], {}
    for n in dict.fromkeys(x for x in node.input if x):
        if n in seqs:
            elem = helper.np_dtype_to_tensor_dtype(seqs[n][0].dtype) if seqs[n] else onnx.TensorProto.FLOAT
            inputs.append(helper.make_tensor_sequence_value_info(n, elem, None))
            feeds[n] = seqs[n]
            continue
        v = consts[n]
        inputs.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
        feeds[n] = v
    outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in node.output if n]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = min(m.ir_version, onnx.IR_VERSION)
    try:
        result = ReferenceEvaluator(m).run(None, feeds)
    except Exception:  # an op the reference evaluator lacks or rejects: keep it as a node
        return None
    return list(result)


def _folded_model(skel, consts: dict, folded_nodes: set[int], onnx):
    """The skeleton without its folded nodes; the constants that live nodes read become
    initializers (stubs for the large ones, whose values stay in ``consts``). Graph
    inputs that are constants are dropped."""
    from onnx import numpy_helper

    graph = skel.graph
    live = [n for i, n in enumerate(graph.node) if i not in folded_nodes]
    needed = {x for n in live for x in n.input if x} | {o.name for o in graph.output}
    out = onnx.ModelProto()
    out.ir_version = max(skel.ir_version, 4)  # from IR 4 on, initializers need not be graph inputs
    out.opset_import.extend(skel.opset_import)
    out.functions.extend(skel.functions)
    out.producer_name, out.producer_version = skel.producer_name, skel.producer_version
    g = out.graph
    g.name = graph.name
    g.node.extend(live)
    g.input.extend(i for i in graph.input if i.name not in consts)
    g.output.extend(graph.output)
    keep = {x for n in live for x in list(n.input) + list(n.output)}
    g.value_info.extend(v for v in graph.value_info if v.name in keep)
    for name in sorted(n for n in needed if n in consts):
        v = consts[name]
        small = numpy_helper.from_array(v, name) if v.size <= _SMALL else None
        _add_initializer(g, small, name, v.shape, onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
    return out


# --------------------------------------------------------------------------- names and places
def scope_of(node) -> tuple[str | None, str | None]:
    """(qualified module name, module class) the exporter recorded for ``node``.

    The dynamo exporter writes ``pkg.torch.onnx.name_scopes`` (``['', 'layer1',
    'layer1.0', 'layer1.0.conv1', 'conv2d']``, the last being the op) and
    ``pkg.torch.onnx.class_hierarchy``;
    the TorchScript exporter names nodes ``/layer1/layer1.0/conv1/Conv``, where each
    component extends the previous qualified name or is an attribute of it.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = _literal_list(meta.get("pkg.torch.onnx.name_scopes"))
    if scopes is not None:  # each entry is a full qualified name; the last is the op
        classes = _literal_list(meta.get("pkg.torch.onnx.class_hierarchy")) or []
        qual = scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
        cls = classes[-2] if len(classes) >= 2 and qual else None
        return qual, (cls.rsplit(".", 1)[-1] if cls and not cls.startswith("aten.") else None)
    name = node.name or ""
    if not name.startswith("/") or name.count("/") < 2:
        return None, None
    # a component is an attribute of the scope so far ("conv1" in "layer1.0"), or a
    # name relative to the same parent as the previous component ("layer1.0" after
    # "layer1", "ff.0" after "ff")
    qual, parent, last = "", "", None
    for part in name.strip("/").split("/")[:-1]:
        if last is not None and part.startswith(last + "."):
            qual = f"{parent}.{part}" if parent else part
        else:
            parent, qual = qual, f"{qual}.{part}" if qual else part
        last = part
    return qual or None, None


def torch_op_of(node) -> str | None:
    """The ATen op the dynamo exporter records a node came from
    (``aten.scaled_dot_product_attention``, without the overload), None when it recorded none."""
    meta = {p.key: p.value for p in node.metadata_props}
    classes = _literal_list(meta.get("pkg.torch.onnx.class_hierarchy"))
    if not classes or not classes[-1].startswith("aten."):
        return None
    return classes[-1].rsplit(".", 1)[0] if classes[-1].count(".") >= 2 else classes[-1]


def _literal_list(text: str | None) -> list | None:
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else None


_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+), in [^\n]*(?:\n(?P<code>[^\n]*))?')


def location_of(node) -> Location | None:
    """The user's line from the dynamo exporter's stack trace (innermost frame outside
    torch and gradaudit), when it recorded one."""
    meta = {p.key: p.value for p in node.metadata_props}
    trace = meta.get("pkg.torch.onnx.stack_trace")
    if not trace:
        return None
    frames = [
        (m.group("path"), int(m.group("line")), (m.group("code") or "").strip() or None)
        for m in _FRAME.finditer(trace)
    ]
    from gradaudit.frontends.fx import user_location

    return user_location(frames)


def dtype_name(onnx, elem: int) -> str:
    return torch_dtype_name(onnx, elem) or type_name(onnx, elem).lower() or f"type{elem}"


def tensor_meta(onnx, shapes: dict, name: str) -> TensorMeta | None:
    shape, elem = shapes.get(name, (None, 0))
    if shape is None or not elem:
        return None
    return TensorMeta(shape=shape, dtype=dtype_name(onnx, elem))


__all__ = ["capture", "OnnxGraph", "scope_of", "location_of", "torch_op_of", "Node", "Ref"]
