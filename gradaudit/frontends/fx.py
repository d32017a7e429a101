"""torch.fx capture: symbolic trace + shapes -> :class:`gradaudit.ir.Graph`.

Standard ``torch.nn`` layers stay leaf modules (one node per ``nn.Linear``, ``nn.LSTM``,
``nn.MultiheadAttention`` ...) while user modules and the ``nn.Transformer*`` containers
are traced through, so every op the user wrote becomes a node. Shapes come from the
shape rules of :mod:`gradaudit.frontends.shapes` when every op has one, else from
``FakeTensorProp`` with fake copies of the parameters: either way the model's real
arithmetic never runs and its buffers (BatchNorm's ``num_batches_tracked``) are never
touched.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import logging
import operator
import os
import re
import sys
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from gradaudit.errors import CaptureError, ModelCallError
from gradaudit.frontends import functions, shapes
from gradaudit.frontends.aten import packet_name
from gradaudit.frontends.signature import BindError, Bound, ExampleCall, bind, map_tensors
from gradaudit.frontends.outputs import check_outputs
from gradaudit.ir import Graph, Location, Node, Ref, TensorMeta, iter_refs
from gradaudit.probe.inputs import first_line

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../gradaudit

#: Module classes traced through rather than kept as leaves.
_TRACE_THROUGH = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


# torch's Transformer layers pick a fused fast path by inspecting their input (control
# flow fx cannot trace); in training mode they compute exactly these slow paths.
def _encoder_layer(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + self._ff_block(self.norm2(x))
    x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return self.norm2(x + self._ff_block(x))


def _decoder_layer(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
    x = tgt
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        return x + self._ff_block(self.norm3(x))
    x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
    return self.norm3(x + self._ff_block(x))


def _encoder(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
    out = src
    for layer in self.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return self.norm(out) if self.norm is not None else out


def _decoder(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    out = tgt
    for layer in self.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return self.norm(out) if self.norm is not None else out


_TRACEABLE_FORWARD = {
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerDecoderLayer: _decoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoder: _decoder,
}

#: Leaf module class -> normalised op name.
MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Bilinear: "bilinear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose",
    nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose",
    nn.BatchNorm1d: "batch_norm",
    nn.BatchNorm2d: "batch_norm",
    nn.BatchNorm3d: "batch_norm",
    nn.SyncBatchNorm: "batch_norm",
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    nn.InstanceNorm1d: "instance_norm",
    nn.InstanceNorm2d: "instance_norm",
    nn.InstanceNorm3d: "instance_norm",
    nn.RMSNorm: "rms_norm",
    nn.Dropout: "dropout",
    nn.Dropout1d: "dropout",
    nn.Dropout2d: "dropout",
    nn.Dropout3d: "dropout",
    nn.AlphaDropout: "alpha_dropout",
    nn.FeatureAlphaDropout: "alpha_dropout",
    nn.MaxPool1d: "max_pool",
    nn.MaxPool2d: "max_pool",
    nn.MaxPool3d: "max_pool",
    nn.AvgPool1d: "avg_pool",
    nn.AvgPool2d: "avg_pool",
    nn.AvgPool3d: "avg_pool",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool",
    nn.AdaptiveAvgPool3d: "adaptive_avg_pool",
    nn.AdaptiveMaxPool1d: "adaptive_max_pool",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool",
    nn.AdaptiveMaxPool3d: "adaptive_max_pool",
    nn.Embedding: "embedding",
    nn.MultiheadAttention: "multihead_attention",
    nn.RNN: "rnn",
    nn.LSTM: "lstm",
    nn.GRU: "gru",
    nn.RNNCell: "rnn_cell",
    nn.LSTMCell: "lstm_cell",
    nn.GRUCell: "gru_cell",
    nn.Identity: "identity",
    nn.Flatten: "flatten",
    nn.Unflatten: "reshape",
    nn.Upsample: "interpolate",
    nn.UpsamplingNearest2d: "interpolate",
    nn.UpsamplingBilinear2d: "interpolate",
    nn.Softmax: "softmax",
    nn.Softmin: "softmin",
    nn.LogSoftmax: "log_softmax",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish",
    nn.Softplus: "softplus",
    nn.Softsign: "softsign",
    nn.LogSigmoid: "logsigmoid",
    nn.Tanhshrink: "tanhshrink",
    nn.Softshrink: "softshrink",
    nn.Hardshrink: "hardshrink",
    nn.Threshold: "threshold",
}

#: Function / method names whose normalised op differs from their ``__name__``.
_ALIASES = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "div",
    "multiply": "mul",
    "divide": "div",
    "subtract": "sub",
    "negative": "neg",
    "concat": "cat",
    "concatenate": "cat",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "matmul": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
    "clip": "clamp",
    "sigmoid_": "sigmoid",
    "expand_as": "expand",
    "type_as": "to",
    "float": "to",
    "double": "to",
    "half": "to",
    "bfloat16": "to",
    "unsafe_split": "split",
    "upsample": "interpolate",
    "view_as": "view",
    "log_sigmoid": "logsigmoid",
    "_threshold": "threshold",
}


def normalise_name(name: str) -> str:
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    return _ALIASES.get(name, name)


_TRACE_CODE = fx.Tracer.trace.__code__


class _Tracer(fx.Tracer):
    #: Buffers read in a forward (a causal mask ``self.bias[:, :, :T, :T]``) are graph
    #: values, so slicing them by a traced size works.
    proxy_buffer_attributes = True

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """Record the user's line for each node from the live Python stack (fx's own
        ``record_stack_traces`` formats whole tracebacks and imports torch._inductor)."""
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not _TRACE_CODE:  # only frames of the traced forward
            path = frame.f_code.co_filename
            if not _is_internal(path):
                node.meta["gradaudit_location"] = Location(
                    path=display_path(os.path.abspath(path)),
                    line=frame.f_lineno,
                    code=linecache.getline(path, frame.f_lineno).strip() or None,
                )
                break
            frame = frame.f_back
        return node

    def trace(self, root, concrete_args=None):
        """fx's trace, with each custom ``autograd.Function`` one node
        (:mod:`gradaudit.frontends.functions`)."""
        with functions.opaque(self._function_call):
            return super().trace(root, concrete_args)

    def _function_call(self, cls, run, args, kwargs):
        """``cls.apply`` on traced values: one ``call_function`` node that applies it."""
        traced = []
        fx.node.map_aggregate((args, kwargs), lambda a: traced.append(a) if isinstance(a, fx.Proxy) else None)
        if not traced:
            return run()
        return self.create_proxy("call_function", functions.target(cls), args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _TRACE_THROUGH):
            return False
        return type(m) in MODULE_OPS or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        replacement = _TRACEABLE_FORWARD.get(type(m))
        if replacement is not None:
            forward = replacement.__get__(m)
        return super().call_module(m, forward, args, kwargs)


@functools.lru_cache(maxsize=4096)
def _is_internal(path: str) -> bool:
    """Frames of torch, of gradaudit itself, or without a real file (cached: every
    traced node asks for each frame of its stack)."""
    if path.startswith("<"):
        return True
    apath = os.path.abspath(path)
    return apath.startswith(_TORCH_DIR + os.sep) or apath.startswith(_PKG_DIR + os.sep)


def user_location(frames: list[tuple[str, int, str | None]]) -> Location | None:
    """The innermost frame outside torch and gradaudit: the user's own line."""
    for path, line, code in reversed(frames):
        if not _is_internal(path):
            return Location(path=display_path(os.path.abspath(path)), line=line, code=code)
    return None


