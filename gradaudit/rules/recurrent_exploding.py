"""GA501 recurrent-exploding."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import param_expr, recurrent_weights, where

#: Relative margin above 1/gamma before reporting (an orthogonal matrix has sigma = 1 up
#: to rounding).
MARGIN = 1e-3


@register
class RecurrentExploding(Rule):
    """A recurrent weight's largest singular value exceeds 1/gamma: gradients may explode
    over time.

    ## What it does
    For every ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells, computes the largest
    singular value of each recurrent weight ``weight_hh_l{k}`` (per gate block for LSTM
    and GRU) and compares it with 1/gamma, where gamma bounds the derivative of the
    block's nonlinearity: 1 for tanh and ReLU, 1/4 for the sigmoid gates (thresholds 1
    and 4). Severity is warning for a plain RNN and info for LSTM/GRU, whose gates
    multiply the recurrent path by factors below 1 and whose cell state adds a path the
    bound does not cover.

    ## Why is this bad?
    Backpropagation through time multiplies the gradient by W_hh^T diag(phi'(h_t)) once
    per step. With |phi'| <= gamma, a largest singular value below 1/gamma guarantees
    that the gradient vanishes over time, and one above 1/gamma is necessary for it to
    explode (Pascanu, Mikolov & Bengio 2013): over hundreds of steps a long-range
    gradient can grow without bound and one update can wreck the weights.

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
            if not over:
                continue
            parts = [
                f"{b.param}{'' if b.gate == 'hidden' else f' ({b.gate} gate, {b.activation})'}: largest singular "
                f"value {b.sigma_max:.3g} > 1/gamma = {b.threshold:g}"
                for b in over
            ]
            yield self.finding(
                f"recurrent weights of '{where(node)}' ({node.module_type}) allow gradients to explode over time "
                f"(Pascanu et al. 2013: sigma_max > 1/gamma is necessary for explosion, gamma = max|phi'|): "
                + "; ".join(parts),
                node=node,
                fix=f"nn.init.orthogonal_({param_expr(node, over[0].param)})  # and clip: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
                severity=severity,
                sigma_max=max(b.sigma_max for b in over),
                threshold=over[0].threshold,
                blocks=[(b.param, b.gate, b.sigma_max, b.threshold) for b in over],
            )
