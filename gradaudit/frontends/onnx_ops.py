"""The ONNX op table: each ONNX op onto the IR ops the torch.fx frontend produces.

One small mapper per ONNX op type, registered with :func:`maps`. A mapper reads the
ONNX node through the :class:`Builder` (constants, inferred shapes, attributes) and
emits IR nodes with the argument conventions the propagation handlers read:

- parameterized ops become ``call_module`` nodes whose ``fn`` is the torch module with
  the file's weights (``Conv`` -> ``nn.Conv2d``, ``Gemm`` and ``MatMul`` (+ ``Add``) by a
  constant -> ``nn.Linear``, ``BatchNormalization`` -> ``nn.BatchNorm2d``,
  ``LayerNormalization``, ``GroupNormalization``, ``InstanceNormalization``, ``PRelu``,
  ``Gather`` from a constant table -> ``nn.Embedding``); the module is built on the meta
  device and given the constants as parameters, so no weight is copied or re-initialised;
- everything else becomes a ``call_function`` node of the equivalent torch function,
  with the torch signature's positional arguments (``F.softmax(x, dim)``,
  ``F.max_pool2d(x, kernel_size, ...)``, ``operator.add(a, 0.5)``): scalar constants
  become Python numbers, so ``x * 0.5 * (1 + erf(x / 1.414))`` fuses into one GELU exactly
  as the torch graph does.

A mapper raises :class:`Fallback` for a variant it does not map; the node then runs as
it is through onnxruntime (:class:`OrtNode`), and the propagation estimates it. A
pattern of several nodes that the torch captures see as one op (attention:
:mod:`gradaudit.frontends.onnx_attention`) is planned before the walk and mapped as one
(:class:`Fused`).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

from gradaudit.errors import CaptureError
from gradaudit.frontends.onnx import OnnxGraph, dtype_name, location_of, scope_of, tensor_meta
from gradaudit.ir import Node, Ref, TensorMeta

MAPPERS: dict[str, Callable[["Builder", Any], None]] = {}


@dataclass(frozen=True)
class Fused:
    """Nodes mapped as one by ``mapper(builder, node)`` at the pattern's mapping node:
    ``reads`` are the tensors it reads, ``inner`` the indices of the nodes it stands for,
    whose outputs nothing else reads (skipped). The pattern is checked whole before it is
    planned: its inner nodes are gone, so a ``mapper`` that falls back all the same is a
    :class:`~gradaudit.errors.CaptureError` naming the node."""

    mapper: Callable[["Builder", Any], None]
    reads: tuple[str, ...]
    inner: frozenset[int]


class Fallback(Exception):
    """This variant of the op has no mapping: run the node through onnxruntime."""


def maps(*op_types: str):
    def deco(fn):
        for t in op_types:
            if t in MAPPERS:
                raise ValueError(f"ONNX op {t} mapped twice")
            MAPPERS[t] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- the builder
class Builder:
    """Turns the folded ONNX graph into IR nodes; what every mapper reads and calls."""

    def __init__(self, model, proto, consts: dict, shapes: dict, onnx, origin: dict[str, str] | None = None) -> None:
        self.model = model
        self.origin = origin or {}
        self.proto = proto
        self.consts = consts
        self.shapes = shapes
        self.onnx = onnx
        self.opset = model.opset
        self.nodes: list[Node] = []
        self.produced: dict[str, str] = {}  # ONNX tensor -> IR node name
        self.param_nodes: dict[str, str] = {}
        self.tensor_of: dict[str, str] = {}
        self.params_of: dict[str, dict[str, str]] = {}
        self.names: set[str] = set()
        self.skip: set[int] = set()
        self.facts: dict[str, Any] = {"bn_inference": [], "bn_folded": []}
        self.consumers: dict[str, list[int]] = {}
        graph = proto.graph
        for i, n in enumerate(graph.node):
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.outputs = {o.name for o in graph.output}
        self.scope_counts: dict[str, int] = {}
        for n in graph.node:
            qual, _ = scope_of(n)
            if qual is not None:
                self.scope_counts[qual] = self.scope_counts.get(qual, 0) + 1
        self.index = 0
        self.current = None

    # -- building ------------------------------------------------------------------
    def build(self) -> OnnxGraph:
        graph = self.proto.graph
        fused = self._plan()
        inputs: list[str] = []
        for info in graph.input:
            name = self._unique(_identifier(info.name))
            self.nodes.append(Node(name=name, op="input", kind="placeholder", outputs=[self.meta(info.name)]))
            self.produced[info.name] = name
            inputs.append(name)
        for i, node in enumerate(graph.node):
            if i in self.skip:
                continue
            self.index, self.current = i, node
            plan = fused.get(i)
            for t in plan.reads if plan is not None else node.input:
                if t and t not in self.produced and t not in self.consts:
                    raise CaptureError(f"{self.model.label}: node '{node.name or node.op_type}' reads '{t}', "
                                       "which no node, input or initializer defines")
            mapper = MAPPERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if plan is not None:
                mapper = plan.mapper
            if node.op_type in _SAME_SHAPE and node.output and self.shape(node.output[0]) is None:
                # shape inference may stop at ops it lacks a function for (GroupNormalization-21)
                self.shapes[node.output[0]] = self.shapes.get(node.input[0], (None, 0))
            mark = self._mark()
            try:
                if mapper is None:
                    raise Fallback("no mapping")
                mapper(self, node)
                missing = [t for t in node.output if t and self.used(t) and t not in self.produced]
                if missing:
                    raise Fallback(f"output {missing[0]} not mapped")
            except Fallback as exc:
                self._rollback(mark)
                if plan is not None:  # its inner nodes are gone: nothing to fall back on
                    raise CaptureError(f"{self.model.label}: node '{node.name or node.op_type}': the pattern "
                                       f"recognised there could not be mapped ({exc})") from None
                self.unmapped(node)
        outs = [self.value(o.name) for o in graph.output]
        refs = [o for o in outs if isinstance(o, Ref)]
        self.nodes.append(Node(name=self._unique("output"), op="output", kind="output", args=(tuple(outs),)))
        return OnnxGraph(
            nodes=self.nodes,
            frontend="onnx",
            input_names=inputs,
            output_refs=[r.name for r in refs],
            tensor_of=self.tensor_of,
            params_of=self.params_of,
            consts=self.consts,
            shapes=self.shapes,
            facts=self.facts,
        )

    def _plan(self) -> dict[int, "Fused"]:
        """The patterns mapped as one node (:class:`Fused`), by the index of the node that
        maps them (attention: :func:`gradaudit.frontends.onnx_attention.find`); their
        inner nodes go to ``skip``."""
        from gradaudit.frontends import onnx_attention

        plan = onnx_attention.find(self)
        for f in plan.values():
            self.skip |= f.inner
        return plan

    def _mark(self) -> tuple:
        """Where the building stands: what :meth:`_rollback` returns to. Mappers only add
        entries (ONNX tensors are assigned once), so sizes say it all."""
        return (len(self.nodes), len(self.produced), len(self.tensor_of), len(self.params_of),
                len(self.param_nodes), set(self.skip))

    def _rollback(self, mark: tuple) -> None:
        """Undo what a mapper that gave up (:class:`Fallback`) had emitted."""
        n_nodes, *sizes, skip = mark
        for n in self.nodes[n_nodes:]:
            self.names.discard(n.name)
        del self.nodes[n_nodes:]
        for table, size in zip((self.produced, self.tensor_of, self.params_of, self.param_nodes), sizes):
            for key in list(table)[size:]:
                del table[key]
        self.skip = skip

    def _unique(self, name: str) -> str:
        base = name or "node"
        k, out = 1, base
        while out in self.names:
            k += 1
            out = f"{base}_{k}"
        self.names.add(out)
        return out

    # -- reading -------------------------------------------------------------------
    def attrs(self, node) -> dict[str, Any]:
        from onnx import helper, numpy_helper

        out = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [x.decode("utf-8", "replace") for x in v]
            elif isinstance(v, self.onnx.TensorProto):
                v = numpy_helper.to_array(v)
            out[a.name] = v
        return out

    def const(self, name: str):
        """The folded value of tensor ``name`` (numpy), or None for a run-time value."""
        return self.consts.get(name) if name else None

    def ints(self, name: str) -> list[int] | None:
        v = self.const(name)
        return None if v is None else [int(x) for x in v.reshape(-1)]

    def scalar(self, name: str):
        v = self.const(name)
        if v is None or v.size != 1:
            return None
        x = v.reshape(-1)[0].item()
        return float(x) if isinstance(x, float) else x

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name, (None, 0))[0]

    def meta(self, name: str) -> TensorMeta | None:
        meta = tensor_meta(self.onnx, self.shapes, name)
        if meta is None and name in self.consts:
            v = self.consts[name]
            return TensorMeta(shape=tuple(v.shape), dtype=str(v.dtype).replace("bool_", "bool"))
        return meta

    def known(self, name: str) -> TensorMeta:
        """The meta of tensor ``name``; :class:`Fallback` when its shape is not static."""
        meta = self.meta(name)
        if meta is None:
            raise Fallback(f"no static shape for {name}")
        return meta

    def is_float(self, name: str) -> bool:
        m = self.meta(name)
        return m is not None and m.is_float

    def used(self, name: str) -> bool:
        """Whether a live node (or the graph's output) reads tensor ``name``."""
        return name in self.outputs or any(i not in self.skip for i in self.consumers.get(name, ()))

    def ref(self, name: str) -> Ref:
        """A reference to tensor ``name``: its producer, or a ``param`` node for a constant."""
        if name in self.produced:
            return Ref(self.produced[name])
        if name in self.consts:
            return Ref(self._param_node(name))
        raise Fallback(f"tensor {name} undefined")

    def value(self, name: str):
        """A scalar constant as a Python number, any other tensor as a :class:`Ref`."""
        s = self.scalar(name) if name not in self.produced else None
        if s is not None and isinstance(s, (int, float)) and not isinstance(s, bool):
            return float(s)
        return self.ref(name)

    def tensor(self, name: str):
        """A constant as a torch tensor sharing the folded array's memory."""
        import numpy as np
        import torch

        v = self.const(name)
        if v is None:
            raise Fallback(f"{name} is not a constant")
        v = np.ascontiguousarray(v)
        if not v.flags.writeable:
            v = v.copy()
        return torch.from_numpy(v)

    def _param_node(self, name: str) -> str:
        if name in self.param_nodes:
            return self.param_nodes[name]
        t = self.tensor(name)
        node_name = self._unique(_identifier(name))
        self.nodes.append(
            Node(name=node_name, op="param", kind="get_attr", params={"value": t},
                 outputs=[TensorMeta(tuple(t.shape), str(t.dtype).replace("torch.", ""))],
                 module=name if _qualname_like(name) else None)
        )
        self.param_nodes[name] = node_name
        return node_name

    # -- emitting ------------------------------------------------------------------
    def emit(
        self,
        op: str,
        fn: Any,
        args: tuple,
        kwargs: dict | None = None,
        *,
        tensors: list[str] | None = None,
        metas: list[TensorMeta | None] | None = None,
        module: Any = None,
        params: dict[str, str] | None = None,
        suffix: str = "",
        at: int | None = None,
        layer: str | None = None,
    ) -> str:
        """One IR node for the current ONNX node (or the one at index ``at``, whose name,
        scope and source line it takes). ``tensors`` are the ONNX outputs it stands for
        (default: the first output; ``[]`` for an intermediate node, then ``metas`` gives
        its outputs); ``module`` a torch module makes it a ``call_module`` node whose
        ``params`` map its parameter names to ONNX tensors, named ``layer`` (default:
        after its weight, :meth:`_layer_name`)."""
        node = self.current if at is None else self.proto.graph.node[at]
        tensors = [node.output[0]] if tensors is None else tensors
        metas = metas if metas is not None else [self.meta(t) if t else None for t in tensors]
        base = node.name or f"{node.op_type}_{self.index if at is None else at}"
        name = self._unique(_identifier(base + suffix))
        qual, cls = scope_of(node)
        ir = Node(name=name, op=op, kind="call_function", args=args, kwargs=kwargs or {}, fn=fn,
                  outputs=metas, location=location_of(node))
        if len(metas) > 1:
            ir.structure = tuple(range(len(metas)))
        if module is not None:
            ir.kind = "call_module"
            ir.fn = module
            ir.module_type = type(module).__name__
            ir.params = dict(module.named_parameters())
            ir.module = layer or self._layer_name(node, params or {}, qual)
            self.params_of[name] = dict(params or {})
        elif qual is not None and self._leaf_call(node, qual, cls):
            ir.module, ir.module_type = qual, cls
        self.nodes.append(ir)
        if len(tensors) == 1 and len(metas) == 1:
            if tensors[0]:
                self.produced[tensors[0]] = name
                self.tensor_of[name] = tensors[0]
        else:
            for k, t in enumerate(tensors):
                if t and self.used(t):
                    self.getitem(name, k, t)
        return name

    def getitem(self, src: str, k: int, tensor: str) -> str:
        name = self._unique(_identifier(tensor))
        self.nodes.append(Node(name=name, op="getitem", kind="call_function", args=(Ref(src), k),
                               fn=operator.getitem, outputs=[self.meta(tensor)]))
        self.produced[tensor] = name
        self.tensor_of[name] = tensor
        return name

    def _layer_name(self, node, params: dict[str, str], qual: str | None) -> str:
        """A layer's qualified name: from its weight's name (``layer1.0.conv1.weight``),
        else the exporter's scope, else the weight's or the node's name."""
        weight = params.get("weight") or next(iter(params.values()), None)
        weight = self.origin.get(weight, weight)
        if weight:
            stem = re.sub(r"([./_:]?(weight|w|W|kernel)(_0)?|:0)$", "", weight)
            if stem and stem != weight and not stem.startswith("onnx::"):
                return stem
        if qual:
            return qual
        if weight and not weight.startswith(("onnx::", "val_", "_")):
            return weight
        return node.name or node.output[0]

    def _leaf_call(self, node, qual: str, cls: str | None) -> bool:
        """Whether a scope is a call of a parameterless torch module (``nn.ReLU``), so
        its node carries that module's name as torch.fx would: the dynamo exporter names
        the class; for the TorchScript exporter, a scope holding a single node."""
        if cls is not None:
            return cls in _TORCH_LEAVES
        meta = {p.key for p in node.metadata_props}
        return "pkg.torch.onnx.name_scopes" not in meta and self.scope_counts.get(qual) == 1

    def module(self, cls, *args, **kwargs):
        """``cls(*args, **kwargs)`` built on the meta device (no init, no memory); its
        buffers (BatchNorm's running statistics) become real zeros (variances: ones)."""
        import torch

        module = cls(*args, device="meta", **kwargs)
        for owner in module.modules():
            for name, buf in list(owner._buffers.items()):
                if buf is not None and buf.is_meta:
                    fill = torch.ones if name.endswith("var") else torch.zeros
                    owner._buffers[name] = fill(buf.shape, dtype=buf.dtype)
        return module

    def attach(self, module, **tensors) -> dict[str, str]:
        """Give ``module`` the constants as parameters; return {param: ONNX tensor}."""
        import torch.nn as nn

        names = {}
        for pname, (tname, value) in tensors.items():
            if value is None:
                setattr(module, pname, None)
                continue
            setattr(module, pname, nn.Parameter(value, requires_grad=False))
            if tname:
                names[pname] = tname
        return names

    def unmapped(self, node) -> None:
        """The node as it is, computed by onnxruntime (:class:`OrtNode`)."""
        args = tuple(self.ref(t) if t in self.produced else (self.tensor(t) if t else None) for t in node.input)
        fn = OrtNode(node, [(t, self.meta(t)) for t in node.input], list(self.proto.opset_import))
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        outs = list(node.output)
        self.current = node
        if len(outs) == 1:
            self.emit(op, fn, args)
        else:
            self.emit(op, fn, args, tensors=outs)


def _identifier(name: str) -> str:
    """A readable node name from an ONNX name (``/layer1/layer1.0/conv1/Conv`` stays)."""
    return name.strip() or "node"


def _qualname_like(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", name))


#: Parameterless torch modules the dynamo exporter names in ``class_hierarchy``.
_TORCH_LEAVES = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "LogSigmoid", "Tanhshrink", "Softshrink",
    "Hardshrink", "Threshold", "Softmax", "LogSoftmax", "Softmin", "Dropout", "Dropout1d", "Dropout2d",
    "Dropout3d", "AlphaDropout", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
    "Flatten", "Unflatten", "Identity", "Upsample", "PixelShuffle", "PixelUnshuffle",
})


