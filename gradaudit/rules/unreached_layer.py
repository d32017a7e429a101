"""GA105 unreached-layer."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node, without_path_to_output
from gradaudit.rules.evidence.text import module_expr, name_list, where


@register
class UnreachedLayer(Rule):
    """A weight layer's parameters get no gradient at all: nothing connects them to the loss.

    ## What it does
    Lists the weight layers with trainable parameters from which no chain of ops leads
    to the model's output: a layer whose result is never used, or used only through a
    `.detach()`, a numpy round trip or another value autograd does not follow. When the
    probe ran it also lists the layers that ran in the forward pass and whose parameters
    received no gradient in any draw, which catches the cuts a capture cannot see (an op
    it treated as a whole). A gradient that is exactly zero is something else: behind a
    zero-initialised head or gate the path exists and opens after the first steps
    (GA205); here nothing flows at all.

    ## Why is this bad?
    These parameters keep their initial values for the whole run, whatever the
    gradient's scale elsewhere: training spends memory and compute on weights that never
    change, and the model is smaller than its author thinks. An audit that judged only
    the layers the loss reaches would call such a model healthy.

    ## Example
    ```python
    def forward(self, x):
        h = torch.from_numpy(self.proj(x).detach().numpy())   # autograd stops here
        return self.head(h)
    ```

    ## Use instead
    ```python
    def forward(self, x):
        return self.head(self.proj(x))
    ```
    Freeze on purpose with `requires_grad_(False)`: frozen parameters are not listed.

    ## References
    - Paszke et al., "Automatic differentiation in PyTorch", NIPS 2017 Autodiff Workshop
      (gradients flow only along the recorded graph).
    """

    code = "GA105"
    name = "unreached-layer"
    category = "vanishing"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        cut = without_path_to_output(analysis)
        static = [n for n in analysis.weight_layers() if n.name in cut and _trainable(n)]
        if static:
            yield self._finding(
                static, [n.module for n in static], [where(n) for n in static], sum(_trainable(n) for n in static),
                "have no path to the model's output", "no gradient reaches them, so they keep their initial values",
                "predicted",
            )
        probe = analysis.config.get("probe")
        if probe is None:
            return
        seen = {n.name for n in static}
        measured = [m for m in probe.layers.values()
                    if m.node not in seen and m.draws and m.weight_numel and m.weight_grad_sq is None]
        if measured:
            nodes = [graph_node(analysis, m.node) for m in measured]
            yield self._finding(
                nodes, [m.module for m in measured],
                [m.module or (where(n) if n is not None else m.node) for m, n in zip(measured, nodes)],
                sum(m.weight_numel for m in measured), f"got no gradient at all in the probe's {probe.draws} draw(s)",
                "autograd found no path from the output to them on these inputs, so they would keep their initial values",
                "measured",
            )

    def _finding(self, nodes, modules, names, count, what, why, source) -> Finding:
        return self.finding(
            f"{len(names)} weight layer(s) {what}: {name_list(names)} ({count:,} trainable parameters); {why}",
            node=nodes[0], fix=_fix(modules), layers=names, source=source,
        )


def _fix(modules: list[str | None]) -> str:
    """Freeze the layers on purpose, if they are meant to stay as initialised; otherwise
    use their outputs on the way to the loss."""
    calls = [f"{module_expr(m)}.requires_grad_(False)" for m in dict.fromkeys(modules) if m]
    return "; ".join(calls or ["pass"]) + "  # or use their outputs on the way to the loss"


def _trainable(node) -> int:
    """How many trainable parameters the layer owns."""
    return sum(p.numel() for p in node.params.values() if getattr(p, "requires_grad", False))
