"""The gradient over time, measured beside its prediction.

For every recurrent module call and every unrolled loop of cell calls that the analysis
predicted a gradient-over-time curve for (:func:`gradaudit.propagation.over_time.over_time`),
the model's own forward runs on the probe's inputs and the gradient is taken of

    L = <y_T, g>,   g ~ N(0, 1),

the output of the last step only (the top layer's forward direction of a bidirectional
module: the first half of its features), with respect to the input x_t of every step:
the module's input sequence, or the input of each call of a loop. A forward pre-hook
hands each of those calls a detached copy of its input that requires grad, so what is
measured is the recurrence alone, as predicted; graph nodes are matched to module calls
by call order, which works whichever frontend captured the graph. The curve is
RMS(dL/dx_t) over the batch and features, second moments averaged over the draws,
relative to the last step; its per-step gain and horizon are read as the prediction's
(:func:`gradaudit.propagation.over_time.describe`).

Gradients come from ``torch.autograd.grad`` with respect to those copies only: no
parameter's ``.grad`` is written, and the hooks are removed afterwards. The run is in
the model's own dtype, without autocast: the curve is a property of the recurrence, not
of a reduced precision.
"""

from __future__ import annotations

from typing import Any

from gradaudit.probe.device import seed_draw


def measure(model, analysis, call, *, draws: int, device: str, seed: int) -> dict[str, Any]:
    """``{node: Curve}`` for every over-time prediction of ``analysis`` (empty when there
    is none); ``call`` is the probe's :class:`~gradaudit.frontends.signature.ExampleCall`.
    The model is in training mode and on ``device``."""
    import torch

    from gradaudit.propagation.over_time import describe, over_time, tail_gain

    predictions = over_time(analysis)
    if not predictions:
        return {}
    calls = _call_index(analysis)
    wanted = {calls[name]: record for record in predictions for name in (record.nodes or [record.node])}
    sums: dict[str, Any] = {}
    for d in range(draws):
        gen = seed_draw(seed + d, device)
        for key, sq in _one_draw(model, wanted, call, device, gen).items():
            sums[key] = sq if key not in sums else sums[key] + sq
    out = {}
    for key, sq in sums.items():
        rms = (sq / draws).clamp_min(0).sqrt()
        last = float(rms[-1])
        values = [float(v) / last if last > 0 else 0.0 for v in rms]
        out[key] = describe(values, tail_gain(values))
    return out


def _call_index(analysis) -> dict[str, tuple[str, int]]:
    """``{node: (module, k)}``: the k-th call of that module, in the graph's order."""
    counts: dict[str, int] = {}
    out = {}
    for n in analysis.graph:
        if n.kind == "call_module" and n.module is not None:
            k = counts.get(n.module, 0)
            counts[n.module] = k + 1
            out[n.name] = (n.module, k)
    return out


def _one_draw(model, wanted: dict, call, device: str, gen) -> dict[str, Any]:
    """Second moment of dL/dx_t per step (float64, time order) for every prediction."""
    import torch

    last_call: dict[str, tuple[str, int]] = {}  # the call whose output is y_T
    for key, record in wanted.items():
        last_call[record.node] = max(key, last_call.get(record.node, key))
    modules = {model.get_submodule(q): q for q, _ in wanted}
    counts: dict[str, int] = {}
    leaves: dict[str, list] = {}
    outputs: dict[str, Any] = {}

    def pre(mod, args):
        q = modules[mod]
        record = wanted.get((q, counts.get(q, 0)))
        if record is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0].detach().requires_grad_(True)
        leaves.setdefault(record.node, []).append(x)
        return (x, *args[1:])

    def post(mod, _args, out):
        q = modules[mod]
        k = counts.get(q, 0)
        counts[q] = k + 1
        record = wanted.get((q, k))
        if record is not None and last_call.get(record.node) == (q, k):
            outputs[record.node] = out[0] if isinstance(out, (tuple, list)) else out

    hooks = [m.register_forward_pre_hook(pre) for m in modules] + [m.register_forward_hook(post) for m in modules]
    try:
        with torch.enable_grad():
            call.map(lambda t: t.detach().to(device))(model)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {}
    records = {r.node: r for r in wanted.values()}
    with torch.enable_grad():
        for key, y in outputs.items():
            xs = leaves.get(key)
            record = records[key]
            if not xs or not isinstance(y, torch.Tensor) or not y.requires_grad:
                continue
            if record.nodes:  # a loop: one input per call, the last call's state
                grads = torch.autograd.grad(y, xs, _cot(y, gen), allow_unused=True)
                out[key] = torch.tensor([0.0 if g is None else float(g.double().pow(2).mean()) for g in grads],
                                        dtype=torch.float64)
                continue
            module = model.get_submodule(record.module)
            t_axis = 0 if xs[0].dim() == 2 or not getattr(module, "batch_first", False) else 1
            y_last = y.select(t_axis, y.shape[t_axis] - 1)[..., : module.hidden_size]
            (g,) = torch.autograd.grad(y_last, xs[0], _cot(y_last, gen), allow_unused=True)
            if g is not None:
                g = g.double().pow(2).movedim(t_axis, 0)
                out[key] = g.reshape(g.shape[0], -1).mean(dim=1)
    return out


def _cot(y, gen):
    import torch

    return torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype)
