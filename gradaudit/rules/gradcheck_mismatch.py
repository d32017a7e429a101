"""GA701 gradcheck-mismatch."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register

#: The kind of the directional check of the whole model (:mod:`gradaudit.probe.gradcheck`).
WHOLE_MODEL = "whole-model directional"


@register
class GradcheckMismatch(Rule):
    """Hand-written backward code disagrees with a float64 numeric derivative.

    ## What it does
    With `--gradcheck`, compares autograd's gradient with central differences in
    float64 for every custom `torch.autograd.Function` the model calls, every module
    with backward hooks, every module named with `--gradcheck-module`, and the whole
    model along a random direction. The relative error |a - b| / (|a| + |b|) is graded:
    below 1e-7 correct, up to 1e-4 acceptable (rounding), up to 1e-2 suspicious
    (warning), from 1e-2 wrong (error). The worst entries (tensor, index, both values)
    are listed; entries at kinks (ReLU at 0) are reported, not graded, and so are entries
    where the function itself is NaN or inf (GA601 reports those with `--probe`).

    A backward that is deliberately not the forward's derivative (a gradient reversal
    layer, a straight-through estimator, a gradient scaler) disagrees too, by design:
    the static pass and the probe already use that backward as written, so put
    `# gradaudit: noqa[GA701]` on the line that applies the Function. The whole-model
    check is reported only when no Function or module check failed: a mismatch of its
    own, with its line, explains the model's.

    ## Why is this bad?
    A backward that drops or mis-signs a term still trains — in a wrong direction. The
    loss may fall more slowly, plateau or diverge, and nothing in the training curve
    says why. A numeric check on a tiny float64 input finds it in seconds.

    ## Example
    ```python
    class Swish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            s = torch.sigmoid(x); ctx.save_for_backward(s)
            return x * s
        @staticmethod
        def backward(ctx, g):
            (s,) = ctx.saved_tensors
            return g * s                      # drops the x * s * (1 - s) term
    ```

    ## Use instead
    ```python
        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            return g * (s + x * s * (1 - s))
    ```

    ## References
    - PyTorch, `torch.autograd.gradcheck` (float64, central differences).
    - CS231n, "Gradient checks": relative error thresholds 1e-7 / 1e-4 / 1e-2.
    """

    code = "GA701"
    name = "gradcheck-mismatch"
    category = "gradcheck"
    default_severity = "error"
    stage = "gradcheck"

    def check(self, analysis) -> Iterator[Finding]:
        results = analysis.config.get("gradcheck") or []
        failed = [r for r in results if r.get("grade") in ("wrong", "suspicious")]
        for res in failed:
            if res["kind"] == WHOLE_MODEL and len(failed) > 1:
                continue  # a Function's or module's own mismatch says where it is
            worst = res.get("worst") or []
            shown = "; ".join(
                f"{w['tensor']}{w['index']}: autograd {w['autograd']:.6g} vs numeric {w['numeric']:.6g}"
                for w in worst[:3]
            )
            grade = res["grade"]
            node = _node_of(analysis, res)
            f = self.finding(
                f"{res['kind']} '{res['target']}': backward disagrees with float64 central differences, "
                f"max relative error {res['max_rel_error']:.3g} ({grade}); worst: {shown}",
                node=node,
                severity="error" if grade == "wrong" else "warning",
                fix="compare backward() term by term with the derivative of forward(); "
                "torch.autograd.gradcheck(fn, inputs_float64) reproduces it",
                target=res["target"],
                kind=res["kind"],
                max_rel_error=res["max_rel_error"],
                worst=worst,
            )
            if node is None:
                f.location = res.get("location")
                f.module = res["target"] if res["kind"].endswith("module") else None
            yield f


def _node_of(analysis, res):
    """The IR node of a module target (first call), if any."""
    if not res["kind"].endswith("module"):
        return None
    for n in analysis.graph:
        if n.module == res["target"] and n.kind == "call_module":
            return n
    return None
