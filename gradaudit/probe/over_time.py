"""The gradient over time, measured beside its prediction.

For every recurrent module call and every unrolled loop of cell calls that the analysis
predicted a gradient-over-time curve for (:func:`gradaudit.propagation.recurrent.over_time`),
the real model runs forward on the probe's inputs and the gradient is taken of

    L = <y_T, g>,   g ~ N(0, 1),

the output of the last step only (the top layer's forward direction of a bidirectional
module: the first half of its features), with respect to the input x_t of every step:
the module's input sequence, or the input of each call of a loop. Each x_t is cut from
what came before it (a detached copy that requires grad), so what is measured is the
recurrence alone, as predicted. The curve is RMS(dL/dx_t) over the batch and features,
second moments averaged over the draws, relative to the last step; its per-step gain
and horizon are read as the prediction's (:func:`gradaudit.propagation.recurrent.describe`).

Gradients come from ``torch.autograd.grad`` with respect to those copies only: no
parameter's ``.grad`` is written. The run is in the model's own dtype, without autocast:
the curve is a property of the recurrence, not of a reduced precision.
"""

from __future__ import annotations

from typing import Any


def measure(gm, analysis, inputs: tuple, *, draws: int, device: str, seed: int) -> dict[str, Any]:
    """``{node: Curve}`` for every over-time prediction of ``analysis`` (empty when there
    is none), running ``gm``, the probe's GraphModule of the model (train mode, on
    ``device``)."""
    import torch

    from gradaudit.propagation.recurrent import describe, over_time, tail_gain

    predictions = over_time(analysis)
    if not predictions:
        return {}
    sums: dict[str, torch.Tensor] = {}
    for d in range(draws):
        torch.default_generator.manual_seed(seed + d)
        gen = torch.Generator(device=device).manual_seed(seed + d)
        for key, sq in _one_draw(gm, analysis, predictions, inputs, device, gen).items():
            sums[key] = sq if key not in sums else sums[key] + sq
    out = {}
    for key, sq in sums.items():
        rms = (sq / draws).clamp_min(0).sqrt()
        last = float(rms[-1])
        values = [float(v) / last if last > 0 else 0.0 for v in rms]
        out[key] = describe(values, tail_gain(values))
    return out


def _one_draw(gm, analysis, predictions, inputs: tuple, device: str, gen) -> dict[str, Any]:
    """Second moment of dL/dx_t per step (float64, time order) for every prediction."""
    import torch
    import torch.fx as fx

    modules = {p.node: p for p in predictions if not p.nodes}
    chains = {n: p for p in predictions if p.nodes for n in p.nodes}
    leaves: dict[str, list] = {}
    outputs: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.name not in modules and n.name not in chains:
                return super().run_node(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0].detach().requires_grad_(True)
            result = self.call_module(n.target, (x, *args[1:]), kwargs)
            owner = modules.get(n.name) or chains[n.name]
            leaves.setdefault(owner.node, []).append(x)
            if n.name == owner.node:
                outputs[owner.node] = result[0] if isinstance(result, (tuple, list)) else result
            return result

    args = [x.detach().to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.enable_grad():
        Recorder(gm).run(*args)
        out: dict[str, Any] = {}
        for key, pred in {**modules, **{p.node: p for p in chains.values()}}.items():
            y = outputs.get(key)
            xs = leaves.get(key)
            if y is None or not xs or not y.requires_grad:
                continue
            node = analysis.graph[key]
            if pred.nodes:  # a loop: one input per call, the last call's state
                y_last = y
                grads = torch.autograd.grad(y_last, xs, _cot(y_last, gen), allow_unused=True)
                sq = [0.0 if g is None else float(g.double().pow(2).mean()) for g in grads]
                out[key] = torch.tensor(sq, dtype=torch.float64)
                continue
            module = node.fn
            t_axis = 0 if xs[0].dim() == 2 or not getattr(module, "batch_first", False) else 1
            y_last = y.select(t_axis, y.shape[t_axis] - 1)[..., : module.hidden_size]
            (g,) = torch.autograd.grad(y_last, xs[0], _cot(y_last, gen), allow_unused=True)
            if g is None:
                continue
            g = g.double().pow(2).movedim(t_axis, 0)
            out[key] = g.reshape(g.shape[0], -1).mean(dim=1)
    return out


def _cot(y, gen):
    import torch

    return torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32).to(y.dtype)
