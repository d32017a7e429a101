"""GA606 gradient-norm-scale."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register


def _round(x: float) -> str:
    return f"{x:.3g}"


def _nice(x: float) -> str:
    """Two significant digits, as a threshold is written in code."""
    return f"{float(f'{x:.2g}'):g}"


@register
class GradientNormScale(Rule):
    """The measured global gradient norm, with a gradient-clipping threshold to match.

    ## What it does
    Reports the global gradient norm ||dL/dtheta|| over all trainable parameters measured
    by the probe and, when the probe ran your own loss (`loss_fn` and a batch), writes
    the `clip_grad_norm_` call for it: `max_norm` = min(10 m, max(2 m, largest norm
    measured)) from the mean m of the norms over the batches (draws), and the equivalent
    element-wise `clipvalue` for Keras (`clip_grad_value_` in torch): the largest
    gradient entry of an ordinary step times max_norm / m. Without your loss the norm is
    that of the synthetic loss L = sum <y, g>, g ~ N(0, 1): its scale is relative, and
    the finding says how to measure the real one.

    ## Why is this bad?
    It is information, not a fault: a clipping threshold far below the typical norm
    clips every step (a different learning rate in disguise); far above it, clipping
    never acts against the occasional exploding step. Pascanu, Mikolov & Bengio (2013)
    found thresholds from half to ten times the average gradient norm to converge. A
    threshold only means something in the units of the loss you train with: a
    mean-reduced cross-entropy and the synthetic loss differ by orders of magnitude.

    ## Example
    ```python
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)   # clips everything
    ```

    ## Use instead
    ```python
    report = gradaudit.audit(model, loss_fn=lambda out, b: F.cross_entropy(out, b[1]), batch=(x, y))
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=measured_max_norm)
    ```

    ## References
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013 (section 3.2, gradient norm clipping).
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
        clip = probe.loss.clip() if probe.loss is not None else None
        if clip is not None:
            m = clip["mean_grad_norm"]
            spread = (
                f" (min {_round(clip['min_grad_norm'])}, max {_round(clip['max_grad_norm'])})"
                if clip["max_grad_norm"] > clip["min_grad_norm"] else ""
            )
            yield self.finding(
                f"global gradient norm of your loss {probe.loss.name}: mean {m:.4g} over {len(probe.loss.grad_norms)} "
                f"draw(s) on {probe.loss.batches} batch(es){spread}; Pascanu et al. (2013) found clipping thresholds from 0.5x to 10x the average norm "
                f"({_round(clip['low'])} to {_round(clip['high'])}) to work; max_norm {_nice(clip['max_norm'])} "
                f"leaves the measured steps unclipped. Keras: global_clipnorm={_nice(clip['max_norm'])} (the same), "
                f"or element-wise clipvalue={_nice(clip['clip_value'])}",
                fix=f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={_nice(clip['max_norm'])})",
                loss=probe.loss.name,
                relative=False,
                total_grad_norm=m,
                max_norm=clip["max_norm"],
                clip_value=clip["clip_value"],
                low=clip["low"],
                high=clip["high"],
            )
            return
        norm = probe.total_grad_norm
        if not math.isfinite(norm) or norm <= 0:
            return
        yield self.finding(
            f"measured global gradient norm {norm:.4g} of the synthetic loss L = sum <y, g>, g ~ N(0, 1) (mean of "
            f"{probe.draws} draw(s)): a relative figure, not a clipping threshold for your loss; give gradaudit "
            "your loss (loss_fn(output, batch) and a batch) for max_norm in its units",
            fix="gradaudit.audit(model, loss_fn=loss_fn, batch=(x, y))  # or loss_fn and example_batch in the model file",
            loss="synthetic",
            relative=True,
            total_grad_norm=norm,
            low=0.5 * norm,
            high=10 * norm,
        )
