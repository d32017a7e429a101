"""GA502 recurrent-vanishing."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.recurrent import recurrent_kind, recurrent_time, recurrent_weights
from gradaudit.rules.evidence.text import param_expr, where


@register
class RecurrentVanishing(Rule):
    """Gradients vanish over time: every recurrent weight block is well below 1/gamma, or
    the gradient of the last step fades out within the sequence.

    ## What it does
    For every ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells (a loop of cell calls
    counts once), computes the largest singular value of each recurrent weight
    ``weight_hh_l{k}`` (per gate block for LSTM and GRU) relative to 1/gamma (1 for tanh
    and ReLU blocks, 4 for sigmoid gates), and reads the gradient over time of a loss on
    the last step (predicted from the weights and the gates' statistics, or measured with
    ``--probe``). It reports the module when the largest of the relative singular values
    is below 0.5 (setting ``recurrent_vanish_ratio``), or when that gradient falls below
    1e-3 of its last-step value within the sequence. Severity is warning for a plain RNN,
    info for LSTM/GRU, whose additive cell state is meant to carry gradient further.

    ## Why is this bad?
    Backpropagation through time multiplies the gradient by W_hh^T diag(phi'(h_t)) once
    per step; with |phi'| <= gamma its norm shrinks at least by sigma_max gamma per
    step. Below 1/gamma this is sufficient for vanishing (Pascanu, Mikolov & Bengio
    2013): at sigma_max gamma = 0.5 a dependency 20 steps back gets less than 1e-6 of
    the gradient, so the model cannot learn long-range structure (Bengio, Simard &
    Frasconi 1994). For an LSTM the gradient over time follows the forget gate (the
    cell's only path back, c_{t-1} = f c_t in the backward pass): at PyTorch's default
    init the forget gate is 0.5 on average and the gradient of the last step fades to
    1e-3 about 13 steps back.

    ## Example
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.normal_(rnn.weight_hh_l0, std=0.01)    # sigma_max ~ 0.23
    ```

    ## Use instead
    ```python
    rnn = nn.RNN(128, 128)
    nn.init.orthogonal_(rnn.weight_hh_l0)           # all singular values 1
    lstm = nn.LSTM(128, 256)
    nn.init.constant_(lstm.bias_ih_l0[256:512], 1.0)  # forget-gate bias 1
    ```

    ## References
    - Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013, Sec. 3.
    - Bengio, Simard & Frasconi, "Learning long-term dependencies with gradient descent
      is difficult", IEEE TNN 1994.
    - Gers, Schmidhuber & Cummins, "Learning to Forget: Continual Prediction with LSTM",
      Neural Computation 2000; Jozefowicz, Zaremba & Sutskever, "An Empirical
      Exploration of Recurrent Network Architectures", ICML 2015 (forget-gate bias 1).
    - Tallec & Ollivier, "Can recurrent neural networks warp time?", ICLR 2018 (gate
      biases set the time scale).
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
            bound = top.sigma_max * top.gamma < ratio
            time = recurrent_time(analysis, node)
            fades = time is not None and time.curve.direction == "vanishing" and time.within
            if not bound and not fades:
                continue
            parts = []
            if bound:
                per_step = top.sigma_max * top.gamma
                parts.append(
                    f"the largest singular value of every block is below {ratio:g}/gamma (largest: {top.param}"
                    f"{'' if top.gate == 'hidden' else f' {top.gate} gate'}, {top.sigma_max:.3g} vs 1/gamma = "
                    f"{top.threshold:g}); the gradient shrinks at least {per_step:.3g}x per step, "
                    f"{per_step**20:.2g}x over 20 steps (Pascanu et al. 2013)"
                )
            if time is not None:
                parts.append(time.sentence() + _gate_note(time.record))
            data = {"sigma_max": top.sigma_max, "threshold": top.threshold}
            if time is not None:
                data.update(per_step_gain=time.curve.gain, horizon=time.curve.horizon, steps=time.steps,
                            source=time.source)
            yield self.finding(
                f"recurrent weights of '{where(node)}' ({node.module_type}) make gradients vanish over time: "
                + "; ".join(parts),
                node=node,
                fix=_fix(node, top.param, bound),
                severity=severity,
                **data,
            )


def _gate_note(record) -> str:
    """The gate that sets the time scale of a gated layer."""
    if record.family == "lstm" and "forget_mean" in record.gates:
        return f"; the forget gate is {record.gates['forget_mean']:.2f} on average"
    if record.family == "gru" and "update_mean" in record.gates:
        return f"; the update gate is {record.gates['update_mean']:.2f} on average"
    return ""


def _fix(node, param: str, bound: bool) -> str:
    """Orthogonal recurrent weights for a plain RNN or weights below the bound; a gate bias
    that keeps the state (forget gate of an LSTM, update gate of a GRU) otherwise."""
    family = recurrent_kind(node)[0]
    if bound or family == "RNN":
        return f"nn.init.orthogonal_({param_expr(node, param)})"
    hidden = node.fn.hidden_size
    suffix = param[len("weight_hh"):]
    bias = param_expr(node, "bias_ih" + suffix)
    gate = "forget" if family == "LSTM" else "update"
    return (f"nn.init.constant_({bias}[{hidden}:{2 * hidden}], 1.0)  # {gate}-gate bias 1: the state is kept longer"
            " (Jozefowicz et al. 2015)")
