"""GA605 gradient-underflow."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node


@register
class GradientUnderflow(Rule):
    """Gradients flush to zero in float16/bfloat16 without loss scaling.

    ## What it does
    With `--dtype fp16|bf16`, compares the reduced-precision draw with the float32 draw
    of the same seed and the same cotangent: for every layer, the fraction of entries of
    dL/d(output) and of the weight gradient that are exactly 0 in the reduced dtype but
    not in float32. A layer where more than 1% of the entries are lost (configurable as
    `underflow_fraction`) is reported.

    ## Why is this bad?
    float16's smallest positive value is 2^-24 ~ 6e-8; smaller gradients become 0 and
    those weights stop learning, silently. Mixed Precision Training (Micikevicius et al.
    2018) found that a large share of activation gradients of real networks lies below
    this limit and introduced loss scaling, which shifts them into range.

    ## Example
    ```python
    with torch.autocast("cuda", dtype=torch.float16):
        loss = criterion(model(x), y)
    loss.backward()            # small gradients underflow to 0
    ```

    ## Use instead
    ```python
    scaler = torch.amp.GradScaler()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = criterion(model(x), y)
    scaler.scale(loss).backward()
    ```

    ## References
    - Micikevicius et al., "Mixed Precision Training", ICLR 2018.
    - PyTorch, `torch.amp.GradScaler`.
    """

    code = "GA605"
    name = "gradient-underflow"
    category = "precision"
    default_severity = "warning"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        probe = analysis.config.get("probe")
        prec = getattr(probe, "precision", None)
        if not prec or prec.get("overflow"):
            return
        for row in prec.get("underflow", []):
            node = graph_node(analysis, row["node"])
            parts = []
            if row.get("grad_underflow_fraction") is not None:
                parts.append(f"{row['grad_underflow_fraction']:.1%} of dL/d(output)")
            if row.get("weight_grad_underflow_fraction") is not None:
                parts.append(f"{row['weight_grad_underflow_fraction']:.1%} of the weight gradient")
            yield self.finding(
                f"under {prec['dtype']} autocast {' and '.join(parts)} of '{row['node']}' underflow to 0 "
                f"(nonzero in float32; {prec['dtype']}'s smallest positive value is {prec['smallest_subnormal']:.3g})",
                node=node,
                fix="scaler = torch.amp.GradScaler(); scaler.scale(loss).backward()",
                **{k: v for k, v in row.items() if k.endswith("fraction")},
            )
