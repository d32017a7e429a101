"""GA001 incomplete-analysis."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.text import name_list


@register
class IncompleteAnalysis(Rule):
    """The prediction does not cover every parameterized layer, or the loss reaches no parameter.

    ## What it does
    After propagation, checks that every layer that owns or reads a parameter has
    finite predicted activation and gradient statistics, that the model's output holds
    a floating tensor, and that the predicted gradient reaches at least one parameter.
    Each gap is reported once, at its root cause: the node where statistics stopped (an
    op that neither a handler nor the local Monte Carlo could model, an input used as a
    number), the first node whose prediction is not finite (nan / inf), an output with no
    floating tensor, a model without parameters. The message lists the layers the gap
    leaves without statistics. The audit's verdict is then `incomplete` (exit status 4),
    never `healthy`, whatever this rule's selection or suppression.

    ## Why is this bad?
    An audit that silently skips layers would call a model healthy on the evidence of
    the layers it happened to understand: the most expensive mistake an audit can make
    is a wrong all-clear before a week-long training run. A layer without statistics is
    a layer nobody checked.

    ## Example
    ```python
    def forward(self, x):
        h = self.fc1(x)
        return None          # the output holds no tensor: no loss reaches fc1
    ```

    ## Use instead
    ```python
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
    ```
    When an op is the cause, `gradaudit check --probe` still measures every layer with
    the real model, and the gap's message names the op and your source line.

    ## References
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017 (the statistics the
      prediction propagates).
    """

    code = "GA001"
    name = "incomplete-analysis"
    category = "other"
    default_severity = "error"

    def check(self, analysis) -> Iterator[Finding]:
        cov = analysis.coverage
        if cov is None or cov.complete:
            return
        for gap in cov.gaps:
            node = analysis.graph[gap.node] if gap.node is not None else None
            layers = ""
            if gap.layers:
                layers = f"; layers affected ({len(gap.layers)}): {name_list(gap.layers)}"
            at = f" at node '{gap.node}' ({gap.op})" if gap.node is not None else ""
            yield self.finding(
                f"the prediction is incomplete{at}: {gap.reason}{layers}",
                node=node,
                layers=list(gap.layers),
                reason=gap.reason,
            )
