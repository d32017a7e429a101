"""GA501 recurrent-exploding."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.recurrent import recurrent_time, recurrent_weights
from gradaudit.rules.evidence.text import param_expr, where

#: Relative margin above 1/gamma before reporting (an orthogonal matrix has sigma = 1 up
#: to rounding).
MARGIN = 1e-3


@register
class RecurrentExploding(Rule):
    """A recurrent weight's largest singular value exceeds 1/gamma, or the gradient grows
    over time: gradients may explode through the sequence.

    ## What it does
    For every ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells (a loop of cell calls
    counts once), computes the largest singular value of each recurrent weight
    ``weight_hh_l{k}`` (per gate block for LSTM and GRU) and compares it with 1/gamma,
    where gamma bounds the derivative of the block's nonlinearity: 1 for tanh and ReLU,
    1/4 for the sigmoid gates (thresholds 1 and 4). It also reads the gradient over time
    of a loss on the last step (predicted, or measured with ``--probe``): how many steps
    back it takes to grow 1e3-fold. It reports a module when the gradient grows over
    time, or when a block exceeds 1/gamma and the gradient does not demonstrably fade (a
    gradient that fades within the sequence is GA502's, whatever the bound). Severity is
    warning for a plain RNN and info for LSTM/GRU, whose gates multiply the recurrent
    path by factors below 1 and whose cell state adds a path the bound does not cover;
    error when the gradient grows past 1e3 within the sequence itself.

    ## Why is this bad?
    Backpropagation through time multiplies the gradient by W_hh^T diag(phi'(h_t)) once
    per step. With |phi'| <= gamma, a largest singular value below 1/gamma guarantees
    that the gradient vanishes over time, and one above 1/gamma is necessary for it to
    explode (Pascanu, Mikolov & Bengio 2013): over hundreds of steps a long-range
    gradient can grow without bound and one update can wreck the weights. Whether it
    does at this initialisation depends on how saturated the units are: the message
    quotes the per-step gain over time that the gates' statistics give.

    ## Example
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.normal_(rnn.weight_hh_l0, std=0.2)     # sigma_max ~ 0.2 * 2 sqrt(128) = 4.5
    ```

    ## Use instead
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.orthogonal_(rnn.weight_hh_l0)           # all singular values 1
    # and clip: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    ```

    ## References
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013, Sec. 3.
    - Saxe, McClelland & Ganguli, "Exact solutions to the nonlinear dynamics of learning
      in deep linear neural networks", ICLR 2014 (orthogonal init).
    - Hochreiter & Schmidhuber, "Long Short-Term Memory", 1997.
    """

    code = "GA501"
    name = "recurrent-exploding"
    category = "exploding"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        for node, blocks, severity in recurrent_weights(analysis):
            over = [b for b in blocks if b.sigma_max > b.threshold * (1 + MARGIN)]
            time = recurrent_time(analysis, node)
            grows = time is not None and time.curve.direction == "exploding"
            fades = time is not None and time.curve.direction == "vanishing" and time.within
            if not grows and (not over or fades):  # a gradient that fades over time is GA502's
                continue
            head = f"recurrent weights of '{where(node)}' ({node.module_type}) "
            if over:
                parts = [
                    f"{b.param}{'' if b.gate == 'hidden' else f' ({b.gate} gate, {b.activation})'}: largest singular "
                    f"value {b.sigma_max:.3g} > 1/gamma = {b.threshold:g}"
                    for b in over
                ]
                message = (head + "allow gradients to explode over time (Pascanu et al. 2013: sigma_max > 1/gamma "
                           "is necessary for explosion, gamma = max|phi'|): " + "; ".join(parts))
            else:
                message = head + "make gradients grow over time although no block exceeds 1/gamma"
            if time is not None:
                message += f"; {time.sentence()}"
            data = {"threshold": (over or blocks)[0].threshold, "blocks": [(b.param, b.gate, b.sigma_max, b.threshold)
                                                                           for b in over]}
            data["sigma_max"] = max(b.sigma_max for b in (over or blocks))
            if time is not None:
                data.update(per_step_gain=time.curve.gain, horizon=time.curve.horizon, steps=time.steps,
                            source=time.source)
            target = (over or blocks)[0].param
            yield self.finding(
                message,
                node=node,
                fix=f"nn.init.orthogonal_({param_expr(node, target)})  # and clip: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
                severity="error" if grows and time.within else severity,
                **data,
            )
