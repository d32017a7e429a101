"""torch.export capture: ``torch.export.export(strict=False)`` -> :class:`gradaudit.ir.Graph`.

The fallback when torch.fx cannot trace the model (data-dependent Python such as
``int(x.size(1))``, ``torch.zeros(B, H)`` from traced sizes, shape assertions, einops,
Hugging Face models). Non-strict export runs the model's Python once on fake tensors of
the example inputs' shapes, so shapes are real numbers and branches on shapes, flags
and ``self.training`` are resolved for the example call; the user's numbers never run.

The exported graph holds ATen operators. To give every later stage the same IR as the
fx frontend:

- each call of a standard layer (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``,
  ``nn.LSTM``, ``nn.MultiheadAttention`` ...) becomes one ``call_module`` node again:
  export is asked to preserve those calls' signatures (``preserve_module_call_signature``),
  which names the graph values each call received and returned, and the ATen nodes in
  between are folded into the call;
- every other ATen operator is spelled the way the handlers know it
  (:mod:`gradaudit.frontends.aten`);
- computations that depend on no input (a causal mask from ``torch.ones``, rotary
  tables from a buffer, a transposed weight) are evaluated once on the real parameters
  and become constants; an attention mask that is all-true or causal becomes
  ``attn_mask=None`` / ``is_causal=True``;
- module qualified names come from each node's ``nn_module_stack``, the user's line from
  its ``stack_trace``.

The model is exported in training mode (the mode the audit predicts) and put back in
its own modes afterwards. Outputs are flattened first (tuples, lists, dicts,
``ModelOutput``); objects that hold no tensors in a known container (a generation
cache) are left out of L with a note.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from gradaudit.errors import CaptureError
from gradaudit.frontends import aten, functions
from gradaudit.frontends.fx import (_Tracer, _module_op, _tensor_meta, exception_location, flatten_meta, module_params,
                                    user_location)
from gradaudit.frontends.outputs import check_outputs, flatten_outputs
from gradaudit.frontends.patterns import SOURCE, UNINITIALISED
from gradaudit.frontends.signature import ExampleCall, has_tensor
from gradaudit.ir import Graph, Location, Node, Ref, TensorMeta, iter_refs, map_refs, renumber, structure_leaves
from gradaudit.probe.inputs import first_line

_PREFIX = "model"


class _Flat(nn.Module):
    """Calls the model and returns every tensor of its output as a flat tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.left_out: list[str] = []

    def forward(self, *args, **kwargs):
        tensors, self.left_out = flatten_outputs(self.model(*args, **kwargs))
        return tuple(tensors)


def leaf_modules(model: nn.Module) -> list[str]:
    """Qualified names of the layers the fx frontend keeps whole (outermost ones only;
    a module reachable under two names is listed once)."""
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        return [""]
    out: list[str] = []
    seen: set[int] = set()

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            q = f"{prefix}.{name}" if prefix else name
            if tracer.is_leaf_module(child, q):
                out.append(q)
            else:
                walk(q, child)

    walk("", model)
    return out


