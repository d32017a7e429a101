"""Hook capture: record the call graph of one real forward pass (the last resort).

When neither torch.fx nor torch.export can capture a model (a branch on a tensor's
value, ``if x.sum() > 0:``; outputs export cannot flatten), the model is simply run once
on the example call, in training mode with gradients enabled, and what ran is recorded:

- each call of a standard layer (the leaves the fx frontend keeps: ``nn.Linear``,
  ``nn.LSTM`` ...) is one ``call_module`` node, seen by forward pre/post hooks with its
  real arguments;
- every torch function and Tensor method the model's own code calls between layers
  (``F.gelu``, ``x.view``, ``a + b``) is one node, seen by a ``TorchFunctionMode``;
  nested calls inside those functions are not recorded;
- a module whose output was produced by code the mode cannot see (numpy, C++
  extensions) becomes one opaque ``module`` node: the engine estimates it by local Monte
  Carlo, like any op it has no handler for;
- a custom ``autograd.Function`` is one recorded call, and ``x.register_hook(fn)`` one
  ``gradient_hook`` node that every later use of ``x`` reads
  (:mod:`gradaudit.frontends.functions`): the hook is recorded, not registered.

Dataflow follows tensor identity: a tensor's producer is the node that returned it. A
computation that depends on no floating input (a mask from ``torch.ones``, position ids,
anything derived from integer inputs) is a constant of the graph holding the value it had.
Every branch is the branch the example call took. The model's buffers and RNG states
are restored afterwards (:func:`gradaudit.state.preserved`).
"""

from __future__ import annotations

import linecache
import operator
import os
import sys
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from gradaudit.errors import CaptureError, ModelCallError
from gradaudit.frontends import aten, functions
from gradaudit.frontends.export import leaf_modules, training_mode
from gradaudit.frontends.patterns import SOURCE, UNINITIALISED
from gradaudit.frontends.fx import (_is_internal, _module_op, _tensor_meta, display_path, exception_location,
                                    flatten_meta, module_params, normalise_name)
from gradaudit.frontends.outputs import check_outputs, flatten_outputs
from gradaudit.frontends.signature import BindError, ExampleCall, bind, map_tensors
from gradaudit.ir import Graph, Location, Node, Ref, iter_refs, renumber, structure_leaves
from gradaudit.probe.inputs import first_line
from gradaudit.state import preserved

#: Tensor operator methods -> the op they compute, with its operands in that op's order.
_DUNDER = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__isub__": "sub",
    "__rsub__": "rsub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
    "__itruediv__": "div", "__div__": "div", "__matmul__": "matmul", "__pow__": "pow", "__neg__": "neg",
    "__getitem__": "getitem", "__abs__": "abs",
}
#: The callable computing each of those ops from the operands in that order.
_DUNDER_FN = {"add": torch.add, "sub": torch.sub, "rsub": torch.rsub, "mul": torch.mul, "div": torch.div,
              "matmul": torch.matmul, "pow": torch.pow, "neg": torch.neg, "getitem": operator.getitem,
              "abs": torch.abs}


def _setitem(x, index, value):
    """``x[index] = value`` as a value: a new tensor, the input untouched."""
    y = x.clone()
    y[index] = value
    return y


def _property(prop: str, x: torch.Tensor):
    """(op, fn, args) for the tensor-valued properties ``x.T``, ``x.mT``, ``x.data``."""
    if prop in ("T", "H"):
        return "permute", torch.permute, (x, tuple(reversed(range(x.dim()))))
    if prop in ("mT", "mH"):
        return "transpose", torch.transpose, (x, -2, -1)
    if prop == "data":
        return "detach", torch.detach, (x,)
    return None


class _Recorder(TorchFunctionMode):
    """Runs every torch call as usual and records the ones the model's own code makes."""

    def __init__(self, builder: "_Builder") -> None:
        super().__init__()
        self.b = builder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "register_hook" and len(args) == 2 and not kwargs:
            # a gradient hook in the forward: recorded as an op of the graph, not registered
            if self.b.depth == 0 and not self.b.busy:
                self.b.gradient_hook(*args)
            return functions.NoHandle()
        out = func(*args, **kwargs)
        if self.b.depth == 0 and not self.b.busy:
            self.b.record(func, args, kwargs, out)
        return out


