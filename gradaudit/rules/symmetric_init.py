"""GA204 symmetric-init."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.fixes import init_fix
from gradaudit.rules.evidence.inits import layer_inits
from gradaudit.rules.evidence.ops import TRANSPARENT
from gradaudit.rules.evidence.structure import is_residual_add, structure
from gradaudit.rules.evidence.text import fmt, weight_name, where


@register
class SymmetricInit(Rule):
    """A hidden layer whose weight rows are all equal (constant or zero init).

    ## What it does
    Reports every linear/conv layer that feeds another weight layer and whose weight
    matrix (conv: reshaped to C_out x C_in k) has identical rows: all zeros or one
    constant. It is an error when the units are exactly symmetric — equal biases and
    equal outgoing weights in the next layer too — and a warning otherwise. A
    zero-initialised layer whose output only feeds a residual add (the last layer of a
    residual branch, as in Fixup and SkipInit) is legitimate and not reported.

    ## Why is this bad?
    Units with equal incoming weights all see the same projection w.x of the input:
    the layer's output has rank 1 (plus the bias). When their biases and outgoing
    weights are equal as well, they compute the same value, receive the same gradient,
    and stay copies of one another forever: the layer has the capacity of a single
    unit. Otherwise only the differences downstream pull them apart, slowly. Random
    init exists to break this symmetry.

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
        st = structure(analysis)
        seen: set[str] = set()
        gated = {g.node for g in analysis.gates}  # closed on purpose: GA205
        for li in layer_inits(analysis).values():
            node = li.node
            key = node.module or node.name
            if not li.symmetric or not li.hidden or key in seen or node.name in gated:
                continue
            seen.add(key)
            w = node.params["weight"].detach()
            value = float(w.reshape(-1)[0])
            if value == 0.0 and _feeds_only_residual(analysis, node):
                continue
            what = f"all {fmt(value)}" if bool((w == value).all()) else "equal"
            bias = node.params.get("bias")
            bias_equal = bias is None or bool((bias == bias.reshape(-1)[:1]).all())
            nexts = [analysis.graph[e.dst] for e in st.edges.get(node.name, [])]
            out_equal = bool(nexts) and all(_columns_equal(n, li.fan_out) for n in nexts)
            permanent = bias_equal and out_equal
            if permanent:
                tail = (
                    f"its biases and the next layer's weights from these units are equal too, so all {li.fan_out} "
                    f"units compute the same value and receive the same gradient at every step: the layer trains "
                    f"as one unit"
                )
            else:
                tail = (
                    "every unit sees the same projection w.x of the input, so the layer's output has rank 1 "
                    "(plus the bias) and only differences downstream can pull the units apart"
                )
            yield self.finding(
                f"all {li.fan_out} rows of {weight_name(node)} are {what}: {tail}",
                node=node,
                fix=init_fix(analysis, node),
                severity="error" if permanent else "warning",
                rows=li.fan_out,
                value=value,
                permanent=permanent,
            )


def _columns_equal(node, units: int) -> bool:
    """Whether a linear/conv layer reading ``units`` features weights them all alike
    (its input columns, or input channels for a conv, are equal)."""
    w = node.params.get("weight")
    if node.op not in ("linear", "conv") or w is None or w.dim() < 2 or w.shape[1] != units:
        return False
    w = w.detach()
    return bool((w == w[:, :1]).all())


def _feeds_only_residual(analysis, node) -> bool:
    """True when every path from ``node`` (through layout ops, dropout and scalar
    scaling) ends in a residual add."""
    ends = analysis.next_nodes(node, TRANSPARENT | frozenset({"mul", "div"}))
    return bool(ends) and all(is_residual_add(analysis, e) for e in ends)
