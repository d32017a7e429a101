"""GA205 closed-gate."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node
from gradaudit.rules.evidence.text import name_list, where

_WHAT = {
    "zero-weight": "its weights are all zero",
    "zero-norm-gamma": "its scale (gamma) is {scale:.3g} at most",
    "small-scale": "the factor multiplying it is {scale:.3g} at most (layer scale / SkipInit / ReZero)",
}


@register
class ClosedGate(Rule):
    """A factor is initialised at or near zero on purpose; gradients are judged as if it had opened.

    ## What it does
    Finds the factors that well-known designs close at step 0 so a block starts as the
    identity or a head starts silent: a weight layer whose weights are all zero and
    whose output goes straight into a residual sum, a gate, a modulation or the model's
    output (a zero-initialised classification head; the zero last layer of a Fixup
    branch; DiT's adaLN-Zero modulation), a normalization whose gamma is zero (the
    zero-gamma last BatchNorm of a ResNet block), and an elementwise scale parameter of
    at most 1e-3 on a residual branch (layer scale in CaiT / ConvNeXt, SkipInit's alpha,
    ReZero). It explains each one, and tells that GA101/GA102 judged the gradient with
    these factors opened to unit gain (LeCun-normal weights, gamma = 1): the gradient
    that flows once the first optimizer steps open them. At step 0 the gradient behind
    a closed factor is exactly zero (or tiny), which is the design, not a defect.

    ## Why is this bad?
    It is not: this finding is informational. A zero or tiny factor at the end of a
    residual branch makes each block start as the identity, which lets very deep
    networks train without normalization (Fixup, SkipInit) and stabilises transformers
    (layer scale, adaLN-Zero); a zero head avoids a random initial bias in the logits.
    The same zero *inside* a plain stack, where no skip path carries the signal, cuts
    the network: that is GA204 (symmetric init), not this.

    ## Example
    ```python
    self.head = nn.Linear(768, 1000)
    nn.init.zeros_(self.head.weight)   # torchvision's ViT
    self.gamma = nn.Parameter(1e-6 * torch.ones(dim))   # ConvNeXt's layer scale
    ```

    ## Use instead
    Nothing to change. To see the exact step-0 gradients anyway, run
    `gradaudit check --probe`: the measured table shows them.

    ## References
    - Zhang, Dauphin & Ma, "Fixup Initialization", ICLR 2019.
    - De & Smith, "Batch Normalization Biases Residual Blocks Towards the Identity
      Function in Deep Networks" (SkipInit), NeurIPS 2020.
    - Touvron et al., "Going deeper with Image Transformers" (CaiT, layer scale), ICCV 2021.
    - Peebles & Xie, "Scalable Diffusion Models with Transformers" (adaLN-Zero), ICCV 2023.
    - Goyal et al., "Accurate, Large Minibatch SGD", 2017 (zero-gamma last BN).
    """

    code = "GA205"
    name = "closed-gate"
    category = "init"
    default_severity = "info"

    def check(self, analysis) -> Iterator[Finding]:
        gates = analysis.gates
        if not gates:
            return
        by_kind: dict[str, list] = {}
        for g in gates:
            by_kind.setdefault(g.kind, []).append(g)
        for kind, group in by_kind.items():
            nodes = [graph_node(analysis, g.node) for g in group]
            names = [g.module or where(n) if n is not None else g.node for g, n in zip(group, nodes)]
            what = _WHAT[kind].format(scale=max(g.scale for g in group))
            yield self.finding(
                f"{len(group)} closed gate(s) at {name_list(names)}: {what}, so the gradient behind them is zero or tiny at "
                "step 0 by design; the vanishing/exploding rules judged the gradient with them opened to unit gain",
                node=nodes[0],
                kind=kind,
                gates=names,
                scale=max(g.scale for g in group),
            )
