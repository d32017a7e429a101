"""The probe's runner for graphs it cannot replay: the model's own forward, observed at its
layers with module hooks.

The fx runner (:class:`gradaudit.probe.gradients.Runner`) replays the traced graph node
by node. A graph from ``torch.export`` or the hook capture cannot be replayed that way,
and when no capture worked at all there is no graph: then the model is simply called
(``model(*args, **kwargs)``, training mode), and forward hooks on its layers (the leaf
modules the fx frontend keeps whole) read each call's output and put a gradient hook on
it. A layer called twice is two observation points, matched to the graph's nodes by
call order. What it measures per point is what the fx runner measures per node; NaN
localisation and dead/saturated units work at the same module granularity (a
functional ``F.relu`` between layers is not observed here).

:func:`module_graph` builds the graph of those observation points alone (no edges, no
predictions) for an audit whose static capture failed: the probe still measures, the
prediction is unavailable.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from gradaudit.errors import CaptureError
from gradaudit.probe.device import seed_draw
from gradaudit.probe.inputs import first_line
from gradaudit.frontends.patterns import SOURCE
from gradaudit.probe.runner import hook_checked, hook_gradient, layer_parameters

def _leaves_of(model) -> dict:
    """{module: qualified name} of the layers (the fx frontend's leaf modules)."""
    from gradaudit.frontends.export import leaf_modules

    return {model.get_submodule(q) if q else model: q for q in leaf_modules(model)}


def module_graph(model, call):
    """The calls of the model's layers in one forward pass, as graph nodes (op, module,
    parameters and output shapes; no edges). Raises :class:`CaptureError` when the
    forward fails."""
    import torch

    from gradaudit.frontends.export import training_mode
    from gradaudit.frontends.fx import _module_op, _tensor_meta, module_params
    from gradaudit.frontends.outputs import flatten_outputs
    from gradaudit.ir import Graph, Node
    from gradaudit.state import preserved

    leaves = _leaves_of(model)
    nodes: list = []
    counts: dict[str, int] = {}

    def hook(mod, _args, out):
        q = leaves[mod]
        k = counts.get(q, 0)
        counts[q] = k + 1
        tensors, _ = flatten_outputs(out)
        base = (q or type(mod).__name__.lower()).replace(".", "_")
        nodes.append(
            Node(name=base if not k else f"{base}_{k}", op=_module_op(mod), kind="call_module", fn=mod, module=q or None,
                 module_type=type(mod).__name__, params=module_params(mod),
                 outputs=[_tensor_meta(t) for t in tensors] or [None], structure=0 if len(tensors) <= 1 else tuple(range(len(tensors))))
        )

    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with preserved(model), training_mode(model), torch.no_grad():
            call(model)
    except Exception as exc:
        from gradaudit.frontends.fx import exception_location

        loc = exception_location(exc)
        where = f" at {loc}" if loc else ""
        raise CaptureError(f"running the model on the example inputs failed{where}: {first_line(exc)}", location=loc) from exc
    finally:
        for h in handles:
            h.remove()
    return Graph(nodes=nodes, frontend="none")


#: The functions through which a functional layer multiplies by its weight.
_LAYER_CALLS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "embedding",
    "matmul", "mm", "addmm", "einsum", "__matmul__", "__rmatmul__",
})


def _functional_calls(functional: dict[int, list[str]], observe) -> Any:
    """A torch function mode that hands each output of a call reading one of the
    parameters in ``functional`` (``id(parameter)`` -> layer node names, in execution
    order) to ``observe(node name, output)``: the n-th such call is the n-th node.

    A weight computed from parameters alone (``self.conv1d.weight.unsqueeze(1)``, a weight
    norm's ``g * v / |v|``) is followed from its parameters: the output of any other call
    whose tensor arguments are all parameters or such weights reads the parameters they
    read, so the layer call that multiplies by it is seen as reading them too."""
    import torch.nn as nn
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    seen: dict[int, int] = {}
    derived: dict[int, tuple[Any, int | None]] = {}  # id(computed weight) -> (it, id(a parameter in functional) or None)

    def source(a) -> tuple[bool, int | None]:
        """(whether ``a`` is computed from parameters alone, the key it reads)."""
        if isinstance(a, nn.Parameter):
            return True, id(a) if id(a) in functional else None
        held = derived.get(id(a))
        return (True, held[1]) if held is not None and held[0] is a else (False, None)

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in tree_leaves((args, kwargs or {})) if hasattr(a, "requires_grad")]
            sources = [source(a) for a in tensors]
            keys = [k for _, k in sources if k is not None]
            if getattr(func, "__name__", None) in _LAYER_CALLS:
                if keys:
                    k = seen.get(keys[0], 0)
                    seen[keys[0]] = k + 1
                    if k < len(functional[keys[0]]):
                        observe(functional[keys[0]][k], out)
            elif tensors and all(weight for weight, _ in sources):
                for o in tree_leaves(out):
                    if hasattr(o, "requires_grad"):
                        derived[id(o)] = (o, keys[0] if keys else None)
            return out

    return Calls()


