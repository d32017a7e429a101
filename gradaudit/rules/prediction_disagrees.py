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
    reasons the prediction is unreliable there: the real inputs do not have the
    statistics the prediction assumed (N(0, 1) unless told otherwise), an op on the way
    was estimated by sampling instead of modelled, the layer's input is strongly
    correlated across the batch (moment propagation treats entries as independent), or
    values reach float resolution. Later layers that inherit the disagreement are counted, not
    repeated.

    ## Why is this bad?
    It is information: the static findings for that region rest on a prediction the
    real model does not follow; trust the measured numbers there.

    ## Example
    ```python
    report = gradaudit.audit(model, images, probe=True)   # pixels in 0..255, prediction assumes N(0, 1)
    ```

    ## Use instead
    ```python
    report = gradaudit.audit(model, images, probe=True, input_stats=[(120.0, 60.0)])
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
        from gradaudit.probe.thresholds import threshold

        probe = analysis.config.get("probe")
        if probe is None:
            return
        factor = threshold(analysis.config.get("settings"), "disagree_factor")
        limit = math.log10(factor)
        rows = probe.agreement
        bad = [
            i
            for i, r in enumerate(rows)
            if any(r.get(k) is not None and abs(r[k]) > limit for k in ("act_log10_error", "grad_log10_error"))
        ]
        bad_set = set(bad)
        for i in bad:
            if i - 1 in bad_set:
                continue  # inherited from the layer before
            run = 1
            while i + run in bad_set:
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
            for inp in probe.inputs:
                m, pr = inp.get("measured_rms"), inp.get("predicted_rms")
                if (
                    isinstance(m, float)
                    and isinstance(pr, float)
                    and m > 0
                    and pr > 0
                    and abs(math.log10(m / pr)) > 0.3
                ):
                    why.append(
                        f"input '{inp['input']}' has RMS {m:.3g} but the prediction assumed {pr:.3g} "
                        "(pass its mean and std to audit(..., input_stats=...))"
                    )
            if not why:
                why.append("the moment model's independence assumptions do not hold for this model")
            node = analysis.graph[r["node"]]
            yield self.finding(
                f"predicted vs measured at '{r['node']}': act RMS {r['predicted_act_rms']:.3g} vs "
                f"{r['measured_act_rms']:.3g}, grad RMS {r['predicted_grad_rms']:.3g} vs {r['measured_grad_rms']:.3g} "
                f"(more than {factor:g}x apart{f'; {run - 1} following layer(s) inherit it' if run > 1 else ''}); "
                f"why: {'; '.join(why)}",
                node=node,
                act_log10_error=r.get("act_log10_error"),
                grad_log10_error=r.get("grad_log10_error"),
            )
