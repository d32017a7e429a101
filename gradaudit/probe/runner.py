"""The probe's runner: the model's fx graph, run node by node, observing chosen nodes.

The run walks the torch.fx graph of the audit (the same trace, the same node names, the
same module objects; nothing is copied), so every node — functional ``torch.log`` as well
as ``nn.Linear`` — can be observed; observation is a forward read of the output and a
tensor hook for its gradient. Gradients are taken with ``torch.autograd.grad``, so no
``.grad`` is written. Values are freed after their last use, as in ``model(x)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from gradaudit.errors import CaptureError
from gradaudit.ir import in_place
from gradaudit.probe.device import seed_draw
from gradaudit.probe.inputs import first_line
from gradaudit.probe.nonfinite import check_forward, first_backward
from gradaudit.probe.recording import (
    DrawRecord,
    absmax,
    batch_cosine,
    grab,
    leaves,
    order,
    sums_of_squares,
    sumsq,
)
from gradaudit.probe.units import count_dead, count_saturated

_STOP = object()

#: Most layer-output elements a draw holds to reduce them together (16 MB of float32,
#: as much again for their gradients).
HELD_NUMEL = 1 << 22


def graph_module(model):
    """The model traced with the audit's tracer: same leaves, same node names, and the
    model's own submodules (no copy)."""
    import torch.fx as fx

    from gradaudit.frontends.fx import _Tracer

    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # the static audit traced it already; defensive
        raise CaptureError(f"the probe could not trace the model: {exc}") from exc
    return fx.GraphModule(tracer.root, graph)


def layer_parameters(node, module=None) -> list:
    """The parameters whose gradients are a layer's weight gradient: those of the module
    it calls, or for a functional layer (``F.linear(x, self.weight)``) the ones it reads."""
    import torch.nn as nn

    if node is not None and node.kind != "call_module":
        return [p for p in node.params.values() if isinstance(p, nn.Parameter)]
    module = module if module is not None else getattr(node, "fn", None)
    return list(module.parameters()) if isinstance(module, nn.Module) else []


def whole_base(t):
    """The tensor ``t`` is a view of, when the view covers all of it (None otherwise).

    A layer's output can be a view: ``nn.Linear`` on an input of more than two
    dimensions returns its matrix product reshaped. An in-place op on it later
    (``ReLU(inplace=True)``) rewrites the view's autograd history, and a gradient hook
    registered on the view before never fires; one on its base still does, with the
    same values (the gradient of the value before the in-place op). The view's own
    hook runs first when it fires (the view's backward feeds the base's), and the
    gradient hooks keep the first gradient that arrives (:func:`grab`), so the base's
    stands in only where the view's was lost."""
    base = t._base if t._is_view() else None
    if base is None or base.numel() != t.numel() or not base.requires_grad:
        return None
    return base


def hook_gradient(t, hook, hooks: list) -> None:
    """Put the gradient ``hook`` on layer output ``t``, and on its base when ``t`` is a
    view of all of it (:func:`whole_base`; Wav2Vec2 writes its masked frames into its
    projection's output in place, through a dropout of p = 0 that returns its input)."""
    hooks.append(t.register_hook(hook))
    if (base := whole_base(t)) is not None:
        hooks.append(base.register_hook(hook))


def hook_checked(t, order_hook, grab_hook, hooks: list) -> None:
    """A checked run's hooks on output ``t``: ``order_hook`` (the backward's order and
    finiteness, reducing the gradient of a layer), and ``grab_hook`` on its base when
    ``t`` is a view of all of it (:func:`whole_base`; None: not a layer)."""
    hooks.append(t.register_hook(order_hook))
    if grab_hook is not None and (base := whole_base(t)) is not None:
        hooks.append(base.register_hook(grab_hook))


def held_wrt(held: list | None) -> list:
    """The held layer outputs a gradient is taken for (those that require one)."""
    return [t for _, t in held or () if t.requires_grad]