class _Builder:
    """The IR being recorded, and the map from live tensors to the nodes that made them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        self.counts: dict[str, int] = {}
        self.producer: dict[int, tuple[str, tuple]] = {}  # id(tensor) -> (node, leaf path)
        self.keep: list = []  # every recorded tensor stays alive, so ids are never reused
        self.variable: set[str] = set()  # nodes whose value depends on a floating input
        self.leaf_refs: dict[tuple[str, tuple], str] = {}
        self.depth = 0  # > 0 inside a layer call: its inner ops are not recorded
        self.busy = False  # the recorder's own bookkeeping: nothing to record
        self.stack: list[dict] = []  # module calls being executed
        self.qualnames: dict[nn.Module, str] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            self.qualnames.setdefault(m, n)
        self.state: dict[int, tuple[str, torch.Tensor]] = {}
        for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            self.state.setdefault(id(t), (n, t))
        self.calls: dict[str, int] = {}

    # -- names and nodes ---------------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = base.replace(".", "_") or "node"
        k = self.counts.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in self.by_name:
            k += 1
            name = f"{base}_{k}"
        self.counts[base] = k + 1
        return name

    def add(self, node: Node, out: Any, variable: bool) -> None:
        self.nodes.append(node)
        self.by_name[node.name] = node
        if variable:
            self.variable.add(node.name)
        self._produced(node.name, out, ())

    def _produced(self, name: str, out: Any, path: tuple) -> None:
        if isinstance(out, torch.Tensor):
            self.producer[id(out)] = (name, path)
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for i, v in enumerate(out):
                self._produced(name, v, path + (i,))

    def location(self) -> Location | None:
        """The innermost frame of the user's code on the live stack."""
        f = sys._getframe(1)
        while f is not None:
            path = f.f_code.co_filename
            if not _is_internal(path):
                return Location(path=display_path(os.path.abspath(path)), line=f.f_lineno,
                                code=linecache.getline(path, f.f_lineno).strip() or None)
            f = f.f_back
        return None

    def module(self) -> tuple[str | None, str | None]:
        if not self.stack:
            return None, None
        top = self.stack[-1]
        return top["name"] or None, type(top["module"]).__name__

    # -- arguments ---------------------------------------------------------------------
    def arg(self, t: torch.Tensor) -> Any:
        """A tensor argument as a Ref to its producer: a node, a parameter or buffer, or
        (a tensor from nowhere the model's code can reach) a constant."""
        found = self.producer.get(id(t))
        if found is None:
            state = self.state.get(id(t))
            name = self.fresh(state[0] if state else "constant")
            value = t if state else t.detach().clone()
            self.add(Node(name=name, op="param", kind="get_attr", params={"value": value}, outputs=[_tensor_meta(t)],
                          module=state[0] if state else None), t, variable=False)
            found = (name, ())
        name, path = found
        return Ref(self.leaf_ref(name, path) if path else name)

    def sources(self, args: Any) -> dict[str, torch.Tensor]:
        """The trainable parameters that the constants among ``args`` come from, under
        :data:`~gradaudit.frontends.patterns.SOURCE` (a weight transposed or normalised
        in the forward stays the parameters' weight)."""
        found: dict[str, torch.Tensor] = {}
        for ref in iter_refs(args):
            node = self.by_name.get(ref.name)
            if node is None or node.op != "param":
                continue
            value = node.params.get("value")
            if isinstance(value, nn.Parameter) and value.requires_grad:
                found[f"{SOURCE}{node.module or node.name}"] = value
            found.update({k: v for k, v in node.params.items() if k.startswith(SOURCE)})
        return found

    def leaf_ref(self, name: str, path: tuple) -> str:
        """A getitem chain from a tuple-valued node down to one of its leaves."""
        if (name, path) in self.leaf_refs:
            return self.leaf_refs[(name, path)]
        src = name if len(path) == 1 else self.leaf_ref(name, path[:-1])
        node = self.by_name[name]
        sub = node.structure
        for i in path:
            sub = sub[i]
        nm = self.fresh(f"{name}_{'_'.join(map(str, path))}")
        item = Node(name=nm, op="getitem", kind="call_function", fn=operator.getitem, args=(Ref(src), path[-1]),
                    outputs=[node.outputs[i] for i in structure_leaves(sub)], structure=renumber(sub), module=node.module,
                    module_type=node.module_type, location=node.location)
        self.nodes.append(item)
        self.by_name[nm] = item
        if name in self.variable:
            self.variable.add(nm)
        self.leaf_refs[(name, path)] = nm
        return nm

    def refs(self, obj: Any) -> Any:
        return map_tensors(obj, self.arg)

    def depends(self, obj: Any) -> bool:
        return any(r.name in self.variable for r in iter_refs(obj))

    # -- recording -----------------------------------------------------------------------
    def record(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """One call of the model's code: a node, a constant, or nothing (no tensor out)."""
        name = getattr(func, "__name__", None) or str(func)
        if name == "__setitem__":  # x[i] = v: x now holds a new value
            out, (op, fn) = args[0], ("setitem", _setitem)
        elif name == "__get__":
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            spelled = _property(prop, args[0]) if isinstance(out, torch.Tensor) else None
            if spelled is None:
                return
            op, fn, args = spelled
        elif name in _DUNDER:
            op = _DUNDER[name]
            fn = _DUNDER_FN[op]
        elif hasattr(func, "overloadpacket"):
            op, fn = normalise_name(aten.packet_name(func)), aten.out_of_place(func)
        else:
            op, fn = normalise_name(name.strip("_") if name.startswith("__") else name), _out_of_place_method(func, name)
        if not _tensors(out):
            return
        a, k = self.refs(tuple(args)), self.refs(dict(kwargs))
        if op in UNINITIALISED and isinstance(out, torch.Tensor):  # only its shape means anything
            self.add(Node(name=self.fresh(op), op="param", kind="get_attr", params={"value": torch.zeros_like(out)},
                          outputs=[_tensor_meta(out)], location=self.location()), out, variable=False)
            return
        if not self.depends((a, k)):  # depends on no floating input: a constant of the graph
            if isinstance(out, torch.Tensor):
                params = {"value": out.detach().clone(), **self.sources((a, k))}
                self.add(Node(name=self.fresh(op), op="param", kind="get_attr", params=params,
                              outputs=[_tensor_meta(out)], location=self.location()), out, variable=False)
            else:  # a tuple of constants: each item becomes a constant where it is used
                for t in _tensors(out):
                    self.producer.pop(id(t), None)
            return
        if op == "scaled_dot_product_attention":
            k = self._plain_mask(a, k)
        metas: list = []
        structure = flatten_meta(out, metas)
        module, module_type = self.module()
        self.add(Node(name=self.fresh(op), op=op, kind="call_function", fn=fn, args=a, kwargs=k, outputs=metas,
                      structure=structure, location=self.location(), module=module, module_type=module_type),
                 out, variable=True)

    def function(self, cls: type, run, args: tuple, kwargs: dict) -> Any:
        """A custom ``autograd.Function`` applied by the model's code: one recorded call
        (:mod:`gradaudit.frontends.functions`), its inside not recorded."""
        if self.depth or self.busy:
            return run()
        self.depth += 1
        try:
            # an input returned as it is comes out of apply as a new alias: a view of it
            # here is returned by apply itself, so the node is the producer of what follows
            out = map_tensors(run(), lambda t: t.view_as(t) if any(t is a for a in args) else t)
        finally:
            self.depth -= 1
        self.record(functions.target(cls), args, kwargs, out)
        return out

    def gradient_hook(self, t: torch.Tensor, hook) -> None:
        """``t.register_hook(hook)`` in the model's code: a ``gradient_hook`` node that
        every later use of ``t`` reads (:func:`gradaudit.frontends.functions.gradient_hook`)."""
        ref = self.arg(t)
        if ref.name not in self.variable:  # a constant has no gradient to rewrite
            return
        metas: list = []
        structure = flatten_meta(t, metas)
        module, module_type = self.module()
        self.add(Node(name=self.fresh(functions.HOOK_OP), op=functions.HOOK_OP, kind="call_function",
                      fn=functions.gradient_hook, args=(ref, hook), kwargs={}, outputs=metas, structure=structure,
                      location=self.location(), module=module, module_type=module_type), t, variable=True)

    def _plain_mask(self, args: tuple, kwargs: dict) -> dict:
        """A constant attention mask that is all-true or causal is said without a mask."""
        mask = kwargs.get("attn_mask")
        node = self.by_name.get(mask.name) if isinstance(mask, Ref) and len(args) <= 3 else None
        plain = aten.plain_mask(node.params["value"]) if node is not None and node.op == "param" else None
        if plain == "none":
            return {**kwargs, "attn_mask": None}
        if plain == "causal":
            return {**kwargs, "attn_mask": None, "is_causal": True}
        return kwargs

    # -- modules ---------------------------------------------------------------------------
    def pre(self, mod: nn.Module, args: tuple, kwargs: dict, leaf: bool) -> None:
        self.busy = True
        try:
            entry = {"module": mod, "name": self.qualnames.get(mod, ""), "leaf": leaf, "outer": self.depth == 0}
            if entry["outer"]:
                entry["args"], entry["kwargs"] = self.refs(tuple(args)), self.refs(dict(kwargs))
                entry["location"] = self.location()
                entry["start"] = len(self.nodes)
            self.stack.append(entry)
            if leaf:
                self.depth += 1
        finally:
            self.busy = False

    def post(self, mod: nn.Module, out: Any) -> None:
        self.busy = True
        try:
            entry = self.stack.pop()
            if entry["leaf"]:
                self.depth -= 1
            if not entry["outer"]:
                return
            if entry["leaf"]:
                self._call(entry, out, opaque=False)
            elif any(id(t) not in self.producer and id(t) not in self.state for t in _tensors(out) if t.is_floating_point()):
                # code the recorder cannot see made this module's output: one opaque node
                for n in self.nodes[entry["start"]:]:
                    self.by_name.pop(n.name, None)
                del self.nodes[entry["start"]:]
                self._call(entry, out, opaque=True)
        finally:
            self.busy = False

    def _call(self, entry: dict, out: Any, opaque: bool) -> None:
        mod, q = entry["module"], entry["name"]
        metas: list = []
        structure = flatten_meta(out, metas)
        count = self.calls.get(q, 0)
        self.calls[q] = count + 1
        base = (q or type(mod).__name__.lower()) + (f"_{count}" if count else "")
        node = Node(name=self.fresh(base), op="module" if opaque else _module_op(mod), kind="call_module", fn=mod,
                    args=entry["args"], kwargs=entry["kwargs"], module=q or None, module_type=type(mod).__name__,
                    params=module_params(mod), outputs=metas, structure=structure,
                    location=entry["location"])
        self.add(node, out, variable=True)


def _out_of_place_method(func, name: str):
    """``Tensor.add_`` -> ``Tensor.add``: the IR never overwrites a value."""
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


def capture(model: nn.Module, example_inputs: Any) -> Graph:
    """Run ``model`` once on the example call and record its graph; raise
    :class:`CaptureError` when the forward itself fails."""
    call = ExampleCall.of(example_inputs)
    b = _Builder(model)
    leaves = set(leaf_modules(model))
    inputs, input_args = _inputs(b, model, call)
    handles = []
    for q, m in model.named_modules():
        leaf = q in leaves
        handles.append(m.register_forward_pre_hook(lambda mod, a, k, leaf=leaf: b.pre(mod, a, k, leaf), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda mod, a, out: b.post(mod, out)))
    try:
        # with gradients on, as in training: code that branches on x.requires_grad or
        # torch.is_grad_enabled() (a gradient hook registered only when one can be) takes that branch
        with preserved(model), training_mode(model), torch.enable_grad(), _Recorder(b), functions.opaque(b.function):
            out = call(model)
    except Exception as exc:
        loc = exception_location(exc)
        where = f" at {loc}" if loc else ""
        err = CaptureError(f"running the model on the example inputs failed{where}: {first_line(exc)}", location=loc)
        err.inputs_suspect = True
        raise err from exc
    finally:
        for h in handles:
            h.remove()
    tensors, left_out = flatten_outputs(out)
    b.busy = True
    refs = [b.arg(t) for t in tensors]
    graph = Graph(nodes=b.nodes, frontend="hooks", input_names=inputs, output_refs=[r.name for r in refs],
                  input_args=input_args)
    graph.notes.extend(f"output {what} is not a tensor container: it is left out of L" for what in left_out)
    check_outputs(graph, model)
    return graph


def _inputs(b: _Builder, model: nn.Module, call: ExampleCall) -> tuple[list[str], list[str]]:
    """One input node per tensor of the call (nested ones flattened), named after the
    parameter of ``forward`` it binds to; integer and bool inputs are known values."""
    try:
        bound = bind(model, call)
    except BindError as exc:
        raise ModelCallError(str(exc)) from exc
    names, keys = [], []
    for arg in bound:
        if not arg.is_input:
            continue
        leaves = _tensor_paths(arg.value, ())
        for path, t in leaves:
            name = b.fresh(arg.name + "".join(f"_{p}" for p in path))
            node = Node(name=name, op="input", kind="placeholder", outputs=[_tensor_meta(t)])
            b.add(node, t, variable=t.is_floating_point())
            names.append(name)
            keys.append(arg.key)
    return names, keys


def _tensor_paths(v: Any, path: tuple) -> list:
    if isinstance(v, torch.Tensor):
        return [(path, v)]
    if isinstance(v, (tuple, list)):
        return [x for i, item in enumerate(v) for x in _tensor_paths(item, path + (i,))]
    if isinstance(v, dict):
        return [x for k, item in v.items() for x in _tensor_paths(item, path + (k,))]
    return []


def _tensors(out: Any) -> list:
    found: list = []
    map_tensors(out, found.append)
    return found


__all__ = ["capture"]