@contextlib.contextmanager
def training_mode(model: nn.Module):
    """The model in training mode, every module's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def quiet():
    """torch.export's warnings, logs and prints (it prints the partial graph of a failed
    export to stderr) say in many lines what our one error line says."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch._export", "torch.export", "torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: nn.Module, example_inputs: Any, *, core_aten: bool = False) -> Graph:
    """Export ``model`` on the example call and build the IR; raise :class:`CaptureError`.

    ``core_aten`` lowers the program to the Core ATen operator set first
    (``run_decompositions()``: ``addmm``, ``convolution``,
    ``_native_batch_norm_legit_functional``, ``native_layer_norm``...), the spelling
    other exporters and older torch versions produce; the IR is the same."""
    call = ExampleCall.of(example_inputs)
    flat = _Flat(model)
    leaves = leaf_modules(model)
    keep = tuple(_PREFIX + (f".{q}" if q else "") for q in leaves)
    custom: list[type] = []
    hooks: list[str] = []
    try:
        with training_mode(model), quiet(), functions.recorded(custom), functions.hooks_recorded(hooks):
            ep = torch.export.export(flat, call.args, call.kwargs, strict=False, preserve_module_call_signature=keep)
            if core_aten:
                ep = ep.run_decompositions()
    except Exception as exc:  # export raises many types for code it cannot capture
        loc = exception_location(exc)
        where = f" at {loc}" if loc else ""
        raise CaptureError(f"torch.export could not capture the model{where}: {first_line(exc)}", location=loc) from exc
    if custom:  # export keeps their forward and drops their backward (:mod:`gradaudit.frontends.functions`)
        names = ", ".join(c.__qualname__ for c in custom)
        raise CaptureError(f"torch.export records the forward of custom autograd.Function {names} but not its backward")
    if hooks:  # export runs them on fake values and drops them from the program
        raise CaptureError(f"torch.export drops the gradient hook of the forward ({hooks[0]})")
    graph = _Builder(ep, model, call, set(leaves)).build()
    graph.notes.extend(f"output {what} is not a tensor container: it is left out of L" for what in flat.left_out)
    check_outputs(graph, model)
    return graph


def _strip(qualname: str) -> str:
    """``model.layer1.0`` -> ``layer1.0`` (the wrapper's prefix)."""
    if qualname == _PREFIX:
        return ""
    return qualname[len(_PREFIX) + 1 :] if qualname.startswith(_PREFIX + ".") else qualname


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n(?:[ \t]+([^\n]*))?')


def stack_location(stack_trace: str | None) -> Location | None:
    """The user's line from an exported node's ``stack_trace``."""
    if not stack_trace:
        return None
    frames = [(m.group(1), int(m.group(2)), (m.group(3) or "").strip() or None) for m in _FRAME.finditer(stack_trace)]
    return user_location(frames)


