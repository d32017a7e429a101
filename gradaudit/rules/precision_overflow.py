"""GA604 precision-overflow."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node


@register
class PrecisionOverflow(Rule):
    """Under float16/bfloat16 autocast an activation exceeds the dtype's largest value.

    ## What it does
    With `--dtype fp16` or `--dtype bf16` the probe runs under `torch.autocast` and
    checks every node: the first node, in execution order, whose output is Inf or NaN
    in the reduced dtype while the float32 run of the same draw is finite is where the
    overflow happens (error); likewise the first op whose backward gives an Inf gradient
    only in the reduced dtype. Values of the float32 run beyond the dtype's range at
    nodes autocast keeps in float32 are reported as a warning: they overflow as soon
    as they are cast down.

    ## Why is this bad?
    float16's largest finite value is 65504. An activation beyond it becomes Inf, the
    next normalisation or subtraction turns it into NaN, and mixed-precision training
    diverges from the first step, although the float32 model is fine. bfloat16 keeps
    float32's range and rarely overflows.

    ## Example
    ```python
    layers = []
    for _ in range(20):
        layer = nn.Linear(256, 256)
        nn.init.normal_(layer.weight, std=0.1)   # gain 1.6 per layer, no normalisation
        layers += [layer, nn.ReLU()]
    ```

    ## Use instead
    ```python
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    layers += [layer, nn.LayerNorm(256), nn.ReLU()]   # or train in bfloat16
    ```

    ## References
    - Micikevicius et al., "Mixed Precision Training", ICLR 2018.
    - PyTorch, "Automatic Mixed Precision" (`torch.autocast`).
    """

    code = "GA604"
    name = "precision-overflow"
    category = "precision"
    default_severity = "error"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        probe = analysis.config.get("probe")
        prec = getattr(probe, "precision", None)
        if not prec:
            return
        over = prec.get("overflow")
        if over:
            node = graph_node(analysis, over["node"])
            amax = over.get("absmax_float32")
            ref = f"; in float32 its abs-max is {amax:.4g}" if isinstance(amax, float) else ""
            layer = f" (after weight layer {over['depth']})" if over.get("depth") else ""
            yield self.finding(
                f"under {prec['dtype']} autocast the output of '{over['node']}' [{over['op']}]{layer} is "
                f"{over['value']}: it exceeds {prec['dtype']}'s largest value {prec['max']:.6g}{ref}. "
                "This is the first node where it happens",
                node=node,
                fix="nn.LayerNorm(features)  # keep activations O(1); or use --dtype bf16 / torch.bfloat16",
                dtype=prec["dtype"],
                absmax_float32=amax,
            )
            return
        back = prec.get("grad_overflow")
        if back:
            node = graph_node(analysis, back["node"])
            yield self.finding(
                f"under {prec['dtype']} autocast the backward of '{back['node']}' [{back['op']}] gives a "
                f"{back['value']} gradient (dL/d '{back['gradient_of']}'), finite in float32: the gradient exceeds "
                f"{prec['dtype']}'s largest value {prec['max']:.6g}",
                node=node,
                fix="scaler = torch.amp.GradScaler()  # skips steps with inf gradients; or use torch.bfloat16",
                dtype=prec["dtype"],
            )
            return
        for row in prec.get("beyond_range", [])[:1]:
            node = graph_node(analysis, row["node"])
            yield self.finding(
                f"'{row['node']}' reaches {row['absmax_float32']:.4g} in float32, beyond {prec['dtype']}'s largest "
                f"value {prec['max']:.6g}; it overflows as soon as it is cast to {prec['dtype']}",
                node=node,
                severity="warning",
                fix="nn.LayerNorm(features)  # keep activations O(1)",
                absmax_float32=row["absmax_float32"],
            )
