"""GA607 prediction-disagrees."""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register


@register
class PredictionDisagrees(Rule):
    """The probe's measurement and the static prediction differ by more than 10x at a layer.

    ## What it does
    Compares, per layer, the predicted and the measured RMS of the output and of its
    gradient. Where they differ by more than 10x (configurable as `disagree_factor`) at
    a layer whose upstream layers agreed, it reports the layer, both numbers and the
    reasons the prediction is unreliable there: an op on the way was estimated by
    sampling instead of modelled, or the layer's input is strongly correlated across
    the batch (moment propagation treats entries as independent), or values reach
    float resolution. Later layers that inherit the disagreement are counted, not
    repeated.

    ## Why is this bad?
    It is information: the static findings for that region rest on a prediction the
    real model does not follow; trust the measured numbers there.

    ## Example
    ```python
    x = self.fc(x)
    x = x - x.mean(dim=0, keepdim=True)   # batch-coupled op the moment model treats as independent
    ```

    ## Use instead
    ```python
    # nothing to change in the model; read the measured column of the report for it
    ```

    ## References
    - Schoenholz et al., "Deep Information Propagation", ICLR 2017 (the mean-field
      assumptions).
    - Hanin, "Which Neural Net Architectures Give Rise to Exploding and Vanishing
      Gradients?", NeurIPS 2018 (finite-width fluctuations).
    """

    code = "GA607"
    name = "prediction-disagrees"
    category = "other"
    default_severity = "info"
    stage = "probe"

    def check(self, analysis) -> Iterator[Finding]:
        from gradaudit.probe.gradients import threshold

        probe = analysis.config.get("probe")
        if probe is None:
            return
        factor = threshold(analysis.config.get("settings"), "disagree_factor")
        limit = math.log10(factor)
        rows = probe.agreement
        bad = [
            i for i, r in enumerate(rows)
            if any(r.get(k) is not None and abs(r[k]) > limit for k in ("act_log10_error", "grad_log10_error"))
        ]
        reported = set()
        for i in bad:
            if i - 1 in bad and i - 1 in reported | set(bad[: bad.index(i)]):
                continue  # inherited from the layer before
            run = 1
            while i + run in bad:
                run += 1
            r = rows[i]
            why = []
            if r.get("estimated"):
                why.append("an op at or just before this layer was estimated by sampling, not modelled")
            cos = r.get("input_batch_cosine")
            if isinstance(cos, float) and abs(cos) > 0.5:
                why.append(f"its input is strongly correlated across the batch (mean cosine {cos:.2f})")
            for key in ("predicted_act_rms", "predicted_grad_rms"):
                v = r.get(key)
                if isinstance(v, float) and (v < 1e-30 or v > 1e30):
                    why.append("the values reach the limits of float resolution")
                    break
            if not why:
                why.append("the moment model's independence assumptions do not hold for this model")
            node = analysis.graph[r["node"]]
            reported.add(i)
            yield self.finding(
                f"predicted vs measured at '{r['node']}': act RMS {r['predicted_act_rms']:.3g} vs "
                f"{r['measured_act_rms']:.3g}, grad RMS {r['predicted_grad_rms']:.3g} vs {r['measured_grad_rms']:.3g} "
                f"(more than {factor:g}x apart{f'; {run - 1} following layer(s) inherit it' if run > 1 else ''}); "
                f"why: {'; '.join(why)}",
                node=node,
                act_log10_error=r.get("act_log10_error"),
                grad_log10_error=r.get("grad_log10_error"),
            )