def display_path(path: str) -> str:
    """Relative to the working directory when inside it, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel




def _location_of(node: fx.Node) -> Location | None:
    return node.meta.get("gradaudit_location") if node.meta else None


def exception_location(exc: BaseException) -> Location | None:
    frames = [(f.filename, f.lineno or 0, f.line) for f in traceback.extract_tb(exc.__traceback__)]
    return user_location(frames)


def _tensor_meta(val: Any) -> TensorMeta | None:
    if isinstance(val, (torch.Tensor, shapes.Shaped)):
        return TensorMeta(shape=tuple(int(s) for s in val.shape), dtype=str(val.dtype).replace("torch.", ""))
    return None


def _method_caller(name: str):
    """``x.name(...)`` as a function of ``x``. An in-place method (``bernoulli_``,
    ``add_``) is called out of place: the IR's values are never overwritten, and ops
    estimated on sampled inputs must not write into them."""
    method = name
    if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
        method = name[:-1]

    def call(self, *args, **kwargs):
        return getattr(self, method)(*args, **kwargs)

    call.__name__ = name
    return call


def trace(model: nn.Module, example_inputs: Any) -> Graph:
    """Symbolically trace ``model`` and propagate shapes; raise :class:`CaptureError`.

    ``example_inputs`` is a tensor, a tuple (positional), a dict (keyword) or an
    :class:`~gradaudit.frontends.signature.ExampleCall`. Parameters of ``forward`` that
    carry tensors become the graph's inputs; every other one (a number, a bool,
    ``None``, a string, a config object, given or left at its default) is traced as the
    constant it is, so the branch the example call takes is the branch traced.
    """
    call = ExampleCall.of(example_inputs)
    tracer = _Tracer()
    original_class = type(model)
    replacement = _TRACEABLE_FORWARD.get(original_class)
    try:
        if replacement is not None:  # the model itself is e.g. an nn.TransformerEncoder
            model.__class__ = type(original_class.__name__, (original_class,), {"forward": replacement})
        bound = _bind(model, call)
        concrete = {b.name: b.value for b in bound if not b.is_input}
        given = {b.name for b in bound if b.is_input}
        keep = [name in given for name in inspect.signature(model.forward).parameters]
        fx_graph = tracer.trace(model, concrete_args=concrete or None)
    except CaptureError:
        raise
    except Exception as exc:  # torch.fx raises many types for untraceable code
        loc = exception_location(exc)
        where = f" at {loc}" if loc else ""
        raise CaptureError(f"torch.fx could not trace the model{where}: {first_line(exc)}", location=loc) from exc
    finally:
        model.__class__ = original_class
    inputs = [b.value for b in bound if b.is_input]
    _drop_constant_placeholders(fx_graph, keep)
    gm = fx.GraphModule(tracer.root, fx_graph)
    try:  # shape rules for the common ops; fake tensors for everything else
        shapes.infer(gm, inputs)
    except shapes.NoRule:
        _propagate_fake_shapes(gm, inputs)
    graph = _to_ir(gm, model)
    graph.input_args = [b.key for b in bound if b.is_input]
    return graph


def _bind(model: nn.Module, call: ExampleCall) -> list[Bound]:
    try:
        bound = bind(model, call)
    except BindError as exc:
        err = ModelCallError(str(exc))
        err.inputs_suspect = True
        raise err from exc
    for b in bound:
        if b.is_input and b.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise CaptureError(f"torch.fx cannot trace tensors passed through *args or **kwargs ({b.name!r})")
    return bound


def _drop_constant_placeholders(graph: fx.Graph, keep: list[bool]) -> None:
    """Remove what ``concrete_args`` leaves behind: a placeholder per constant parameter
    (and per empty ``*args`` / ``**kwargs``) with the assertions fx adds on it. fx makes
    one placeholder per parameter of ``forward``, in order; ``keep`` says which carry
    tensors and stay."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(keep):
        raise CaptureError(f"torch.fx made {len(placeholders)} inputs for the {len(keep)} parameters of forward")
    for p, stays in zip(placeholders, keep):
        if stays:
            continue
        for u in list(p.users):
            if not _is_check(u):
                raise CaptureError(f"torch.fx kept the constant argument {p.target!r} as an input")
            for check in list(u.users):
                graph.erase_node(check)
            graph.erase_node(u)
        graph.erase_node(p)