def reduce_draw(rec: DrawRecord, pending: list, grad_slots: dict, params: list, grads, layer_params: dict,
                zeros: bool, with_loss: bool = False, held: list | None = None) -> None:
    """Turn one draw's observations into second moments: each layer's output (``pending``:
    its 2-norm and size) and gradient (``grad_slots``), the weight gradients of each
    layer's parameters, the total gradient norm (and, for a user's loss, the largest
    gradient entry). ``held`` layer outputs (their gradients follow the parameters' and
    the inputs' in ``grads``) are reduced in the same fused norm as the weight gradients."""
    present = [(p, g) for p, g in zip(params, grads[: len(params)]) if g is not None]
    tail = iter(grads[len(grads) - len(held_wrt(held)) :] if held and grads else ())
    got = [(name, t, g) for name, t in held or [] if t.requires_grad and (g := next(tail, None)) is not None]
    sums = sums_of_squares([g for _, g in present] + [t for _, t in held or []] + [g for _, _, g in got])
    sq_of = dict(zip((id(p) for p, _ in present), sums[: len(present)]))
    rest = sums[len(present) :]
    for (name, t), sq in zip(held or [], rest):
        pending.append((name, math.sqrt(sq), t.numel()))
    for (name, t, _), sq in zip(got, rest[len(held or []) :]):
        grad_slots[name] = (math.sqrt(sq), t.numel(), None)
    for name, norm, numel in pending:
        rec.act_sq[name] = float(norm) ** 2 / max(numel, 1)
    for name, (norm, numel, zero) in grad_slots.items():
        rec.grad_sq[name] = float(norm) ** 2 / max(numel, 1)
        if zero is not None:
            rec.grad_zero[name] = int(zero)
    norm_sq = sum(sq_of.values())
    rec.grad_norm = math.sqrt(norm_sq) if math.isfinite(norm_sq) else float("nan")
    if with_loss:
        rec.grad_absmax = absmax([g for _, g in present])
    pgrad = {id(p): g for p, g in present} if zeros else {}
    for name, ps in layer_params.items():
        own = [id(p) for p in ps if id(p) in sq_of]
        if own:
            rec.weight_grad_sq[name] = sum(sq_of[i] for i in own)
            if zeros:
                rec.weight_grad_zero[name] = sum(int((pgrad[i] == 0).sum()) for i in own)


def finish_draw(rec: DrawRecord, outs: list, started: float) -> DrawRecord:
    """Whether everything the draw measured is finite; its duration."""
    import torch

    values = list(rec.act_sq.values()) + list(rec.grad_sq.values()) + [rec.grad_norm]
    rec.finite = all(math.isfinite(v) for v in values) and all(bool(torch.isfinite(y).all()) for y in outs)
    if rec.first_forward is not None or rec.first_backward is not None:
        rec.finite = False
    rec.seconds = time.perf_counter() - started
    return rec