class ModuleRunner:
    """Runs ``model(*args, **kwargs)`` and observes the calls of its layers.

    Same interface as the fx :class:`~gradaudit.probe.gradients.Runner`: ``layers`` maps
    layer node names to module names, ``acts`` activation node names to their op,
    ``run`` returns a :class:`~gradaudit.probe.gradients.DrawRecord`.
    """

    def __init__(self, model, ir_graph, layers: dict[str, str | None], acts: dict[str, str], settings: Any) -> None:
        self.model = model
        self.ir = ir_graph
        self.layers = layers
        self.acts = acts
        self.settings = settings
        self.leaves = _leaves_of(model)
        # (module, call index) -> node name, for every module call the graph holds
        self.points: dict[tuple[str, int], str] = {}
        counts: dict[str, int] = {}
        self.nodes = []
        for n in ir_graph:
            if n.kind != "call_module":
                continue
            q = n.module or ""
            k = counts.get(q, 0)
            counts[q] = k + 1
            self.points[(q, k)] = n.name
            self.nodes.append(n)
        self.all_params = list(model.parameters())
        self.layer_params = {name: layer_parameters(ir_graph[name]) for name in layers}
        # functional layers (F.linear(x, self.weight), x @ W, a weight computed from
        # parameters): id(the parameter their weight is or is computed from) -> their node
        # names in execution order, seen through the calls that read it
        self.functional: dict[int, list[str]] = {}
        for name in layers:
            n = ir_graph[name]
            weight = n.params.get("weight")
            sources = [p for key, p in n.params.items() if key.startswith(SOURCE)]
            if n.kind != "call_module" and any(p is weight for p in self.layer_params[name]):
                self.functional.setdefault(id(weight), []).append(name)
            elif n.kind != "call_module" and sources:
                self.functional.setdefault(id(sources[0]), []).append(name)
        self.conv_fed = {n.name for n in self.nodes if _after_conv(ir_graph, n)}

    def _ir_node(self, name: str):
        try:
            return self.ir[name]
        except KeyError:
            return None

    def run(self, call, *, seed: int, device: str, autocast_dtype=None, units: bool = False, check_all: bool = False,
            zeros: bool = False, cosine: bool = False, loss=None):
        """One draw; differentiates ``loss(outputs)`` when given, else L = sum <y, g>."""
        import torch

        from gradaudit.frontends.outputs import flatten_outputs
        from gradaudit.probe.nonfinite import NonFinite, _kind, tensor_summary
        from gradaudit.probe.recording import DrawRecord
        from gradaudit.probe.recording import batch_cosine as _batch_cosine
        from gradaudit.probe.recording import grab as _grab
        from gradaudit.probe.recording import order as _order
        from gradaudit.probe.recording import sumsq as _sumsq
        from gradaudit.probe.runner import finish_draw, reduce_draw

        rec = DrawRecord()
        started = time.perf_counter()
        gen = seed_draw(seed, device)
        leaves: list = []
        params = [p for p in self.all_params if p.requires_grad]

        def prepare(t):
            # inputs need no gradient when parameters carry one: layer outputs require
            # grad through the parameters (and models that set requires_grad on their
            # input, as Wav2Vec2's feature encoder does, need an input that is a leaf)
            t = t.detach().to(device)
            if t.is_floating_point() and not params:
                t = t.clone().requires_grad_(True)
                leaves.append(t)
            return t

        live = call.map(prepare)
        counts: dict[str, int] = {}
        pending: list[tuple[str, Any, int]] = []
        grad_slots: dict[str, Any] = {}
        backward_order: list = []
        hooks: list = []
        inputs_of: dict[str, Any] = {}

        def pre(mod, args):
            name = self.points.get((self.leaves[mod], counts.get(self.leaves[mod], 0)))
            if name is None:
                return
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if units and name in self.acts and first is not None:
                self._saturation(name, first, rec)
            if cosine and name in self.layers and first is not None:
                rec.cosine[name] = _batch_cosine(first)
            if check_all:
                inputs_of[name] = args

        def post(mod, _args, out):
            q = self.leaves[mod]
            k = counts.get(q, 0)
            counts[q] = k + 1
            name = self.points.get((q, k))
            if name is None:
                return
            tensors, _ = flatten_outputs(out)
            floats = [t for t in tensors if t.is_floating_point()]
            if check_all:
                for t in floats:
                    d = t.detach()
                    if not d.numel():
                        continue
                    fin = torch.isfinite(d)
                    rec.out_dtype[name] = str(d.dtype).replace("torch.", "")
                    amax = float(d[fin].abs().max()) if bool(fin.any()) else float("nan")
                    rec.absmax[name] = max(rec.absmax.get(name, 0.0), amax) if math.isfinite(amax) else amax
                    if not bool(fin.all()) and rec.first_forward is None:
                        rec.first_forward = self._nonfinite("forward", name, inputs_of.get(name, ()), d, NonFinite, tensor_summary, _kind)
                    if t.requires_grad:
                        slots = grad_slots if name in self.layers else None
                        hook_checked(t, _order(backward_order, name, slots, zeros),
                                     None if slots is None else _grab(slots, name, zeros), hooks)
            if units and name in self.acts and floats:
                self._dead(name, floats[0], rec)
            if name in self.layers and floats:
                out0 = floats[0]
                pending.append((name, _sumsq(out0), out0.numel()))
                if out0.requires_grad and not check_all:
                    hook_gradient(out0, _grab(grad_slots, name, zeros), hooks)

        def observe_layer(name, out):
            if name not in self.layers or not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            pending.append((name, _sumsq(out), out.numel()))
            if out.requires_grad:
                grab = _order(backward_order, name, grad_slots, zeros) if check_all else _grab(grad_slots, name, zeros)
                hook_gradient(out, grab, hooks)

        handles = []
        for mod in self.leaves:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        calls = _functional_calls(self.functional, observe_layer) if self.functional else contextlib.nullcontext()
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        grads: Any = []
        outs: list = []
        try:
            with torch.enable_grad(), ctx:
                try:
                    with calls:
                        outputs = live(self.model)
                except Exception as exc:
                    if rec.first_forward is not None:  # non-finite values made a later op fail
                        rec.finite = False
                        rec.seconds = time.perf_counter() - started
                        return rec
                    raise CaptureError(f"the probe's forward failed: {first_line(exc)}") from exc
                tensors, _ = flatten_outputs(outputs)
                outs = [y for y in tensors if y.is_floating_point()]
                if loss is not None:
                    value = loss(outputs)
                    rec.loss = float(value.detach())
                    grads = torch.autograd.grad(value, params + leaves, allow_unused=True)
                else:
                    ys = [y for y in outs if y.requires_grad]
                    cots = [torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype)
                            for y in ys]
                    if ys:
                        grads = torch.autograd.grad(ys, params + leaves, cots, allow_unused=True)
        finally:
            for h in handles + hooks:
                h.remove()
        reduce_draw(rec, pending, grad_slots, params, grads, self.layer_params, zeros, loss is not None)
        if check_all and rec.first_forward is None:
            first = next((name for name, finite, _ in backward_order if not finite), None)
            if first is not None:
                g = next(g for name, finite, g in backward_order if name == first and not finite)
                rec.first_backward = self._nonfinite("backward", first, (), g, NonFinite, tensor_summary, _kind, gradient_of=first)
        return finish_draw(rec, outs, started)

    def _nonfinite(self, phase, name, args, t, NonFinite, tensor_summary, _kind, gradient_of=None):
        node = self._ir_node(name)
        ins = [s for k, a in enumerate(args) if (s := tensor_summary(f"arg{k}", a))]
        weights = []
        if node is not None and node.fn is not None and hasattr(node.fn, "named_parameters"):
            weights = [s for pn, p in node.fn.named_parameters() if (s := tensor_summary(f"{node.module}.{pn}", p))]
        return NonFinite(
            phase=phase, node=name, op=node.op if node is not None else "module",
            module=node.module if node is not None else None,
            location=node.location.to_json() if node is not None and node.location else None,
            value=_kind(t), inputs=ins, weights=weights, gradient_of=gradient_of,
            dtype=str(t.dtype).replace("torch.", ""),
        )

    def _saturation(self, name: str, x, rec) -> None:
        from gradaudit.probe.thresholds import threshold
        from gradaudit.probe.units import SATURATING, UnitStats

        op = self.acts[name]
        x = x.detach()
        if op not in SATURATING or not x.is_floating_point() or x.numel() == 0:
            return
        count = int((x.abs() >= threshold(self.settings, "saturation_abs")).sum())
        rec.units.append(UnitStats(name, op, "saturated", count / x.numel(), x.numel(), count))

    def _dead(self, name: str, y, rec) -> None:
        from gradaudit.probe.thresholds import threshold
        from gradaudit.probe.units import ZERO_REGION, UnitStats

        op = self.acts[name]
        y = y.detach()
        if op not in ZERO_REGION or y.dim() < 2:
            return
        unit_dim = 1 if (y.dim() >= 4 or name in self.conv_fed) else y.dim() - 1
        zero = (y == 0).movedim(unit_dim, 0).reshape(y.shape[unit_dim], -1).float().mean(dim=1)
        dead = int((zero >= threshold(self.settings, "dead_fraction")).sum())
        rec.units.append(UnitStats(name, op, "dead", dead / max(int(zero.numel()), 1), int(zero.numel()), dead))


def _after_conv(graph, node) -> bool:
    """Whether ``node``'s input comes (through norms and adds) from a convolution."""
    cur, seen = node, 0
    while seen < 5:
        ins = [graph[n] for n in cur.inputs]
        if not ins:
            return False
        cur = ins[0]
        if cur.op in ("conv", "conv_transpose") or cur.op.startswith("conv"):
            return True
        if cur.op not in ("batch_norm", "group_norm", "instance_norm", "add", "dropout", "identity", "getitem"):
            return False
        seen += 1
    return False


__all__ = ["ModuleRunner", "module_graph"]