def _is_check(n: fx.Node) -> bool:
    """fx's guard on a specialised constant: ``_assert(eq(p, value))`` or ``_assert_is_none(p)``."""
    if n.op != "call_function":
        return False
    if getattr(n.target, "__name__", "") == "_assert_is_none":
        return True
    return n.target is operator.eq and all(u.op == "call_function" and u.target is torch._assert for u in n.users)


def _propagate_fake_shapes(gm: fx.GraphModule, example_inputs: list) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _NoHookFakeProp = _no_hook_prop_class()

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    state = {
        **dict(gm.named_parameters(remove_duplicate=False)),
        **dict(gm.named_buffers(remove_duplicate=False)),
    }
    fake_state = {k: mode.from_tensor(v) for k, v in state.items()}
    fake_inputs = tuple(map_tensors(x, mode.from_tensor) for x in example_inputs)

    class _Prop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm

        def forward(self, *args):
            return _NoHookFakeProp(self.gm, mode).propagate(*args)

    wrapper = _Prop()
    # torch logs a full traceback for a failing fake op before raising; the error we
    # raise below says it in one line
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        torch.func.functional_call(wrapper, {f"gm.{k}": v for k, v in fake_state.items()}, fake_inputs, strict=False)
    except Exception as exc:
        bad = _failing_fx_node(gm, exc)
        loc = _location_of(bad) if bad is not None else exception_location(exc)
        where = f" at {loc}" if loc else ""
        custom = functions.function_name(bad.target) if bad is not None and bad.op == "call_function" else None
        if custom is not None:  # its forward leaves torch (numpy, an extension): not the inputs' fault
            raise CaptureError(f"custom autograd.Function {custom}{where} cannot run on fake tensors: {first_line(exc)}",
                               location=loc) from exc
        at_node = ""
        if bad is not None:
            at_node = f" in node '{bad.name}'"
            if bad.op == "call_module":
                at_node += f" ({type(gm.get_submodule(str(bad.target))).__name__} '{bad.target}')"
        err = CaptureError(f"the example inputs do not fit the model{at_node}{where}: {first_line(exc)}", location=loc)
        err.inputs_suspect = True
        raise err from exc
    finally:
        fake_log.setLevel(level)


