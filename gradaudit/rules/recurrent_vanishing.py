"""GA502 recurrent-vanishing."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.helpers import param_expr, recurrent_weights, where


@register
class RecurrentVanishing(Rule):
    """Every recurrent weight block's largest singular value is well below 1/gamma:
    gradients vanish over time.

    ## What it does
    For every ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells, computes the largest
    singular value of each recurrent weight ``weight_hh_l{k}`` (per gate block for LSTM
    and GRU) relative to 1/gamma (1 for tanh and ReLU blocks, 4 for sigmoid gates), and
    reports the module when the largest of these relative values is below 0.5 (setting
    ``recurrent_vanish_ratio``). Severity is warning for a plain RNN, info for LSTM/GRU,
    whose additive cell state carries gradient past the recurrent matrix.

    ## Why is this bad?
    Backpropagation through time multiplies the gradient by W_hh^T diag(phi'(h_t)) once
    per step; with |phi'| <= gamma its norm shrinks at least by sigma_max gamma per
    step. Below 1/gamma this is sufficient for vanishing (Pascanu, Mikolov & Bengio
    2013): at sigma_max gamma = 0.5 a dependency 20 steps back gets less than 1e-6 of
    the gradient, so the model cannot learn long-range structure.

    ## Example
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.normal_(rnn.weight_hh_l0, std=0.01)    # sigma_max ~ 0.23
    ```

    ## Use instead
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.orthogonal_(rnn.weight_hh_l0)           # all singular values 1
    ```

    ## References
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013, Sec. 3.
    - Bengio, Simard & Frasconi, "Learning long-term dependencies with gradient descent
      is difficult", IEEE TNN 1994.
    - Le, Jaitly & Hinton, "A Simple Way to Initialize Recurrent Networks of Rectified
      Linear Units", 2015 (identity init).
    """

    code = "GA502"
    name = "recurrent-vanishing"
    category = "vanishing"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        ratio = float(settings.extra.get("recurrent_vanish_ratio", 0.5))
        for node, blocks, severity in recurrent_weights(analysis):
            top = max(blocks, key=lambda b: b.sigma_max * b.gamma)
            if not top.sigma_max * top.gamma < ratio:
                continue
            per_step = top.sigma_max * top.gamma
            yield self.finding(
                f"recurrent weights of '{where(node)}' ({node.module_type}) make gradients vanish over time: the "
                f"largest singular value of every block is below {ratio:g}/gamma (largest: {top.param}"
                f"{'' if top.gate == 'hidden' else f' {top.gate} gate'}, {top.sigma_max:.3g} vs 1/gamma = "
                f"{top.threshold:g}); the gradient shrinks at least {per_step:.3g}x per step, "
                f"{per_step**20:.2g}x over 20 steps (Pascanu et al. 2013)",
                node=node,
                fix=f"nn.init.orthogonal_({param_expr(node, top.param)})",
                severity=severity,
                sigma_max=top.sigma_max,
                threshold=top.threshold,
            )
