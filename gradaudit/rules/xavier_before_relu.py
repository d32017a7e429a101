"""GA203 xavier-before-relu."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.fixes import init_fix
from gradaudit.rules.evidence.inits import layer_inits
from gradaudit.rules.evidence.ops import RELU_FAMILY
from gradaudit.rules.evidence.structure import longest_chain, structure
from gradaudit.rules.evidence.text import fmt, where


@register
class XavierBeforeRelu(Rule):
    """Xavier/Glorot-scaled weights feed ReLU activations in a deep plain stack.

    ## What it does
    Finds the longest plain stack (no normalization, no residual add between) of hidden
    linear/conv layers whose weights have Xavier/Glorot or LeCun scale — n Var[w] within
    25% of 1 or of 2 n_in / (n_in + n_out) — and whose output goes through a ReLU-family
    activation. Reports it when the stack, with the layer it feeds, is at least
    ``deep`` (10) weight layers long.

    ## Why is this bad?
    Xavier's derivation assumes a linear (or tanh-near-0) unit. ReLU zeroes half its
    input, so E[relu(h)^2] = Var[h] / 2 and each Xavier layer halves the forward
    variance: over 30 layers the ratio is 2^-29 ~ 1.9e-9, and the gradient shrinks the
    same way on its way back. He et al. (2015): their 30-layer ReLU network stalls with
    Xavier init and trains with He init (n Var[w] = 2); at 22 layers both train, slower
    with Xavier.

    ## Example
    ```python
    layers = []
    for _ in range(30):
        layer = nn.Linear(256, 256)
        nn.init.xavier_uniform_(layer.weight)
        layers += [layer, nn.ReLU()]
    ```

    ## Use instead
    ```python
    for _ in range(30):
        layer = nn.Linear(256, 256)
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        layers += [layer, nn.ReLU()]
    ```

    ## References
    - He et al., "Delving Deep into Rectifiers", ICCV 2015, Sec. 2.2 and Fig. 3.
    - Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS 2010.
    """

    code = "GA203"
    name = "xavier-before-relu"
    category = "init"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        inits = layer_inits(analysis)

        def keep(n) -> bool:
            li = inits.get(n.name)
            return (
                li is not None
                and li.hidden
                and not li.normalized
                and not li.symmetric
                and li.act in RELU_FAMILY
                and li.xavier_like
            )

        chain = longest_chain(analysis, allow_norm=False, allow_residual=False, keep=keep)
        k = len(chain)
        if k == 0 or k + 1 < settings.deep:
            return
        lis = [inits[n.name] for n in chain]
        gains = [li.gain for li in lis]
        st = structure(analysis)
        fed = [e.dst for e in st.edges.get(chain[-1].name, []) if not e.norm and not e.residual]
        end = analysis.graph[fed[0]] if fed else chain[-1]
        src = analysis.stat(chain[0].inputs[0]) if chain[0].inputs else None
        out = analysis.stat(end.name)
        predicted = out.m2 / src.m2 if src is not None and src.m2 > 0 and out is not None else None
        theory = 2.0**-k
        n_layers = k + (1 if fed else 0)
        yield self.finding(
            f"{k} layers with Xavier/Glorot-scaled weights (n Var[w] = {fmt(min(gains))}..{fmt(max(gains))}, He "
            f"needs 2) feed {'/'.join(sorted({li.act for li in lis}))} in a plain stack of {n_layers} layers "
            f"('{where(chain[0])}' to '{where(end)}'): each ReLU halves the forward variance, 2^-{k} = "
            f"{fmt(theory)} over the stack"
            + (f" (predicted here: {fmt(predicted)})" if predicted is not None else ""),
            node=chain[0],
            fix=init_fix(analysis, chain[0]),
            layers=[n.module or n.name for n in chain],
            variance_ratio=predicted,
            theory=theory,
        )
