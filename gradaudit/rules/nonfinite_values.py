"""GA601 non-finite-values."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node

#: A concrete guard per op family whose domain excludes some inputs.
_GUARDS = {
    "log": "torch.log(x.clamp_min(1e-12))  # or log of a positive quantity (softplus, exp)",
    "log2": "torch.log2(x.clamp_min(1e-12))",
    "log10": "torch.log10(x.clamp_min(1e-12))",
    "sqrt": "torch.sqrt(x.clamp_min(1e-12))",
    "rsqrt": "torch.rsqrt(x.clamp_min(1e-12))",
    "div": "a / (b + 1e-12 * torch.sign(b) + (b == 0) * 1e-12)",
    "reciprocal": "torch.reciprocal(x.clamp_min(1e-12))",
    "pow": "torch.pow(x.clamp_min(1e-12), p)",
    "exp": "torch.exp(x.clamp_max(80.0))",
    "acos": "torch.acos(x.clamp(-1 + 1e-7, 1 - 1e-7))",
    "asin": "torch.asin(x.clamp(-1 + 1e-7, 1 - 1e-7))",
}


def _describe(items: list[dict]) -> str:
    parts = []
    for s in items[:4]:
        parts.append(
            f"{s['name']}: min {s['min']:.4g}, max {s['max']:.4g}, abs-max {s['absmax']:.4g}"
            if isinstance(s.get("min"), float)
            else f"{s['name']}: {s.get('nonfinite')} non-finite of {s['shape']}"
        )
    return "; ".join(parts)


@register
class NonFiniteValues(Rule):
    """A real forward or backward pass produces NaN or Inf; reports the first node where it appears.

    ## What it does
    Runs the model forward and backward (the probe) and, when any output, activation or
    gradient is NaN or Inf, re-runs the same draw checking every node: the first node
    in execution order whose forward output is not finite, or — when the forward is
    finite — the op whose backward first produces a non-finite gradient (backward
    execution order). It prints the op, the module, the user's source line and the
    min / max / abs-max of the node's inputs and weights, like the underflow/overflow
    debugger of transformers, but pointing at one node. It works when the forward
    itself produces NaN and no backward pass is possible.

    ## Why is this bad?
    One NaN poisons every parameter it reaches through the optimizer step; training
    loss becomes NaN and never recovers. Finding where it starts (a `log` of a negative
    pre-activation, a `sqrt` at 0 in the backward, a division by a zero norm) is the
    fix; finding where it ends is useless.

    ## Example
    ```python
    def forward(self, x):
        h = self.fc(x)           # pre-activation, about half negative
        return torch.log(h)      # NaN for every h < 0
    ```

    ## Use instead
    ```python
    def forward(self, x):
        h = self.fc(x)
        return torch.log(F.softplus(h) + 1e-6)
    ```

    ## References
    - Hugging Face transformers, `debug_utils.DebugUnderflowOverflow`.
    - PyTorch, `torch.autograd.detect_anomaly`.
    """

    code = "GA601"
    name = "non-finite-values"
    category = "nan"
    default_severity = "error"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        probe = analysis.config.get("probe")
        nf = getattr(probe, "nonfinite", None)
        if nf is None or nf.cause != "nan":
            return
        node = graph_node(analysis, nf.node)
        where = f" at {node.location}" if node is not None and node.location else ""
        what = f"'{nf.node}' [{nf.op}]" + (f" (module '{nf.module}')" if nf.module else "")
        if nf.phase == "forward":
            head = f"the forward output of {what}{where} is {nf.value}: the first non-finite value in execution order"
        else:
            head = (
                f"the backward of {what}{where} produces a {nf.value} gradient (dL/d '{nf.gradient_of}'): "
                "the first non-finite gradient in backward order; the forward is finite"
            )
        detail = []
        if nf.inputs:
            detail.append(f"inputs — {_describe(nf.inputs)}")
        if nf.weights:
            detail.append(f"weights — {_describe(nf.weights)}")
        message = head + (". " + ". ".join(detail) if detail else "")
        guard = _GUARDS.get(nf.op, "torch.nan_to_num(x)  # after keeping this op's inputs inside its domain")
        yield self.finding(
            message,
            node=node,
            fix=guard,
            phase=nf.phase,
            value=nf.value,
            inputs=nf.inputs,
            weights=nf.weights,
            gradient_of=nf.gradient_of,
        )
