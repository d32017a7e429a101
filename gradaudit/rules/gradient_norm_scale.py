"""GA606 gradient-norm-scale."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register


def _round(x: float) -> str:
    return f"{x:.3g}"


@register
class GradientNormScale(Rule):
    """The measured total gradient norm, with a gradient-clipping threshold to match.

    ## What it does
    Reports the total gradient norm ||dL/dtheta|| over all trainable parameters measured
    by the probe (mean over draws) and writes the `clip_grad_norm_` call with that norm
    as `max_norm`, with the range Pascanu et al. found to work.

    ## Why is this bad?
    It is information, not a fault: a clipping threshold far below the typical norm
    clips every step (a different learning rate in disguise); far above it, clipping
    never acts against the occasional exploding step. Pascanu, Mikolov & Bengio (2013)
    found thresholds from half to ten times the average gradient norm to converge.
    The probe's loss is L = sum <y, g> with g ~ N(0, 1); scale the threshold by your
    loss's gradient scale (e.g. divide by the batch size for a mean-reduced loss).

    ## Example
    ```python
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)   # clips everything
    ```

    ## Use instead
    ```python
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=measured_norm)
    ```

    ## References
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013.
    """

    code = "GA606"
    name = "gradient-norm-scale"
    category = "other"
    default_severity = "info"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        import math

        probe = analysis.config.get("probe")
        if probe is None:
            return
        norm = probe.total_grad_norm
        if not math.isfinite(norm) or norm <= 0:
            return
        yield self.finding(
            f"measured total gradient norm {norm:.4g} (mean of {probe.draws} draw(s)); Pascanu et al. (2013) found "
            f"clipping thresholds from 0.5x to 10x the average norm ({_round(0.5 * norm)} to {_round(10 * norm)}) to work",
            fix=f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={_round(norm)})",
            total_grad_norm=norm,
            low=0.5 * norm,
            high=10 * norm,
        )