def _no_hook_prop_class():
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class NoHookFakeProp(FakeTensorProp):
        """FakeTensorProp that calls leaf modules' ``forward`` directly: the user's
        forward hooks must not see (or choke on) the audit's fake tensors."""

        def call_module(self, target, args, kwargs):
            return self.fetch_attr(target).forward(*args, **kwargs)

        def run_node(self, n):
            """Keep non-tensor results too (``weight.device``, ``x.shape[2] // 2``):
            they become constants of the graph."""
            result = super().run_node(n)
            if "val" not in n.meta and not _holds_tensor(result):
                n.meta["val"] = result
            return result

    return NoHookFakeProp


def _failing_fx_node(gm: fx.GraphModule, exc: BaseException) -> fx.Node | None:
    """FakeTensorProp records the node being run in the exception's notes (torch >= 2.1)."""
    for note in [str(exc), *(getattr(exc, "__notes__", None) or [])]:
        m = re.search(r"While executing (%\w+)", note)
        if m:
            name = m.group(1).lstrip("%")
            for n in gm.graph.nodes:
                if n.name == name:
                    return n
    return None


def _to_ir(gm: fx.GraphModule, model: nn.Module) -> Graph:
    """fx nodes -> IR nodes. A node that computes no tensor (``x.size(3)``,
    ``self.weight.shape``, ``x.shape[0] * 2``, a config object) is a constant of the
    graph: its value, known from the shape pass, replaces every reference to it, so
    handlers read numbers, never references to numbers."""
    modules = dict(gm.named_modules())
    nodes: list[Node] = []
    inputs: list[str] = []
    outputs: list[str] = []
    constants: dict[str, Any] = {}

    def to_ref(a):
        if isinstance(a, fx.Node):
            return constants[a.name] if a.name in constants else Ref(a.name)
        return a

    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and "val" in n.meta and not _holds_tensor(n.meta["val"]):
            constants[n.name] = n.meta["val"]
            continue
        args = fx.node.map_aggregate(n.args, to_ref)
        kwargs = fx.node.map_aggregate(n.kwargs, to_ref)
        metas: list[TensorMeta | None] = []
        structure = flatten_meta(n.meta.get("val"), metas)
        node = Node(
            name=n.name,
            op="call",
            kind=n.op,
            args=args,
            kwargs=kwargs,
            outputs=metas,
            structure=structure,
            location=_location_of(n),
        )
        if n.op == "placeholder":
            node.op = "input"
            inputs.append(n.name)
        elif n.op == "output":
            node.op = "output"
            outputs = [r.name for r in iter_refs(args)]
        elif n.op == "get_attr":
            node.op = "param"
            value = _fetch_attr(gm, str(n.target))
            node.params = {"value": value} if isinstance(value, torch.Tensor) else {}
            node.module = str(n.target)
            if isinstance(value, torch.Tensor):
                node.outputs = [_tensor_meta(value)]
        elif n.op == "call_module":
            mod = modules[str(n.target)]
            node.module = str(n.target)
            node.module_type = type(mod).__name__
            node.fn = mod
            node.params = module_params(mod)
            node.op = _module_op(mod)
        elif n.op == "call_function":
            node.fn = n.target
            node.op = normalise_name(packet_name(n.target))  # a custom op's overload: the op's own name
            if n.target is operator.getitem:
                node.op = "getitem"
        elif n.op == "call_method":
            node.fn = _method_caller(str(n.target))
            node.op = normalise_name(str(n.target))
        nodes.append(node)
    graph = Graph(nodes=nodes, frontend="fx", input_names=inputs, output_refs=outputs, program=gm)
    check_outputs(graph, model)
    return graph


def _holds_tensor(val: Any) -> bool:
    if isinstance(val, (torch.Tensor, shapes.Shaped)):
        return True
    if isinstance(val, (tuple, list)):
        return any(_holds_tensor(v) for v in val)
    if isinstance(val, dict):
        return any(_holds_tensor(v) for v in val.values())
    return False


def flatten_meta(val: Any, leaves: list) -> Any:
    """Flatten a nested tuple of tensors into ``leaves`` (their :class:`TensorMeta`);
    return its index structure."""
    if isinstance(val, (tuple, list)):
        return tuple(flatten_meta(v, leaves) for v in val)
    leaves.append(_tensor_meta(val))
    return len(leaves) - 1


def module_params(mod: nn.Module) -> dict[str, Any]:
    """The parameters a layer's handler reads, by name. A parametrized layer
    (``weight_norm``, ``spectral_norm`` through ``torch.nn.utils.parametrize``) stores
    ``parametrizations.weight.original0`` ...; its ``weight`` is computed from them, and
    that computed value is what the layer multiplies by."""
    params: dict[str, Any] = dict(mod.named_parameters())
    parametrized = getattr(mod, "parametrizations", None)
    if parametrized is not None:
        with torch.no_grad():
            for name in parametrized.keys():
                params[name] = getattr(mod, name).detach()
    return params


def _module_op(mod: nn.Module) -> str:
    for cls in type(mod).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    return "module"


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