#: Ops whose output has their first input's shape and type.
_SAME_SHAPE = frozenset({"GroupNormalization", "LayerNormalization", "RMSNormalization", "InstanceNormalization",
                         "BatchNormalization", "LRN", "Dropout", "Identity"})


# --------------------------------------------------------------------------- onnxruntime nodes
class OrtNode:
    """One ONNX node as a callable on torch tensors, run by onnxruntime.

    It has no autograd (``autograd = False``): the local Monte Carlo measures its gains
    by forward differences (:mod:`gradaudit.propagation.montecarlo`).
    """

    autograd = False

    def __init__(self, node, inputs: list[tuple[str, TensorMeta | None]], opsets: list) -> None:
        self.node = node
        self.inputs = inputs
        self.opsets = opsets
        self.session = None
        self.__name__ = f"onnxruntime:{node.op_type}"

    def _session(self):
        import onnx
        from onnx import helper

        from gradaudit.frontends.onnx_load import require_onnxruntime, session_options

        ort = require_onnxruntime()
        ins = []
        for name, meta in dict(self.inputs).items():
            if not name:
                continue
            if meta is None:
                raise RuntimeError(f"input '{name}' has no static shape")
            ins.append(helper.make_tensor_value_info(name, _onnx_type(meta.dtype), meta.shape))
        outs = [helper.make_value_info(o, onnx.TypeProto()) for o in self.node.output if o]
        graph = helper.make_graph([self.node], "node", ins, outs)
        model = helper.make_model(graph, opset_imports=self.opsets)
        model.ir_version = min(model.ir_version, onnx.IR_VERSION)
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        return self.session

    def __call__(self, *args):
        import torch

        session = self.session or self._session()
        feeds = {}
        for (name, meta), a in zip(self.inputs, args):
            if not name or a is None:
                continue
            t = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            if meta is not None:
                t = t.to(getattr(torch, meta.dtype))
            feeds[name] = t.contiguous().numpy()
        outs = session.run(None, feeds)
        tensors = tuple(torch.from_numpy(o.copy()) if hasattr(o, "dtype") else o for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors


def _onnx_type(torch_name: str) -> int:
    from onnx import TensorProto

    table = {
        "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "float16": TensorProto.FLOAT16,
        "bfloat16": TensorProto.BFLOAT16, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
        "int16": TensorProto.INT16, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
    }
    return table.get(torch_name, TensorProto.FLOAT)


# --------------------------------------------------------------------------- elementwise
def _torch_unary():
    import torch
    import torch.nn.functional as F

    return {
        "Relu": ("relu", torch.relu), "Sigmoid": ("sigmoid", torch.sigmoid), "Tanh": ("tanh", torch.tanh),
        "Exp": ("exp", torch.exp), "Log": ("log", torch.log), "Sqrt": ("sqrt", torch.sqrt),
        "Reciprocal": ("reciprocal", torch.reciprocal), "Neg": ("neg", torch.neg), "Abs": ("abs", torch.abs),
        "Erf": ("erf", torch.erf), "Sin": ("sin", torch.sin), "Cos": ("cos", torch.cos), "Tan": ("tan", torch.tan),
        "Sinh": ("sinh", torch.sinh), "Cosh": ("cosh", torch.cosh), "Atan": ("atan", torch.atan),
        "Asinh": ("asinh", torch.asinh), "Asin": ("asin", torch.asin), "Acos": ("acos", torch.acos),
        "Acosh": ("acosh", torch.acosh), "Atanh": ("atanh", torch.atanh), "Sign": ("sign", torch.sign),
        "Floor": ("floor", torch.floor), "Ceil": ("ceil", torch.ceil), "Round": ("round", torch.round),
        "Softsign": ("softsign", F.softsign), "Softplus": ("softplus", F.softplus),
        "HardSwish": ("hardswish", F.hardswish), "Mish": ("mish", F.mish), "Identity": ("identity", _identity),
    }


def _identity(x):
    return x


@maps("Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Erf", "Sin", "Cos", "Tan",
      "Sinh", "Cosh", "Atan", "Asinh", "Asin", "Acos", "Acosh", "Atanh", "Sign", "Floor", "Ceil", "Round",
      "Softsign", "Softplus", "HardSwish", "Mish", "Identity")
def unary(b: Builder, node) -> None:
    op, fn = _torch_unary()[node.op_type]
    b.emit(op, fn, (b.ref(node.input[0]),))


@maps("LeakyRelu", "Elu", "Celu", "Selu", "ThresholdedRelu", "HardSigmoid", "Shrink", "Gelu", "Swish")
def parametric(b: Builder, node) -> None:
    """Activations with attributes, as their torch functional (or the ONNX formula)."""
    import torch
    import torch.nn.functional as F

    a = b.attrs(node)
    x = b.ref(node.input[0])
    t = node.op_type
    if t == "LeakyRelu":
        b.emit("leaky_relu", F.leaky_relu, (x, float(a.get("alpha", 0.01))))
    elif t == "Elu":
        b.emit("elu", F.elu, (x, float(a.get("alpha", 1.0))))
    elif t == "Celu":
        b.emit("celu", F.celu, (x, float(a.get("alpha", 1.0))))
    elif t == "Selu":
        alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), float(a.get("gamma", 1.05070102214813232421875))
        if math.isclose(alpha, 1.6732632, rel_tol=1e-6) and math.isclose(gamma, 1.0507010, rel_tol=1e-6):
            b.emit("selu", F.selu, (x,))
        else:
            b.emit("selu", lambda v: gamma * torch.where(v > 0, v, alpha * torch.expm1(v)), (x,))
    elif t == "ThresholdedRelu":
        b.emit("threshold", F.threshold, (x, float(a.get("alpha", 1.0)), 0.0))
    elif t == "HardSigmoid":
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        b.emit("hardsigmoid", lambda v: torch.clamp(alpha * v + beta, 0.0, 1.0), (x,))
    elif t == "Shrink":
        bias, lambd = float(a.get("bias", 0.0)), float(a.get("lambd", 0.5))
        if bias == lambd:
            b.emit("softshrink", F.softshrink, (x, lambd))
        elif bias == 0:
            b.emit("hardshrink", F.hardshrink, (x, lambd))
        else:
            b.emit("shrink", lambda v: torch.where(v < -lambd, v + bias, torch.where(v > lambd, v - bias, 0 * v)), (x,))
    elif t == "Swish":  # opset 24: x sigmoid(alpha x)
        alpha = float(a.get("alpha", 1.0))
        if alpha == 1.0:
            b.emit("silu", F.silu, (x,))
        else:
            b.emit("swish", lambda v: v * torch.sigmoid(alpha * v), (x,))
    else:  # Gelu (opset 20)
        b.emit("gelu", F.gelu, (x,), {"approximate": a.get("approximate", "none")})