class Runner:
    """Runs the fx graph of a model node by node, observing chosen nodes.

    ``layers`` maps layer node names to their module names; ``acts`` maps activation node
    names to their op. The runner calls the model's own submodules and functions, so
    forward hooks, backward hooks and in-place ops behave as in ``model(x)``.
    """

    def __init__(self, model, gm, ir_graph, layers: dict[str, str | None], acts: dict[str, str], settings: Any) -> None:
        self.model = model
        self.gm = gm
        self.ir = ir_graph
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.layers = layers
        self.acts = acts
        self.settings = settings
        self.conv_inputs = {
            n.name for n in self.nodes if any(self.ir_op(getattr(a, "name", "")) == "conv" for a in n.all_input_nodes)
        }
        last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a.name] = i
        self.free_after: dict[int, list[str]] = {}
        for name, i in last_use.items():
            self.free_after.setdefault(i, []).append(name)
        self.all_params = list(model.parameters())
        self._program = None  # the compiled, observing forward (:meth:`_run_compiled`)
        self._draw = None
        # layer outputs and their gradients may be held to the end of a draw and reduced
        # together (one fused norm each way) when nothing overwrites a value in place and
        # they are small; else each is reduced as it passes
        held = sum(math.prod(m.shape) for m in (self.ir_node(n) for n in layers) if m is not None and m.shape is not None)
        self._batchable = held <= HELD_NUMEL and not any(in_place(n) for n in ir_graph)
        # the parameters of each layer module (a module called twice shares them)
        self.layer_params: dict[str, list] = {}
        for node_name, mod_name in layers.items():
            mod = self.modules.get(mod_name) if mod_name is not None else None
            self.layer_params[node_name] = layer_parameters(self.ir_node(node_name), mod)

    def ir_op(self, name: str) -> str | None:
        node = self.ir_node(name)
        return node.op if node is not None else None

    def ir_node(self, name: str):
        """The IR node of an fx node name (None for nodes the IR does not keep)."""
        try:
            return self.ir[name]
        except KeyError:
            return None

    # ---------------------------------------------------------------------------------
    def run(
        self,
        inputs: tuple,
        *,
        seed: int,
        device: str,
        autocast_dtype=None,
        units: bool = False,
        check_all: bool = False,
        zeros: bool = False,
        cosine: bool = False,
        loss=None,
    ) -> DrawRecord:
        """One draw. ``check_all`` checks every node's output (forward) and gradient
        (backward) for non-finite values and records abs-max and dtype per node.

        The draw differentiates ``loss(outputs)`` (a scalar tensor) when given, else
        DESIGN.md's L = sum <y, g> with g ~ N(0, 1) drawn from a generator seeded ``seed``."""
        import torch
        import torch.fx as fx

        rec = DrawRecord()
        started = time.perf_counter()
        gen = seed_draw(seed, device)
        from gradaudit.frontends.signature import map_tensors

        input_leaves = []

        def prepare(x):
            x = x.detach().to(device)
            if x.is_floating_point():
                x = x.clone().requires_grad_(True)
                input_leaves.append(x)
            return x

        args_in = [map_tensors(x, prepare) for x in inputs]
        params = [p for p in self.all_params if p.requires_grad]
        pending: list[tuple[str, Any, int]] = []  # (layer node, 2-norm of its output, numel)
        hooks: list = []
        grad_slots: dict[str, Any] = {}
        backward_order: list[tuple[str, bool, Any]] = []
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        outputs = None
        grads: Any = []
        env: dict[str, Any] = {}
        fast = not (units or cosine or check_all)
        held: list | None = [] if fast and self._batchable and not zeros else None
        try:
            with torch.enable_grad(), ctx:
                if fast:
                    try:
                        outputs = self._run_compiled(args_in, pending, hooks, grad_slots, zeros, held)
                    except Exception:  # noqa: BLE001 - run it node by node: that names the node
                        fast, held = False, None
                        for h in hooks:
                            h.remove()
                        hooks.clear(), pending.clear(), grad_slots.clear()
                if not fast:
                    outputs = self._run_nodes(args_in, env, rec, pending, hooks, grad_slots, backward_order, units, cosine, check_all, zeros)
                if outputs is None:
                    rec.finite = False
                    rec.seconds = time.perf_counter() - started
                    return rec
                outs: list = []
                leaves(outputs, outs)
                wrt = params + input_leaves + held_wrt(held)
                if loss is not None:
                    value = loss(outputs)
                    rec.loss = float(value.detach())
                    grads = torch.autograd.grad(value, wrt, allow_unused=True)
                else:
                    ys = [y for y in outs if y.requires_grad]
                    cots = [
                        torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype)
                        for y in ys
                    ]
                    if ys:
                        grads = torch.autograd.grad(ys, wrt, cots, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        reduce_draw(rec, pending, grad_slots, params, grads, self.layer_params, zeros, loss is not None, held)
        if check_all and rec.first_forward is None:
            first_backward(self, backward_order, env, rec)
        return finish_draw(rec, outs, started)

    def _run_nodes(self, args_in, env, rec, pending, hooks, grad_slots, backward_order, units, cosine, check_all, zeros):
        """The forward, node by node (what the first draw and a checked run need: unit
        counts, batch cosines, every node's values checked); the outputs, or None when a
        non-finite value stopped it."""
        import torch.fx as fx

        placeholder = iter(args_in)
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                try:
                    value = next(placeholder)
                except StopIteration:
                    value = n.args[0] if n.args else None
            elif n.op == "output":
                return fx.node.map_arg(n.args[0], lambda a: env[a.name])
            else:
                value = self._step(n, env, rec, units, cosine, check_all)
                if value is _STOP:
                    return None
                # gradient hooks go on right away: a later in-place op (ReLU(inplace=True))
                # must not change which value the hook sees the gradient of
                if check_all:
                    ts: list = []
                    leaves(value, ts)
                    slots = grad_slots if n.name in self.layers else None
                    for t in ts:
                        if t.requires_grad:
                            hook_checked(t, order(backward_order, n.name, slots, zeros),
                                         None if slots is None else grab(slots, n.name, zeros), hooks)
                if n.name in self.layers:  # (a checked run's hooks above already reduce the gradient)
                    self._observe(n.name, value, (pending, None if check_all else hooks, grad_slots, zeros, None))
            env[n.name] = value
            if not check_all:
                for dead in self.free_after.get(i, ()):
                    if dead != n.name:
                        env.pop(dead, None)
        return None

    def _run_compiled(self, args_in, pending, hooks, grad_slots, zeros, held):
        """The forward as the fx graph's generated code with :meth:`_observe` called after
        every layer node (built once): a measuring draw runs at the speed of the model's
        own forward instead of paying an interpreter step per node. On a failure the
        caller runs the forward again node by node, which names the node. With ``held``
        a list, layer outputs are appended to it instead of being reduced and hooked."""
        if self._program is None:
            import torch.fx as fx

            graph = fx.Graph()
            env: dict = {}
            for n in self.gm.graph.nodes:
                env[n] = graph.node_copy(n, lambda a: env[a])
                if n.name in self.layers and n.op not in ("output", "placeholder"):
                    graph.call_function(self._observe, (n.name, env[n]))
            self._program = fx.GraphModule(self.gm, graph)
        self._draw = (pending, hooks, grad_slots, zeros, held)
        try:
            return self._program(*args_in)
        finally:
            self._draw = None

    def _observe(self, name: str, value, draw: tuple | None = None) -> None:
        """Record a layer's output norm and hook its gradient (``hooks`` None: no hook),
        or hold the output (``held`` a list). ``draw`` = (pending, hooks, grad_slots,
        zeros, held); the compiled forward calls it with its draw's (:attr:`_draw`)."""
        import torch

        pending, hooks, grad_slots, zeros, held = draw if draw is not None else self._draw
        out = value[0] if isinstance(value, (tuple, list)) else value
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if held is not None:
                held.append((name, out))
                return
            pending.append((name, sumsq(out), out.numel()))
            if out.requires_grad and hooks is not None:
                hook_gradient(out, grab(grad_slots, name, zeros), hooks)

    # ---------------------------------------------------------------------------------
    def _step(self, n, env, rec: DrawRecord, units: bool, cosine: bool, check_all: bool):
        import torch
        import torch.fx as fx

        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if units and n.name in self.acts:
            count_saturated(self, n, args, rec)
        if cosine and n.name in self.layers and args and isinstance(args[0], torch.Tensor):
            rec.cosine[n.name] = batch_cosine(args[0])
        try:
            value = self._call(n, args, kwargs)
        except Exception as exc:
            if rec.first_forward is not None:
                return _STOP  # non-finite values made a later op fail: report the first
            where = self.ir_node(n.name)
            loc = f" at {where.location}" if where is not None and where.location else ""
            raise CaptureError(f"the probe's forward failed at node '{n.name}'{loc}: {first_line(exc)}") from exc
        if check_all:
            check_forward(self, n, args, value, rec)
        if units and n.name in self.acts:
            count_dead(self, n, value, rec)
        return value

    def _call(self, n, args, kwargs):
        if n.op == "call_module":
            return self.modules[str(n.target)](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(n.target))(*rest, **kwargs)
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise CaptureError(f"the probe cannot run fx node kind {n.op!r}")
