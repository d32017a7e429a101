"""The gradient probe: real forward/backward passes that measure what was predicted.

Each draw runs the user's model once forward and once backward in training mode, as
training runs (BatchNorm uses batch statistics, dropout is active; the modes are restored
afterwards), with the loss of DESIGN.md

    L = sum over every floating output y of <y, g>,   g ~ N(0, 1) drawn per element,

and measures at every layer of the report (calls of modules owning parameters)

    act_rms  = sqrt(E[y^2])           over the node's output elements,
    grad_rms = sqrt(E[(dL/dy)^2])     over the same elements,

second moments averaged over draws, plus the RMS of the layer's weight gradient and
||dL/dW|| / ||W||: the numbers the prediction is compared with. With the user's
``loss_fn`` and batches (:mod:`~gradaudit.probe.loss`), one more draw per batch
differentiates that loss instead, for the same per-layer figures and the global gradient
norm in the user's units. Buffers, modes and RNG states are restored by
:func:`gradaudit.state.preserved`.

Where things are: the graph walk is :mod:`~gradaudit.probe.runner`, what one draw keeps
:mod:`~gradaudit.probe.recording`, the result :mod:`~gradaudit.probe.result`, predicted
vs measured :mod:`~gradaudit.probe.agreement`, dead and saturated units
:mod:`~gradaudit.probe.units`, NaN/Inf localisation :mod:`~gradaudit.probe.nonfinite`,
reduced precision :mod:`~gradaudit.probe.precision`, the device
:mod:`~gradaudit.probe.device`, the user's own loss :mod:`~gradaudit.probe.loss`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from gradaudit.errors import CaptureError, ConfigError
from gradaudit.probe.agreement import agreement, input_rms
from gradaudit.probe.device import on_device, resolve_device
from gradaudit.probe.loss import LossMeasure, describe, scalar_loss, to_device
from gradaudit.probe.recording import DrawRecord, sums_of_squares
from gradaudit.probe.result import LayerMeasure, ProbeResult
from gradaudit.probe.runner import Runner, graph_module
from gradaudit.progress import progress

#: Base seed of the draws: draw d seeds torch with SEED + d (dropout masks) and draws g
#: from a generator seeded with SEED + d.
SEED = 20130617


def probe(
    model,
    inputs: tuple,
    analysis,
    *,
    draws: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    settings: Any = None,
    loss_fn: Callable | None = None,
    loss_batches: list[tuple[tuple, Any]] | None = None,
) -> ProbeResult:
    """Measure ``analysis``'s layers on the real model; leave the model as found.

    ``loss_batches``: ``(model inputs, batch)`` per draw with the user's ``loss_fn``."""
    from gradaudit.probe.precision import DTYPES, autocast_dtype, check_precision
    from gradaudit.state import preserved

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ConfigError(f"--draws must be a positive integer (got {draws!r})")
    device = resolve_device(device)
    reduced = autocast_dtype(dtype)
    graph = analysis.graph
    layer_nodes = analysis.layers()
    layers = {n.name: n.module for n in layer_nodes}
    from gradaudit.propagation.engine import ACTIVATIONS

    from gradaudit.frontends.signature import ExampleCall

    call = ExampleCall.of(inputs)
    acts = {n.name: n.op for n in graph if n.op in ACTIVATIONS}
    result_layers = {n.name: LayerMeasure(n.name, n.module) for n in layer_nodes}
    with preserved(model), on_device(model, device):
        model.train()  # as training runs: batch statistics in BatchNorm, dropout active
        if graph.frontend == "fx":  # replay the traced graph node by node
            import torch.fx as fx

            gm = graph.program if isinstance(graph.program, fx.GraphModule) else graph_module(model)
            runner = Runner(model, gm, graph, layers, acts, settings)
            feed = lambda given: placeholder_values(model, given)  # noqa: E731
        else:  # the model's own forward, observed at its layers
            from gradaudit.probe.modules import ModuleRunner

            acts = {n.name: n.op for n in graph if n.op in ACTIVATIONS and n.kind == "call_module"}
            runner = ModuleRunner(model, graph, layers, acts, settings)
            feed = ExampleCall.of
        inputs = feed(call)
        notes: list[str] = []
        grad_norms: list[float] = []
        units = []
        first_draw: DrawRecord | None = None
        seconds = []
        finite = True
        with progress(draws, "probe: forward/backward draws") as step:
            for d in range(draws):
                kwargs = dict(seed=SEED + d, device=device, autocast_dtype=reduced, units=(d == 0), cosine=(d == 0))
                try:
                    rec = runner.run(
                        inputs, check_all=(d == 0 and reduced is not None), zeros=(d == 0 and reduced is not None), **kwargs
                    )
                except CaptureError:
                    # the forward raised: when a non-finite value came first, that is the finding
                    rec = runner.run(inputs, check_all=True, zeros=reduced is not None, **kwargs)
                seconds.append(rec.seconds)
                if d == 0:
                    first_draw = rec
                    units = rec.units
                finite = finite and rec.finite
                grad_norms.append(rec.grad_norm)
                _accumulate(result_layers, rec, runner, d == 0)
                step()
        nonfinite = None
        if first_draw is not None and (first_draw.first_forward or first_draw.first_backward):
            nonfinite = first_draw.first_forward or first_draw.first_backward
        elif not finite:
            loc = runner.run(inputs, seed=SEED, device=device, autocast_dtype=reduced, check_all=True)
            nonfinite = loc.first_forward or loc.first_backward
            if nonfinite is None:
                notes.append("non-finite values were measured but a checked re-run found none (nondeterministic op?)")
        precision = None
        if reduced is not None:
            reference = runner.run(inputs, seed=SEED, device=device, autocast_dtype=None, check_all=True, zeros=True)
            precision = check_precision(first_draw, reference, dtype, reduced, runner, settings)
            if nonfinite is not None and reference.first_forward is None and reference.first_backward is None:
                nonfinite.cause = "overflow"
        measured_loss = None
        if loss_fn is not None and loss_batches:
            pairs = [(feed(ExampleCall.of(given)), batch) for given, batch in loss_batches]
            measured_loss = _loss_draws(runner, loss_fn, pairs, layer_nodes, device, reduced)
            notes.append(
                f"{measured_loss.name}(output, batch) on {len(loss_batches)} draw(s) "
                f"({'one batch each' if measured_loss.several else 'one batch'}): gradient norms in your loss's units"
            )
        on = "CUDA" if device.startswith("cuda") else "CPU"
        notes.append(
            f"{draws} draw(s) on {on}, {'autocast ' + dtype if reduced is not None else 'float32'}; "
            "L = sum over floating outputs of <y, g>, g ~ N(0, 1)"
        )
    result = ProbeResult(
        draws=draws,
        device=device,
        dtype=dtype,
        layers=result_layers,
        grad_norms=grad_norms,
        units=units,
        nonfinite=nonfinite,
        precision=precision,
        seconds_per_draw=sorted(seconds)[len(seconds) // 2] if seconds else 0.0,
        notes=notes,
        loss=measured_loss,
    )
    result.inputs = input_rms(analysis, call)
    result.agreement = agreement(analysis, result)
    return result


def placeholder_values(model, call) -> list:
    """The values of the fx graph's placeholders: the call's tensor arguments, bound to
    ``forward``'s parameters, in signature order (constants are baked into the graph)."""
    from gradaudit.frontends.signature import BindError, bind

    try:
        return [b.value for b in bind(model, call) if b.is_input]
    except BindError as exc:
        raise CaptureError(str(exc)) from exc


def _loss_draws(runner: Runner, loss_fn: Callable, pairs: list, layer_nodes, device: str, reduced) -> LossMeasure:
    """One draw per ``(inputs, batch)`` differentiating ``loss_fn(output, batch)``."""
    distinct = len({id(b) for _, b in pairs})
    measure = LossMeasure(
        describe(loss_fn), {n.name: LayerMeasure(n.name, n.module) for n in layer_nodes},
        batches=distinct, several=distinct > 1,
    )
    with progress(len(pairs), "probe: draws with your loss") as step:
        for d, (inputs, batch) in enumerate(pairs):
            on_device_batch = to_device(batch, device)
            rec = runner.run(
                inputs, seed=SEED + d, device=device, autocast_dtype=reduced,
                loss=lambda outputs: scalar_loss(loss_fn, outputs, on_device_batch),
            )
            measure.values.append(rec.loss if rec.loss is not None else float("nan"))
            measure.grad_norms.append(rec.grad_norm)
            measure.grad_absmax.append(rec.grad_absmax if rec.grad_absmax is not None else float("nan"))
            _accumulate(measure.layers, rec, runner, d == 0)
            step()
    return measure


def _accumulate(layers: dict[str, LayerMeasure], rec: DrawRecord, runner: Runner, first: bool) -> None:
    for name, m in layers.items():
        if name in rec.act_sq:
            m.act_sq += rec.act_sq[name]
            m.draws += 1
        if name in rec.grad_sq:
            m.grad_sq += rec.grad_sq[name]
            m.grad_draws += 1
        if name in rec.weight_grad_sq:
            m.weight_grad_sq = (m.weight_grad_sq or 0.0) + rec.weight_grad_sq[name]
        if first:
            ps = [p for p in runner.layer_params.get(name, []) if p.requires_grad]
            m.weight_numel = sum(p.numel() for p in ps)
            m.weight_sq = sum(sums_of_squares(ps)) if ps else None
            c = rec.cosine.get(name)
            m.input_batch_cosine = c if c is not None and math.isfinite(c) else None