class _Builder:
    """ExportedProgram -> IR nodes (see the module docstring)."""

    def __init__(self, ep, model: nn.Module, call: ExampleCall, leaves: set[str]) -> None:
        self.ep = ep
        self.model = model
        self.call = call
        self.leaves = leaves
        self.fx_nodes = {n.name: n for n in ep.graph_module.graph.nodes}
        self.nodes: list[Node] = []
        self.names: set[str] = set()
        self.rename: dict[str, str] = {}
        self.values: dict[str, Any] = {}  # node -> its value when known ahead of time
        # node -> the trainable parameters its folded value is computed from
        self.sources: dict[str, dict[str, torch.Tensor]] = {}
        self.constants: dict[str, Any] = {}  # node -> a Python value that replaces it
        self.inputs: list[str] = []
        self.input_args: list[str] = []
        self.emitted: dict[str, Node] = {}

    # -- helpers -------------------------------------------------------------------
    def ref(self, a: Any) -> Any:
        """A graph value as an argument: a Ref to its IR node, or the constant it is."""
        if isinstance(a, torch.fx.Node):
            if a.name in self.constants:
                return self.constants[a.name]
            name = self.rename.get(a.name, a.name)
            if name not in self.emitted and a.name in self.values:
                return self.values[a.name]
            return Ref(name)
        return a

    def add(self, node: Node) -> None:
        self.nodes.append(node)
        self.emitted[node.name] = node

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def module_of(self, n: torch.fx.Node) -> tuple[str | None, str | None]:
        stack = n.meta.get("nn_module_stack") or {}
        if not stack:
            return None, None
        path, kind = list(stack.values())[-1]
        q = _strip(path)
        if not q:
            return None, None
        type_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
        return q, type_name

    # -- inputs --------------------------------------------------------------------
    def _placeholders(self) -> None:
        from torch.export.graph_signature import InputKind, TensorArgument

        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        user = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        import torch.utils._pytree as pytree

        leaves = pytree.tree_flatten_with_path((self.call.args, self.call.kwargs))[0]
        if len(leaves) != len(user):  # None leaves were left out: pair the tensors
            leaves = [(p, v) for p, v in leaves if isinstance(v, torch.Tensor)]
            user = [s for s in user if isinstance(s.arg, TensorArgument)]
        given = {s.arg.name: (path, value) for s, (path, value) in zip(user, leaves)}
        positional = self._positional_names()
        for n in self.ep.graph_module.graph.nodes:
            if n.op != "placeholder":
                continue
            spec = specs.get(n.name)
            kind = spec.kind if spec is not None else InputKind.USER_INPUT
            if kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                value = self._state(spec.target, kind)
                node = Node(name=n.name, op="param", kind="get_attr", module=_strip(spec.target))
                if isinstance(value, torch.Tensor):
                    node.params = {"value": value}
                    node.outputs = [_tensor_meta(value)]
                    self.values[n.name] = value
                    if isinstance(value, nn.Parameter) and value.requires_grad:
                        self.sources[n.name] = {node.module or n.name: value}
                self.add(node)
            elif kind == InputKind.USER_INPUT and n.name in given:
                path, value = given[n.name]
                if not isinstance(value, torch.Tensor):
                    self.constants[n.name] = value
                    continue
                key, name = _arg_name(path, positional)
                name = self.fresh(name) if name != n.name else name
                self.rename[n.name] = name
                self.inputs.append(name)
                self.input_args.append(key)
                if not value.is_floating_point():  # ids and masks: known, as given
                    self.values[n.name] = value
                self.add(Node(name=name, op="input", kind="placeholder", outputs=[_tensor_meta(value)]))
            else:  # a token or custom object: nothing to propagate
                self.constants[n.name] = None

    def _state(self, target: str, kind) -> Any:
        from torch.export.graph_signature import InputKind

        if kind == InputKind.CONSTANT_TENSOR:
            return self.ep.constants.get(target)
        name = _strip(target)
        getter = self.model.get_parameter if kind == InputKind.PARAMETER else self.model.get_buffer
        try:
            return getter(name)
        except AttributeError:
            return self.ep.state_dict.get(target)

    def _positional_names(self) -> list[str]:
        import inspect

        try:
            params = inspect.signature(self.model.forward).parameters.values()
        except (TypeError, ValueError):
            return []
        return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    # -- layer calls -----------------------------------------------------------------
    def _layer_calls(self) -> dict[str, dict]:
        """For each preserved layer call: its nodes, inputs, outputs and structure."""
        from torch.export.graph_signature import ConstantArgument, TensorArgument
        import torch.utils._pytree as pytree

        plans: dict[str, dict] = {}
        order = {name: i for i, name in enumerate(self.fx_nodes)}
        for entry in self.ep.module_call_graph:
            base, _, count = entry.fqn.partition("@")
            qualname = _strip(base)
            if entry.signature is None or not entry.fqn.startswith(_PREFIX) or qualname not in self.leaves:
                continue
            sig = entry.signature
            ins = [a.name if isinstance(a, TensorArgument) else None for a in sig.inputs]
            outs = [a.name if isinstance(a, TensorArgument) else None for a in sig.outputs]
            stop = {i for i in ins if i}
            group: set[str] = set()
            todo = [o for o in outs if o and o not in stop]
            while todo:
                name = todo.pop()
                n = self.fx_nodes.get(name)
                if name in group or name in stop or n is None or n.op == "placeholder":
                    continue
                group.add(name)
                todo.extend(a.name for a in n.all_input_nodes)
            if not group:  # nn.Identity: nothing to fold
                continue
            inner = group - set(outs)
            escaping = {u.name for g in inner for u in self.fx_nodes[g].users if u.name not in group}
            if any(self.fx_nodes[u].users for u in escaping):
                continue  # an inner value escapes the call: keep the ops as they are
            group |= escaping  # unused by-products (max pooling's indices) go with the call
            values = [Ref(i) if i else (a.value if isinstance(a, ConstantArgument) else None) for i, a in zip(ins, sig.inputs)]
            call_args, call_kwargs = pytree.tree_unflatten(values, sig.in_spec)
            structure = pytree.tree_unflatten(list(range(len(outs))), sig.out_spec)
            last = max(group, key=order.__getitem__)
            plans[last] = {
                "qualname": qualname,
                "count": int(count) if count else 0,
                "group": group,
                "args": tuple(call_args),
                "kwargs": dict(call_kwargs),
                "outs": outs,
                "structure": structure,
                "first": min(group, key=order.__getitem__),
            }
        return plans

    def _emit_call(self, plan: dict) -> None:
        q = plan["qualname"]
        mod = self.model.get_submodule(q) if q else self.model
        base = (q or type(self.model).__name__.lower()).replace(".", "_")
        name = self.fresh(base if not plan["count"] else f"{base}_{plan['count']}")
        metas = [self._meta(o) for o in plan["outs"]]
        first = self.fx_nodes[plan["first"]]
        node = Node(
            name=name,
            op=_module_op(mod),
            kind="call_module",
            args=map_refs(plan["args"], lambda r: self.ref(self.fx_nodes[r.name])),
            kwargs=map_refs(plan["kwargs"], lambda r: self.ref(self.fx_nodes[r.name])),
            module=q or None,
            module_type=type(mod).__name__,
            fn=mod,
            params=module_params(mod),
            outputs=metas,
            structure=plan["structure"],
            location=stack_location(first.meta.get("stack_trace")),
        )
        self.add(node)
        outs = plan["outs"]
        if plan["structure"] == 0:
            if outs[0]:
                self.rename[outs[0]] = name
            return
        made: dict[tuple, str] = {}  # path prefix -> the getitem node for it
        for leaf, out in enumerate(outs):  # getitem chains to each output leaf
            if not out:
                continue
            path = _path_to(plan["structure"], leaf)
            src = name
            for depth in range(len(path)):
                prefix = path[: depth + 1]
                if prefix in made:
                    src = made[prefix]
                    continue
                last = depth == len(path) - 1
                sub = _sub(plan["structure"], prefix)
                nm = out if last else self.fresh(f"{name}_{'_'.join(map(str, prefix))}")
                self.add(
                    Node(
                        name=nm,
                        op="getitem",
                        kind="call_function",
                        fn=operator.getitem,
                        args=(Ref(src), prefix[-1]),
                        outputs=[metas[i] for i in structure_leaves(sub)],
                        structure=renumber(sub),
                        module=q or None,
                        module_type=type(mod).__name__,
                        location=node.location,
                    )
                )
                made[prefix] = src = nm

    def _meta(self, name: str | None) -> TensorMeta | None:
        if name is None:
            return None
        n = self.fx_nodes.get(name)
        return _tensor_meta(n.meta.get("val")) if n is not None else None

    # -- operators -------------------------------------------------------------------
    def _op(self, n: torch.fx.Node) -> None:
        target = n.target
        packet = aten.packet_name(target)
        if packet in aten.NO_VALUE:
            self.constants[n.name] = None
            return
        if self._fold(n, packet):
            return
        args = torch.fx.node.map_aggregate(n.args, self.ref)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, self.ref)
        op, fn, args, kwargs = aten.spell(target, args, kwargs)
        args = self._resolve(args, n)
        if op == "scaled_dot_product_attention":
            kwargs = self._plain_mask(kwargs)
        if op == "cat" and args and isinstance(args[0], (list, tuple)):  # an empty cache adds nothing
            pieces = [t for t in args[0] if not (isinstance(v := self._value_of(t), torch.Tensor) and v.numel() == 0)]
            args = (pieces, *args[1:]) if pieces else args
        metas: list = []
        structure = flatten_meta(n.meta.get("val"), metas)
        module, module_type = self.module_of(n)
        name = self.rename.get(n.name, n.name)
        self.add(
            Node(
                name=name,
                op=op,
                kind="call_function",
                args=args,
                kwargs=kwargs,
                fn=fn,
                outputs=metas,
                structure=structure,
                module=module,
                module_type=module_type,
                location=stack_location(n.meta.get("stack_trace")),
            )
        )

    def _resolve(self, args: tuple, n: torch.fx.Node) -> tuple:
        """Substitute the frontend-side markers of :mod:`aten` (a transposed constant, a
        one-dimension slice)."""
        out = []
        for a in args:
            if isinstance(a, aten.Transposed):
                value = self._value_of(a.ref)
                if value is None:  # a computed matrix: not a linear layer after all
                    raise _NotLinear
                a = self._constant(f"{n.name}_weight", value.t())
            elif isinstance(a, aten.SliceAt):
                a = (slice(None),) * a.dim + (a.piece,) if a.dim >= 0 else (Ellipsis, a.piece) + (slice(None),) * (-a.dim - 1)
            out.append(a)
        return tuple(out)

    def _value_of(self, a: Any) -> Any:
        """The value behind an argument when it is known ahead of time."""
        if isinstance(a, Ref):
            node = self.emitted.get(a.name)
            if node is not None and node.op == "param":
                return node.params.get("value")
            return None
        return a if isinstance(a, torch.Tensor) else None

    def _constant(self, base: str, value: torch.Tensor) -> Ref:
        name = self.fresh(base)
        self._constant_node(name, value)
        return Ref(name)

    def _constant_node(self, name: str, value: torch.Tensor, location: Location | None = None) -> None:
        """A value known ahead of time: a ``param`` node holding it, and the trainable
        parameters it is computed from (a transposed or normalised weight) under
        :data:`~gradaudit.frontends.patterns.SOURCE`."""
        self.values[name] = value
        params = {"value": value, **{f"{SOURCE}{q}": p for q, p in self.sources.get(name, {}).items()}}
        self.add(Node(name=name, op="param", kind="get_attr", params=params, outputs=[_tensor_meta(value)],
                      location=location))

    def _fold(self, n: torch.fx.Node, packet: str) -> bool:
        """Evaluate ``n`` now when it depends on no input: a constant of the graph."""
        target = n.target
        schema = getattr(target, "_schema", None)
        mutable = schema is not None and schema.is_mutable
        if packet in UNINITIALISED and isinstance(n.meta.get("val"), torch.Tensor):
            val = n.meta["val"]
            self._constant_node(n.name, torch.zeros(val.shape, dtype=val.dtype), stack_location(n.meta.get("stack_trace")))
            return True
        if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
            return False
        if any(a.name not in self.values and a.name not in self.constants for a in n.all_input_nodes):
            return False

        def value(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                v = self.values[a.name] if a.name in self.values else self.constants[a.name]
                # an in-place op (detach_) runs on a copy: parameters and buffers stay as they are
                return v.clone() if mutable and isinstance(v, torch.Tensor) else v
            return a

        try:
            with torch.no_grad():
                result = target(*torch.fx.node.map_aggregate(n.args, value), **torch.fx.node.map_aggregate(n.kwargs, value))
        except Exception:  # cannot run on the real values: propagate it instead
            return False
        sources = {q: p for a in n.all_input_nodes for q, p in self.sources.get(a.name, {}).items()}
        if sources:
            self.sources[n.name] = sources
        if isinstance(result, torch.Tensor):
            self._constant_node(n.name, result, stack_location(n.meta.get("stack_trace")))
        elif has_tensor(result):
            self.values[n.name] = result  # a tuple of constants: its items fold through getitem
        else:
            self.constants[n.name] = result
        return True

    def _plain_mask(self, kwargs: dict) -> dict:
        """A constant attention mask that is all-true or causal is said without a mask."""
        mask = self._value_of(kwargs.get("attn_mask"))
        plain = aten.plain_mask(mask) if mask is not None else None
        if plain == "none":
            return {**kwargs, "attn_mask": None}
        if plain == "causal":
            return {**kwargs, "attn_mask": None, "is_causal": True}
        return kwargs

    # -- the walk ------------------------------------------------------------------------
    def build(self) -> Graph:
        plans = self._layer_calls()
        grouped = set().union(*(p["group"] for p in plans.values())) if plans else set()
        kept = {o for p in plans.values() if p["structure"] != 0 for o in p["outs"] if o}
        self.names = (set(self.fx_nodes) - grouped) | kept
        self._placeholders()
        inside = {p["qualname"] for p in plans.values()}
        outputs: list[str] = []
        for n in self.ep.graph_module.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                refs = torch.fx.node.map_aggregate(n.args[0], self.ref)
                outputs = [r.name for r in iter_refs(refs)]
                continue
            if n.op == "get_attr":  # a tensor the model made during export (torch.tensor(...))
                value = self.ep.graph_module
                for part in str(n.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    self._constant_node(n.name, value)
                else:
                    self.constants[n.name] = value
                continue
            if n.name in plans:
                self._emit_call(plans[n.name])
                continue
            if n.name in grouped:
                continue
            module, _ = self.module_of(n)
            if module is not None and any(module == q or module.startswith(q + ".") for q in inside) and not n.users:
                continue  # a layer's bookkeeping (BatchNorm's num_batches_tracked += 1)
            try:
                self._op(n)
            except _NotLinear:
                self._op_as_is(n)
        return Graph(nodes=self.nodes, frontend="export", input_names=self.inputs, output_refs=outputs,
                     input_args=self.input_args, program=self.ep)

    def _op_as_is(self, n: torch.fx.Node) -> None:
        metas: list = []
        structure = flatten_meta(n.meta.get("val"), metas)
        module, module_type = self.module_of(n)
        self.add(
            Node(
                name=n.name,
                op=aten.packet_name(n.target).rstrip("_"),
                kind="call_function",
                args=torch.fx.node.map_aggregate(n.args, self.ref),
                kwargs=torch.fx.node.map_aggregate(n.kwargs, self.ref),
                fn=aten.out_of_place(n.target),
                outputs=metas,
                structure=structure,
                module=module,
                module_type=module_type,
                location=stack_location(n.meta.get("stack_trace")),
            )
        )


class _NotLinear(Exception):
    """``addmm`` with a computed matrix: kept as the ATen op."""


def _arg_name(path: tuple, positional: list[str]) -> tuple[str, str]:
    """(call key, node name) of an input leaf: ``(SequenceKey(0), SequenceKey(1), ...)``
    is positional argument 1, ``(SequenceKey(1), MappingKey('mask'), ...)`` keyword
    ``mask``; deeper parts add ``_i`` / ``_key``."""
    head, arg, *rest = path
    if getattr(head, "idx", None) == 0:
        i = arg.idx
        key = str(i)
        name = positional[i] if i < len(positional) else f"input_{i}"
    else:
        key = name = str(getattr(arg, "key", arg))
    for part in rest:
        name += "_" + str(getattr(part, "idx", getattr(part, "key", getattr(part, "name", part))))
    return key, re.sub(r"\W", "_", name)


def _path_to(structure: Any, leaf: int, prefix: tuple = ()) -> tuple:
    if isinstance(structure, int):
        return prefix if structure == leaf else None
    for i, s in enumerate(structure):
        found = _path_to(s, leaf, prefix + (i,))
        if found is not None:
            return found
    return None


def _sub(structure: Any, path: tuple) -> Any:
    for i in path:
        structure = structure[i]
    return structure


__all__ = ["capture", "leaf_modules", "stack_location", "training_mode"]
