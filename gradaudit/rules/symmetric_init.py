"""GA204 symmetric-init."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import TRANSPARENT, fmt, init_fix, is_residual_add, layer_inits, where


@register
class SymmetricInit(Rule):
    """A hidden layer whose weight rows are all equal (constant or zero init).

    ## What it does
    Reports every linear/conv layer that feeds another weight layer and whose weight
    matrix (conv: reshaped to C_out x C_in k) has identical rows: all zeros or one
    constant. A zero-initialised layer whose output only feeds a residual add (the last
    layer of a residual branch, as in Fixup and SkipInit) is legitimate and not
    reported.

    ## Why is this bad?
    Units with equal incoming weights compute the same value for every input, so with
    equal outgoing paths they receive the same gradient and stay copies of one another:
    the layer has the capacity of a single unit. With all-zero weights the output is
    constant, and through ReLU (relu'(0) = 0 in PyTorch) no gradient reaches anything
    before it. Random init exists to break this symmetry.

    ## Example
    ```python
    fc = nn.Linear(256, 256)
    nn.init.constant_(fc.weight, 0.01)
    model = nn.Sequential(fc, nn.ReLU(), nn.Linear(256, 10))
    ```

    ## Use instead
    ```python
    nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
    ```

    ## References
    - Goodfellow, Bengio & Courville, "Deep Learning", 2016, Sec. 8.4 (breaking
      symmetry).
    - Zhang, Dauphin & Ma, "Fixup Initialization", ICLR 2019 (zero-init residual branch).
    - De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity
      Function in Deep Networks" (SkipInit), NeurIPS 2020.
    """

    code = "GA204"
    name = "symmetric-init"
    category = "init"
    default_severity = "error"

    def check(self, analysis) -> Iterator[Finding]:
        seen: set[str] = set()
        for name, li in layer_inits(analysis).items():
            node = li.node
            key = node.module or node.name
            if not li.symmetric or not li.hidden or key in seen:
                continue
            seen.add(key)
            w = node.params["weight"].detach()
            value = float(w.reshape(-1)[0])
            if value == 0.0 and _feeds_only_residual(analysis, node):
                continue
            what = "all zero" if value == 0.0 and bool((w == 0).all()) else (
                f"constant {fmt(value)}" if bool((w == value).all()) else "equal"
            )
            yield self.finding(
                f"all {li.fan_out} rows of {where(node)}.weight are {what}: its {li.fan_out} units compute the same "
                f"value for every input and receive the same gradient, so they stay copies of one unit"
                + ("; with zero weights the output is constant and a following ReLU passes no gradient" if value == 0.0 else ""),
                node=node,
                fix=init_fix(analysis, node),
                rows=li.fan_out,
                value=value,
            )


def _feeds_only_residual(analysis, node) -> bool:
    """True when every path from ``node`` (through layout ops, dropout and scalar
    scaling) ends in a residual add."""
    ends = analysis.next_nodes(node, TRANSPARENT | frozenset({"mul", "div"}))
    return bool(ends) and all(is_residual_add(analysis, e) for e in ends)