@maps("Clip")
def clip(b: Builder, node) -> None:
    import torch
    import torch.nn.functional as F

    a = b.attrs(node)
    if b.opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = b.scalar(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = b.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (len(node.input) > 1 and node.input[1] and lo is None) or (len(node.input) > 2 and node.input[2] and hi is None):
            raise Fallback("computed clip bounds")
    x = b.ref(node.input[0])
    if lo == 0 and hi == 6:
        b.emit("relu6", F.relu6, (x,))
    elif lo == -1 and hi == 1:
        b.emit("hardtanh", F.hardtanh, (x,))
    elif lo == 0 and hi is None:
        b.emit("relu", torch.relu, (x,))
    else:
        b.emit("clamp", torch.clamp, (x, lo, hi))


_BINARY = {"Add": ("add", operator.add), "Sub": ("sub", operator.sub), "Mul": ("mul", operator.mul),
           "Div": ("div", operator.truediv)}


@maps("Add", "Sub", "Mul", "Div")
def binary(b: Builder, node) -> None:
    op, fn = _BINARY[node.op_type]
    if not b.is_float(node.output[0]):
        raise Fallback("integer arithmetic")
    lhs, rhs = b.value(node.input[0]), b.value(node.input[1])
    if not isinstance(lhs, Ref) and not isinstance(rhs, Ref):
        raise Fallback("constant arithmetic")
    b.emit(op, fn, (lhs, rhs))


@maps("Pow")
def power(b: Builder, node) -> None:
    import torch

    p = b.scalar(node.input[1])
    if p is None or node.input[0] not in b.produced:
        raise Fallback("computed exponent")
    b.emit("pow", torch.pow, (b.ref(node.input[0]), float(p)))


@maps("Sum", "Mean", "Max", "Min")
def variadic(b: Builder, node) -> None:
    """``Sum`` of n inputs as n - 1 adds (``Mean`` then a scale); ``Max``/``Min`` pairwise."""
    import torch

    if not b.is_float(node.output[0]):
        raise Fallback("integer")
    names = [t for t in node.input if t]
    if len(names) == 1:
        b.emit("identity", _identity, (b.ref(names[0]),))
        return
    op, fn = {"Sum": ("add", operator.add), "Mean": ("add", operator.add), "Max": ("maximum", torch.maximum),
              "Min": ("minimum", torch.minimum)}[node.op_type]
    meta = b.meta(node.output[0])
    acc = b.value(names[0])
    last = len(names) - 2
    for k, t in enumerate(names[1:]):
        final = k == last and node.op_type != "Mean"
        name = b.emit(op, fn, (acc, b.value(t)), tensors=None if final else [], metas=None if final else [meta],
                      suffix="" if final else f"/{op}{k}")
        acc = Ref(name)
    if node.op_type == "Mean":
        b.emit("mul", operator.mul, (acc, 1.0 / len(names)))


# --------------------------------------------------------------------------- dense layers
def _linear_module(b: Builder, weight, bias):
    import torch.nn as nn

    out_f, in_f = weight.shape
    return b.module(nn.Linear, in_f, out_f, bias=bias is not None)


@maps("MatMul")
def matmul(b: Builder, node) -> None:
    """``x @ W`` with a constant 2-d W is ``nn.Linear`` (weight W^T); an ``Add`` of a
    constant vector right after it, read by nothing else, is its bias."""
    import torch

    a, w = node.input[0], node.input[1]
    wv = b.const(w)
    if wv is None or a in b.consts or wv.ndim != 2 or not b.is_float(node.output[0]):
        if a in b.consts or w in b.consts:
            raise Fallback("matmul by a constant that is not a weight matrix")
        b.emit("matmul", torch.matmul, (b.ref(a), b.ref(w)))
        return
    weight = b.tensor(w).t()
    bias, bias_name, out = None, None, node.output[0]
    users = b.consumers.get(out, [])
    if len(users) == 1 and out not in b.outputs:
        add = b.proto.graph.node[users[0]]
        if add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            other = add.input[1] if add.input[0] == out else add.input[0]
            bv = b.const(other)
            if bv is not None and bv.size == weight.shape[0] and (bv.ndim == 1 or bv.shape[-1] == bv.size):
                bias, bias_name, out = b.tensor(other).reshape(-1), other, add.output[0]
                b.skip.add(users[0])
    module = _linear_module(b, weight, bias)
    params = b.attach(module, weight=(w, weight), bias=(bias_name, bias))
    b.emit("linear", module, (b.ref(a),), tensors=[out], module=module, params=params)


@maps("Gemm")
def gemm(b: Builder, node) -> None:
    """alpha * A' B' + beta * C with a constant B: ``nn.Linear`` (transA as a transpose)."""
    import torch

    x = b.ref(node.input[0])
    if b.attrs(node).get("transA", 0):
        in_meta = b.meta(node.input[0])
        flipped = TensorMeta(tuple(reversed(in_meta.shape)), in_meta.dtype) if in_meta else None
        x = Ref(b.emit("permute", torch.permute, (x, (1, 0)), tensors=[], metas=[flipped], suffix="/transA"))
    weight, bias, bias_name = gemm_parts(b, node)
    module = _linear_module(b, weight, bias)
    params = b.attach(module, weight=(node.input[1], weight), bias=(bias_name, bias))
    b.emit("linear", module, (x,), module=module, params=params)


def gemm_parts(b: Builder, node):
    """A ``Gemm``'s weight as ``nn.Linear`` stores it (alpha folded in) and its bias (beta
    folded in): (weight, bias or None, bias tensor name or None); :class:`Fallback` for a
    computed B or C."""
    a = b.attrs(node)
    w = node.input[1]
    if b.const(w) is None or b.const(w).ndim != 2 or node.input[0] in b.consts:
        raise Fallback("Gemm with a computed B")
    weight = b.tensor(w)
    if not a.get("transB", 0):
        weight = weight.t()
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        weight = weight * alpha
    bias, bias_name = None, None
    if len(node.input) > 2 and node.input[2]:
        cv = b.const(node.input[2])
        if cv is None or cv.size not in (1, weight.shape[0]):
            raise Fallback("Gemm with a computed or 2-d C")
        bias = b.tensor(node.input[2]).reshape(-1).expand(weight.shape[0]) * beta
        bias_name = node.input[2]
    return weight, bias, bias_name


def _pads(b: Builder, node, a: dict, nd: int, kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """ONNX pads [begin..., end...] with ``auto_pad`` resolved from the input shape."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "") or auto is None:
        return list(a.get("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return [0] * (2 * nd)
    shape = b.shape(node.input[0])
    if shape is None:
        raise Fallback("auto_pad without a static input shape")
    begins, ends = [], []
    for d in range(nd):
        size = shape[2 + d]
        out = -(-size // strides[d])
        total = max((out - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - size, 0)
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begins.append(lo)
        ends.append(total - lo)
    return begins + ends


def _padded_input(b: Builder, node, pads: list[int], nd: int, value: float = 0.0):
    """The input, explicitly padded when the padding is asymmetric; (ref, symmetric pads)."""
    import torch.nn.functional as F

    x = b.ref(node.input[0])
    begins, ends = pads[:nd], pads[nd:]
    if begins == ends:
        return x, tuple(begins)
    torch_pad = []
    for d in reversed(range(nd)):
        torch_pad += [begins[d], ends[d]]
    meta = b.meta(node.input[0])
    padded = None
    if meta is not None:
        padded = TensorMeta(meta.shape[:2] + tuple(s + lo + hi for s, lo, hi in zip(meta.shape[2:], begins, ends)),
                            meta.dtype)
    name = b.emit("pad", F.pad, (x, tuple(torch_pad), "constant", value), tensors=[], metas=[padded], suffix="/pad")
    return Ref(name), (0,) * nd


def _kernel(b: Builder, node):
    """A ``Conv``/``ConvTranspose``'s constant kernel and bias, and its attributes:
    (weight name, bias name or None, attributes, spatial dims, kernel, strides,
    dilations, groups); :class:`Fallback` for a computed kernel or bias."""
    w = node.input[1]
    wv = b.const(w)
    if wv is None or node.input[0] in b.consts or not 3 <= wv.ndim <= 5:
        raise Fallback("computed kernel")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias and b.const(bias) is None:
        raise Fallback("computed bias")
    a = b.attrs(node)
    nd = wv.ndim - 2
    kernel = list(a.get("kernel_shape", wv.shape[2:]))
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    return w, bias, a, nd, kernel, strides, dil, int(a.get("group", 1))


def _emit_kernel(b: Builder, op: str, module, x, weight: str, bias: str | None) -> str:
    params = b.attach(module, weight=(weight, b.tensor(weight)), bias=(bias, b.tensor(bias) if bias else None))
    return b.emit(op, module, (x,), module=module, params=params)


@maps("Conv")
def conv(b: Builder, node) -> None:
    """``Conv`` with a constant kernel: ``nn.Conv1d/2d/3d`` (asymmetric padding as an
    explicit zero pad before it)."""
    import torch.nn as nn

    w, bias, a, nd, kernel, strides, dil, groups = _kernel(b, node)
    x, padding = _padded_input(b, node, _pads(b, node, a, nd, kernel, strides, dil), nd)
    shape = b.const(w).shape
    module = b.module((nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1], shape[1] * groups, shape[0], tuple(kernel),
                      stride=tuple(strides), padding=padding, dilation=tuple(dil), groups=groups,
                      bias=bias is not None)
    name = _emit_kernel(b, "conv", module, x, w, bias)
    evidence = _folded_norm(b, node, w)
    if evidence:
        b.facts["bn_folded"].append((name, evidence))


def _folded_norm(b: Builder, node, weight: str) -> str | None:
    """Why this convolution looks like it absorbed a BatchNorm (an inference export)."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "FuseBatchNorm" in meta.get("pkg.onnxscript.rewriter.rule_name", ""):
        return "the exporter's optimizer fused a BatchNorm into it (FuseBatchNormIntoConv)"
    if "BatchNorm" in meta.get("pkg.torch.onnx.class_hierarchy", ""):
        return "the exporter records it as a BatchNorm module's op"
    source = b.origin.get(weight, weight)
    if source.startswith("onnx::") and any(_qualname_like(t) and t.endswith(".weight") for t in b.consts):
        return f"its weight '{source}' was computed at export (constant folding) while other weights keep their names"
    return None


@maps("ConvTranspose")
def conv_transpose(b: Builder, node) -> None:
    """``nn.ConvTranspose1d/2d/3d`` (the begin pads; the inferred shapes carry the rest)."""
    import torch.nn as nn

    w, bias, a, nd, kernel, strides, dil, groups = _kernel(b, node)
    pads = list(a.get("pads", [0] * (2 * nd)))
    shape = b.const(w).shape
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
    module = b.module(cls, shape[0], shape[1] * groups, tuple(kernel), stride=tuple(strides),
                      padding=tuple(pads[:nd]), output_padding=tuple(a.get("output_padding", [0] * nd)),
                      groups=groups, dilation=tuple(dil), bias=bias is not None)
    _emit_kernel(b, "conv_transpose", module, b.ref(node.input[0]), w, bias)


# --------------------------------------------------------------------------- normalization
def _affine_consts(b: Builder, node, first: int = 1) -> tuple[Any, Any]:
    names = [node.input[k] if len(node.input) > k and node.input[k] else None for k in (first, first + 1)]
    for n in names:
        if n is not None and b.const(n) is None:
            raise Fallback("computed scale or bias")
    return tuple(b.tensor(n) if n else None for n in names)


@maps("BatchNormalization")
def batch_norm(b: Builder, node) -> None:
    """``nn.BatchNorm1d/2d/3d``. Audited as training runs it (batch statistics), whatever
    mode the file was exported in; inference-mode nodes are noted for the info rule."""
    import torch.nn as nn

    a = b.attrs(node)
    if b.opset < 9 and a.get("spatial", 1) == 0:
        raise Fallback("per-activation batch norm")
    meta = b.meta(node.input[0])
    if meta is None or len(meta.shape) < 2 or len(meta.shape) > 5:
        raise Fallback("batch norm input rank")
    scale, bias = _affine_consts(b, node)
    training = bool(a.get("training_mode", 0)) if b.opset >= 14 else (b.opset < 7 and not a.get("is_test", 0))
    if not training:
        b.facts["bn_inference"].append(node.name or node.output[0])
    c = meta.shape[1]
    cls = nn.BatchNorm1d if len(meta.shape) <= 3 else (nn.BatchNorm2d if len(meta.shape) == 4 else nn.BatchNorm3d)
    module = b.module(cls, c, eps=float(a.get("epsilon", 1e-5)), momentum=1.0 - float(a.get("momentum", 0.9)))
    for buffer, k in (("running_mean", 3), ("running_var", 4)):
        if len(node.input) > k and b.const(node.input[k]) is not None:
            setattr(module, buffer, b.tensor(node.input[k]).reshape(-1).clone())
    params = b.attach(module, weight=(node.input[1], scale.reshape(-1)), bias=(node.input[2], bias.reshape(-1)))
    b.emit("batch_norm", module, (b.ref(node.input[0]),), tensors=[node.output[0]], metas=[b.meta(node.output[0])],
           module=module, params=params)


@maps("InstanceNormalization")
def instance_norm(b: Builder, node) -> None:
    import torch.nn as nn

    meta = b.meta(node.input[0])
    if meta is None or not 3 <= len(meta.shape) <= 5:
        raise Fallback("instance norm input rank")
    scale, bias = _affine_consts(b, node)
    cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[len(meta.shape) - 3]
    module = b.module(cls, meta.shape[1], eps=float(b.attrs(node).get("epsilon", 1e-5)), affine=True)
    params = b.attach(module, weight=(node.input[1], scale.reshape(-1)), bias=(node.input[2], bias.reshape(-1)))
    b.emit("instance_norm", module, (b.ref(node.input[0]),), module=module, params=params)


@maps("LayerNormalization", "RMSNormalization")
def layer_norm(b: Builder, node) -> None:
    import torch.nn as nn

    a = b.attrs(node)
    meta = b.known(node.input[0])
    axis = int(a.get("axis", -1)) % len(meta.shape)
    shape = tuple(meta.shape[axis:])
    scale, bias = _affine_consts(b, node)
    eps = float(a.get("epsilon", 1e-5))
    if node.op_type == "RMSNormalization":
        module = b.module(nn.RMSNorm, shape, eps=eps)
        params = b.attach(module, weight=(node.input[1], scale.expand(shape)))
        op = "rms_norm"
    else:
        module = b.module(nn.LayerNorm, shape, eps=eps, bias=bias is not None)
        params = b.attach(module, weight=(node.input[1], scale.expand(shape)),
                          bias=(node.input[2] if bias is not None else None, None if bias is None else bias.expand(shape)))
        op = "layer_norm"
    b.emit(op, module, (b.ref(node.input[0]),), tensors=[node.output[0]], metas=[b.meta(node.output[0])],
           module=module, params=params)


@maps("GroupNormalization")
def group_norm(b: Builder, node) -> None:
    """``nn.GroupNorm``; opset 18 stores scale and bias per group, opset 21 per channel."""
    import torch.nn as nn

    a = b.attrs(node)
    meta = b.meta(node.input[0])
    if meta is None or len(meta.shape) < 3:
        raise Fallback("no input shape")
    groups, c = int(a["num_groups"]), meta.shape[1]
    scale, bias = _affine_consts(b, node)
    if scale.numel() == groups and groups != c:
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    module = b.module(nn.GroupNorm, groups, c, eps=float(a.get("epsilon", 1e-5)))
    params = b.attach(module, weight=(node.input[1], scale), bias=(node.input[2], bias))
    b.emit("group_norm", module, (b.ref(node.input[0]),), module=module, params=params)


@maps("LRN")
def lrn(b: Builder, node) -> None:
    """Local response normalization: ``F.local_response_norm`` computes the same
    x / (bias + alpha / size * sum of squares)^beta (no handler: estimated)."""
    import torch.nn.functional as F

    a = b.attrs(node)
    b.emit("local_response_norm", F.local_response_norm,
           (b.ref(node.input[0]), int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
            float(a.get("bias", 1.0))))


@maps("PRelu")
def prelu(b: Builder, node) -> None:
    import torch.nn as nn

    slope = b.const(node.input[1])
    meta = b.meta(node.input[0])
    if slope is None or meta is None:
        raise Fallback("computed slope")
    n = slope.size
    if n != 1 and not (len(meta.shape) >= 2 and n == meta.shape[1] and slope.shape[0] in (n, 1)):
        raise Fallback("slope not per channel")
    module = b.module(nn.PReLU, num_parameters=n)
    params = b.attach(module, weight=(node.input[1], b.tensor(node.input[1]).reshape(-1)))
    b.emit("prelu", module, (b.ref(node.input[0]),), module=module, params=params)


@maps("Gather")
def gather(b: Builder, node) -> None:
    """A row lookup in a constant 2-d table is ``nn.Embedding``; constant indices into a
    run-time value are indexing (``x[:, 3]``)."""
    import torch.nn as nn

    a = b.attrs(node)
    axis = int(a.get("axis", 0))
    data, idx = node.input[0], node.input[1]
    table = b.const(data)
    if table is not None and idx not in b.consts and axis == 0 and table.ndim == 2 and table.dtype.kind == "f":
        module = b.module(nn.Embedding, table.shape[0], table.shape[1])
        params = b.attach(module, weight=(data, b.tensor(data)))
        b.emit("embedding", module, (b.ref(idx),), module=module, params=params)
        return
    iv = b.const(idx)
    if iv is None or data in b.consts or iv.ndim > 1:
        raise Fallback("gather with computed indices")
    meta = b.meta(data)
    if meta is None:
        raise Fallback("no shape")
    axis %= len(meta.shape)
    index = int(iv) if iv.ndim == 0 else [int(v) for v in iv]
    b.emit("getitem", operator.getitem, (b.ref(data), (slice(None),) * axis + (index,)))


# --------------------------------------------------------------------------- layout
def _out_shape(b: Builder, node) -> tuple[int, ...]:
    shape = b.shape(node.output[0])
    if shape is None:
        raise Fallback("no static output shape")
    return shape


@maps("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b: Builder, node) -> None:
    import torch

    op = {"Reshape": "reshape", "Flatten": "flatten", "Squeeze": "squeeze", "Unsqueeze": "unsqueeze"}[node.op_type]
    b.emit(op, torch.reshape, (b.ref(node.input[0]), _out_shape(b, node)))


@maps("Transpose")
def transpose(b: Builder, node) -> None:
    import torch

    meta = b.meta(node.input[0])
    perm = b.attrs(node).get("perm")
    if perm is None:
        if meta is None:
            raise Fallback("no shape")
        perm = list(reversed(range(len(meta.shape))))
    b.emit("permute", torch.permute, (b.ref(node.input[0]), tuple(int(p) for p in perm)))


@maps("Expand")
def expand(b: Builder, node) -> None:
    import torch

    b.emit("expand", torch.broadcast_to, (b.ref(node.input[0]), _out_shape(b, node)))


@maps("Tile")
def tile(b: Builder, node) -> None:
    import torch

    reps = b.ints(node.input[1])
    if reps is None:
        raise Fallback("computed repeats")
    b.emit("tile", torch.tile, (b.ref(node.input[0]), tuple(reps)))


@maps("Concat")
def concat(b: Builder, node) -> None:
    import torch

    if not b.is_float(node.output[0]):
        raise Fallback("integer concat")
    parts = [b.ref(t) for t in node.input if t]
    b.emit("cat", torch.cat, (parts, int(b.attrs(node)["axis"])))


@maps("Split")
def split(b: Builder, node) -> None:
    import torch

    a = b.attrs(node)
    meta = b.known(node.input[0])
    axis = int(a.get("axis", 0)) % len(meta.shape)
    sizes = []
    for t in node.output:
        shape = b.shape(t)
        if shape is None:
            raise Fallback("no output shape")
        sizes.append(shape[axis])
    b.emit("split", torch.split, (b.ref(node.input[0]), sizes, axis), tensors=list(node.output))


@maps("Slice")
def slice_(b: Builder, node) -> None:
    """Constant slicing, as ``x[a:b:c, ...]`` (``getitem``)."""
    meta = b.known(node.input[0])
    if b.opset < 10:
        a = b.attrs(node)
        starts, ends, axes, steps = a.get("starts"), a.get("ends"), a.get("axes"), None
    else:
        get = [b.ints(node.input[k]) if len(node.input) > k and node.input[k] else None for k in range(1, 5)]
        starts, ends, axes, steps = get
        if starts is None or ends is None or any(
            len(node.input) > k and node.input[k] and get[k - 1] is None for k in (3, 4)
        ):
            raise Fallback("computed slice bounds")
    nd = len(meta.shape)
    axes = [int(x) % nd for x in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * nd
    big = 2**62
    for ax, s, e, st in zip(axes, starts, ends, steps):
        index[ax] = slice(max(min(s, big), -big), max(min(e, big), -big), st)
    if any(ix.step is not None and ix.step < 0 for ix in index):
        raise Fallback("negative steps")
    b.emit("getitem", operator.getitem, (b.ref(node.input[0]), tuple(index)))


@maps("Pad")
def pad(b: Builder, node) -> None:
    import torch.nn.functional as F

    a = b.attrs(node)
    meta = b.known(node.input[0])
    nd = len(meta.shape)
    if b.opset < 11:
        pads, value = list(a.get("pads", a.get("paddings", []))), float(a.get("value", 0.0))
        axes = list(range(nd))
    else:
        pads = b.ints(node.input[1]) if len(node.input) > 1 else None
        value = b.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        axes = b.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(nd))
        if pads is None or value is None or axes is None:
            raise Fallback("computed pads")
    axes = [x % nd for x in axes]
    k = len(axes)
    by_axis = {ax: (pads[i], pads[i + k]) for i, ax in enumerate(axes)}
    lowest = min((ax for ax, p in by_axis.items() if p != (0, 0)), default=nd - 1)
    torch_pad: list[int] = []
    for ax in range(nd - 1, lowest - 1, -1):  # F.pad lists the last dimension first
        torch_pad += list(by_axis.get(ax, (0, 0)))
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        a.get("mode", "constant"))
    if mode is None:
        raise Fallback("pad mode")
    b.emit("pad", F.pad, (b.ref(node.input[0]), tuple(torch_pad), mode, float(value)))


@maps("Cast", "CastLike")
def cast(b: Builder, node) -> None:
    import torch

    meta = b.meta(node.output[0])
    if meta is None:
        raise Fallback("no type")
    dtype = getattr(torch, meta.dtype, None)
    if dtype is None:
        raise Fallback("dtype")
    b.emit("to", lambda x: x.to(dtype), (b.ref(node.input[0]),))


@maps("DepthToSpace", "SpaceToDepth")
def depth_space(b: Builder, node) -> None:
    """Pixel (un)shuffles. ``DepthToSpace`` in CRD mode is ``F.pixel_shuffle``; DCR mode
    and ``SpaceToDepth`` order the block before the channels."""
    import torch.nn.functional as F

    a = b.attrs(node)
    k = int(a["blocksize"])
    x = b.ref(node.input[0])
    if node.op_type == "DepthToSpace" and a.get("mode", "DCR") == "CRD":
        b.emit("pixel_shuffle", F.pixel_shuffle, (x, k))
    elif node.op_type == "DepthToSpace":
        def dcr(v):
            n, c, h, w = v.shape
            return v.reshape(n, k, k, c // (k * k), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // (k * k), h * k, w * k)

        b.emit("pixel_shuffle", dcr, (x,))
    else:
        def space_to_depth(v):
            n, c, h, w = v.shape
            return v.reshape(n, c, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4).reshape(n, c * k * k, h // k, w // k)

        b.emit("pixel_unshuffle", space_to_depth, (x,))


# --------------------------------------------------------------------------- pooling, softmax, reductions
def _pool_args(b: Builder, node, nd: int):
    a = b.attrs(node)
    kernel = list(a["kernel_shape"])
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = _pads(b, node, a, nd, kernel, strides, dil)
    # asymmetric padding (older Caffe2 exports) changes only the output size, which the
    # inferred shapes carry; the function keeps what torch can express
    padding = tuple(min(p, k // 2) for p, k in zip(pads[:nd], kernel))
    return a, tuple(kernel), tuple(strides), padding, tuple(dil)


@maps("MaxPool")
def max_pool(b: Builder, node) -> None:
    import torch.nn.functional as F

    meta = b.meta(node.input[0])
    if meta is None or not 3 <= len(meta.shape) <= 5 or (len(node.output) > 1 and b.used(node.output[1])):
        raise Fallback("max pool variant")
    nd = len(meta.shape) - 2
    a, kernel, stride, padding, dil = _pool_args(b, node, nd)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    b.emit("max_pool", fn, (b.ref(node.input[0]), kernel, stride, padding, dil, bool(a.get("ceil_mode", 0))),
           tensors=[node.output[0]], metas=[b.meta(node.output[0])])


@maps("AveragePool")
def avg_pool(b: Builder, node) -> None:
    import torch.nn.functional as F

    meta = b.meta(node.input[0])
    if meta is None or not 3 <= len(meta.shape) <= 5:
        raise Fallback("avg pool variant")
    nd = len(meta.shape) - 2
    a, kernel, stride, padding, _ = _pool_args(b, node, nd)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    b.emit("avg_pool", fn, (b.ref(node.input[0]), kernel, stride, padding, bool(a.get("ceil_mode", 0)),
                            bool(a.get("count_include_pad", 0))))


@maps("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b: Builder, node) -> None:
    import torch.nn.functional as F

    meta = b.meta(node.input[0])
    if meta is None or not 3 <= len(meta.shape) <= 5:
        raise Fallback("rank")
    nd = len(meta.shape) - 2
    if node.op_type == "GlobalAveragePool":
        fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1]
        b.emit("adaptive_avg_pool", fn, (b.ref(node.input[0]), 1))
    else:
        fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[nd - 1]
        b.emit("adaptive_max_pool", fn, (b.ref(node.input[0]), 1))


@maps("Softmax", "LogSoftmax")
def softmax(b: Builder, node) -> None:
    """Before opset 13, ``axis`` flattened every dimension from it onward; that is a
    softmax over one dimension only when the later ones are 1."""
    import torch.nn.functional as F

    meta = b.known(node.input[0])
    nd = len(meta.shape)
    axis = int(b.attrs(node).get("axis", -1 if b.opset >= 13 else 1)) % nd
    if b.opset < 13 and math.prod(meta.shape[axis + 1:]) != 1:
        raise Fallback("softmax over flattened dimensions")
    op, fn = ("softmax", F.softmax) if node.op_type == "Softmax" else ("log_softmax", F.log_softmax)
    b.emit(op, fn, (b.ref(node.input[0]), axis))


@maps("ReduceMean", "ReduceSum")
def reduce(b: Builder, node) -> None:
    import torch

    a = b.attrs(node)
    meta = b.known(node.input[0])
    nd = len(meta.shape)
    axes_from_input = (node.op_type == "ReduceSum" and b.opset >= 13) or b.opset >= 18
    if axes_from_input:
        axes = b.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.input) > 1 and node.input[1] and axes is None:
            raise Fallback("computed axes")
    else:
        axes = a.get("axes")
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            b.emit("identity", _identity, (b.ref(node.input[0]),))
            return
        axes = list(range(nd))
    op, fn = ("mean", torch.mean) if node.op_type == "ReduceMean" else ("sum", torch.sum)
    b.emit(op, fn, (b.ref(node.input[0]), tuple(int(x) % nd for x in axes), bool(a.get("keepdims", 1))))


@maps("Dropout")
def dropout(b: Builder, node) -> None:
    """Audited as in training (active, with its ratio), like batch norm."""
    import torch.nn.functional as F

    if len(node.output) > 1 and b.used(node.output[1]):
        raise Fallback("dropout mask used")
    p = dropout_ratio(b, node)
    if p is None:
        raise Fallback("computed ratio")
    b.emit("dropout", F.dropout, (b.ref(node.input[0]), p, True), tensors=[node.output[0]],
           metas=[b.meta(node.output[0])])


def dropout_ratio(b: Builder, node) -> float | None:
    """A ``Dropout`` node's ratio (an attribute before opset 12, then an input), None
    when it is computed at run time."""
    if b.opset < 12:
        return float(b.attrs(node).get("ratio", 0.5))
    p = b.scalar(node.input[1]) if len(node.input) > 1 and node.input[1] else 0.5
    return None if p is None else float(p)


@maps("Resize", "Upsample")
def resize(b: Builder, node) -> None:
    import torch.nn.functional as F

    meta, out = b.meta(node.input[0]), b.shape(node.output[0])
    if meta is None or out is None or not 3 <= len(out) <= 5 or out[:2] != meta.shape[:2]:
        raise Fallback("resize of batch or channel dims")
    a = b.attrs(node)
    mode = a.get("mode", "nearest")
    nd = len(out) - 2
    torch_mode = {"nearest": "nearest", "linear": ("linear", "bilinear", "trilinear")[nd - 1],
                  "bilinear": "bilinear", "cubic": "bicubic"}.get(mode)
    if torch_mode is None or (torch_mode == "bicubic" and nd != 2):
        raise Fallback("resize mode")
    size = tuple(out[2:])
    corners = a.get("coordinate_transformation_mode") == "align_corners" and torch_mode != "nearest"
    kwargs = {"align_corners": True} if corners else {}

    def interpolate(x):
        return F.interpolate(x, size=size, mode=torch_mode, **kwargs)

    b.emit("interpolate", interpolate, (b.ref(node.input[0]),))


@maps("Einsum")
def einsum(b: Builder, node) -> None:
    import torch

    eq = b.attrs(node)["equation"]
    b.emit("einsum", torch.einsum, (eq, *[b.ref(t) for t in node.input]))


@maps("Attention")
def attention(b: Builder, node) -> None:
    """Opset 23's ``Attention`` as ``scaled_dot_product_attention``
    (:func:`gradaudit.frontends.onnx_attention.attention_op`)."""
    from gradaudit.frontends import onnx_attention

    onnx_attention.attention_op(b, node)


# --------------------------------------------------------------------------- recurrent
#: torch's gate order as indices into ONNX's: LSTM iofc -> ifgo, GRU zrh -> rzn.
_GATES = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}


@maps("RNN", "LSTM", "GRU")
def recurrent(b: Builder, node) -> None:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (one layer, forward or bidirectional) with
    the ONNX weights regrouped into torch's gate order, so the recurrent rules read
    ``weight_hh_l0`` as for a torch model. The node returns torch's ``(output, h_n)`` /
    ``(output, (h_n, c_n))``; ONNX's Y, Y_h, Y_c are its leaves."""
    import torch
    import torch.nn as nn

    a = b.attrs(node)
    t = node.op_type
    ins = list(node.input) + [""] * (8 - len(node.input))
    x_name, w, r, bias, seq_lens, h0 = ins[:6]
    c0 = ins[6] if t == "LSTM" else ""
    direction = a.get("direction", "forward")
    acts = [s.lower() for s in a.get("activations", [])]
    unsupported = (
        direction == "reverse" or a.get("clip") is not None or a.get("input_forget", 0)
        or (t == "LSTM" and ins[7]) or (t == "GRU" and not a.get("linear_before_reset", 0))
        or (t == "RNN" and acts and acts[0] not in ("tanh", "relu"))
        or (t != "RNN" and acts and acts[:3] not in (["sigmoid", "tanh", "tanh"], ["sigmoid", "tanh"]))
    )
    if unsupported or b.const(w) is None or b.const(r) is None or (bias and b.const(bias) is None):
        raise Fallback("recurrent variant")
    meta = b.meta(x_name)
    layout = int(a.get("layout", 0))
    if seq_lens and (b.const(seq_lens) is None or meta is None
                     or set(b.ints(seq_lens)) != {meta.shape[1 if layout else 0]}):
        raise Fallback("variable sequence lengths")
    W, R = b.tensor(w), b.tensor(r)
    dirs, hidden = W.shape[0], int(a.get("hidden_size", R.shape[-1]))
    gates = _GATES[t]
    B = b.tensor(bias) if bias else torch.zeros(dirs, 2 * len(gates) * hidden, dtype=W.dtype)

    def order(m):  # (gates * H, ...) in ONNX order -> torch order
        return torch.cat([m[g * hidden:(g + 1) * hidden] for g in gates])

    kwargs = {"bidirectional": dirs == 2, "batch_first": layout == 1}
    if t == "RNN":
        kwargs["nonlinearity"] = acts[0] if acts else "tanh"
    cls = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}[t]
    module = b.module(cls, W.shape[-1], hidden, **kwargs)
    tensors, params = {}, {}
    n = len(gates) * hidden
    for d in range(dirs):
        sfx = "_l0" + ("_reverse" if d else "")
        tensors[f"weight_ih{sfx}"] = (w, order(W[d]))
        tensors[f"weight_hh{sfx}"] = (r, order(R[d]))
        tensors[f"bias_ih{sfx}"] = (bias or None, order(B[d, :n]))
        tensors[f"bias_hh{sfx}"] = (bias or None, order(B[d, n:]))
    params = b.attach(module, **tensors)
    module.flatten_parameters = lambda: None  # the parameters are views of the file's weights
    args: tuple = (b.ref(x_name),)
    states = [s for s in (h0, c0) if s and not (b.const(s) is not None and not b.const(s).any())]
    if states:
        if t == "LSTM" and not (h0 and c0 and len(states) == 2):
            raise Fallback("one initial LSTM state")
        hx = (b.ref(h0), b.ref(c0)) if t == "LSTM" else b.ref(h0)
        args = (b.ref(x_name), hx)
    outs = [o if o else "" for o in (list(node.output) + ["", "", ""])[: 3 if t == "LSTM" else 2]]
    metas = [b.meta(o) if o else None for o in outs]
    torch_metas = _torch_rnn_metas(metas, dirs, hidden, layout)
    name = b.emit(t.lower(), module, args, tensors=[], metas=torch_metas, module=module, params=params)
    b.nodes[-1].structure = (0, (1, 2)) if t == "LSTM" else (0, 1)
    if outs[0]:
        b.tensor_of[name] = outs[0]
    states = name
    if t == "LSTM" and any(o and b.used(o) for o in outs[1:]):
        states = b._unique(f"{name}/states")
        b.nodes.append(Node(name=states, op="getitem", kind="call_function", args=(Ref(name), 1),
                            fn=operator.getitem, outputs=torch_metas[1:], structure=(0, 1)))
    picks = [(name, 0)] + ([(states, 0), (states, 1)] if t == "LSTM" else [(name, 1)])
    for k, (src, index) in enumerate(picks):
        if outs[k] and b.used(outs[k]):
            _onnx_layout(b, src, index, outs[k], torch_metas[k], metas[k], k == 0, layout)


def _torch_rnn_metas(metas, dirs: int, hidden: int, layout: int) -> list:
    """torch's output shapes -- output (seq, batch, dirs * H) (batch first with layout 1),
    states (dirs, batch, H) -- from ONNX's Y (seq, dirs, batch, H) / (batch, seq, dirs,
    H) and Y_h, Y_c (dirs, batch, H) / (batch, dirs, H)."""
    out = []
    for k, m in enumerate(metas):
        if m is None:
            out.append(None)
        elif k == 0:
            seq, batch = (m.shape[0], m.shape[2]) if not layout else (m.shape[1], m.shape[0])
            shape = (batch, seq, dirs * hidden) if layout else (seq, batch, dirs * hidden)
            out.append(TensorMeta(shape, m.dtype))
        else:
            out.append(TensorMeta((dirs, m.shape[0], hidden) if layout else m.shape, m.dtype))
    return out


def _onnx_layout(b: Builder, src: str, index: int, tensor: str, torch_meta, onnx_meta, sequence: bool,
                 layout: int) -> None:
    """A recurrent output in ONNX's layout: the torch leaf, regrouped (layout ops, which
    keep the statistics)."""
    import torch

    picked = b._unique(f"{src}[{index}]")
    b.nodes.append(Node(name=picked, op="getitem", kind="call_function", args=(Ref(src), index),
                        fn=operator.getitem, outputs=[torch_meta]))
    ref = Ref(picked)
    if sequence:
        s = onnx_meta.shape
        split = (s[0], s[2], s[1], s[3]) if not layout else s
        grouped = b._unique(f"{picked}/heads")
        b.nodes.append(Node(name=grouped, op="reshape", kind="call_function", args=(ref, split), fn=torch.reshape,
                            outputs=[TensorMeta(split, onnx_meta.dtype)]))
        ref = Ref(grouped)
        if not layout:
            last = b._unique(f"{picked}/onnx")
            b.nodes.append(Node(name=last, op="permute", kind="call_function", args=(ref, (0, 2, 1, 3)),
                                fn=torch.permute, outputs=[onnx_meta]))
            ref = Ref(last)
    elif layout:
        last = b._unique(f"{picked}/onnx")
        b.nodes.append(Node(name=last, op="permute", kind="call_function", args=(ref, (1, 0, 2)),
                            fn=torch.permute, outputs=[onnx_meta]))
        ref = Ref(last)
    b.produced[tensor] = ref.name
    b.tensor_of.setdefault(ref.name, tensor)
