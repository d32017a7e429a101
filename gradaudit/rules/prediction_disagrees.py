"""GA607 prediction-disagrees."""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node
from gradaudit.rules.evidence.text import listing, where


@register
class PredictionDisagrees(Rule):
    """The probe's measurement and the static prediction differ by more than 2x at some layers.

    ## What it does
    Compares, per layer, the predicted and the measured RMS of the output and of its
    gradient, and names, in one finding, every layer where they differ by more than 2x
    (configurable as `disagree_factor`), with the factor and its direction ("grad 2.31x
    low": the prediction is 2.31x below the measurement), and the reasons the prediction
    may be unreliable there: the real inputs do not have the statistics the prediction
    assumed (N(0, 1) unless told otherwise), an op on the way was estimated by sampling
    instead of modelled, a layer's input is strongly correlated across the batch
    (moment propagation treats entries as independent). A prediction that is not finite
    counts as the largest disagreement, never as a value to skip.

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
        rows = [r for r in probe.agreement if _worst(r) is not None and abs(_worst(r)) > limit]
        if not rows:
            return
        listed = [f"'{_label(analysis, r)}' ({_gap(r)})" for r in rows]
        why = []
        if any(r.get("estimated") for r in rows):
            why.append("an op at or just before a layer was estimated by sampling, not modelled")
        if any(isinstance(r.get("input_batch_cosine"), float) and abs(r["input_batch_cosine"]) > 0.5 for r in rows):
            why.append("a layer's input is strongly correlated across the batch")
        if any(not math.isfinite(r[k]) for r in rows for k in ("predicted_act_rms", "predicted_grad_rms")):
            why.append("the prediction is not finite there (GA001)")
        for inp in probe.inputs:
            m, pr = inp.get("measured_rms"), inp.get("predicted_rms")
            if isinstance(m, float) and isinstance(pr, float) and m > 0 and pr > 0 and abs(math.log10(m / pr)) > 0.3:
                why.append(
                    f"input '{inp['input']}' has RMS {m:.3g} but the prediction assumed {pr:.3g} "
                    "(pass its mean and std to audit(..., input_stats=...))"
                )
        if not why:
            why.append("the moment model's independence assumptions do not hold there")
        yield self.finding(
            f"predicted and measured differ by more than {factor:g}x on {len(rows)} of {len(probe.agreement)} "
            f"layers: {listing(listed, limit=len(listed))}; why: {'; '.join(why)}",
            node=graph_node(analysis, rows[0]["node"]),
            layers=[_label(analysis, r) for r in rows],
            act_log10_error=[r.get("act_log10_error") for r in rows],
            grad_log10_error=[r.get("grad_log10_error") for r in rows],
        )


def _worst(row: dict) -> float | None:
    """The larger |log10(measured / predicted)| of a row's act and grad RMS (signed)."""
    errs = [e for e in (row.get("act_log10_error"), row.get("grad_log10_error")) if e is not None]
    return max(errs, key=abs) if errs else None


def _label(analysis, row: dict) -> str:
    node = graph_node(analysis, row["node"])
    return where(node) if node is not None else row["node"]


def _gap(row: dict) -> str:
    """``grad 2.31x low`` / ``act: prediction not finite`` for one row."""
    parts = []
    for key, name in (("act_log10_error", "act"), ("grad_log10_error", "grad")):
        e = row.get(key)
        if e is None or abs(e) <= math.log10(2):
            continue
        predicted = row[f"predicted_{name}_rms"]
        if not math.isfinite(predicted):
            parts.append(f"{name}: prediction not finite")
        elif not math.isfinite(e):
            parts.append(f"{name}: predicted {predicted:.3g}, measured {row[f'measured_{name}_rms']:.3g}")
        else:
            parts.append(f"{name} {10 ** abs(e):.2f}x {'low' if e > 0 else 'high'}")
    return ", ".join(parts)
