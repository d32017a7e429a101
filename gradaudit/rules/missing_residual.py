"""GA303 missing-residual."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, layer_grad
from gradaudit.rules.evidence.structure import followed_by_norm, longest_chain, structure
from gradaudit.rules.evidence.text import module_expr, where


@register
class MissingResidual(Rule):
    """Twenty or more weight layers in sequence without a residual connection.

    ## What it does
    Finds the longest chain of weight layers, each feeding the next, with no residual
    add (``x + f(x)``, an add whose operands come from paths of different depth) between
    consecutive layers, and reports it when it has at least 20 layers (setting
    ``residual_depth``). Severity is warning, or info when the chain is normalized
    (normalization keeps the forward scale but not the gradient path short).

    ## Why is this bad?
    He et al. (2016) found plain networks of 20+ layers train to higher *training*
    error than shallower ones (the degradation problem), even with BatchNorm, while the
    same depth with identity shortcuts trains well. A residual add gives the gradient a
    path that skips the branch, so the Jacobian stays close to the identity at any
    depth; without it every layer's gain multiplies into the gradient.

    ## Example
    ```python
    layers = []
    for _ in range(24):
        layers += [nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU())
        def forward(self, x):
            return x + self.f(x)
    model = nn.Sequential(*[Block() for _ in range(24)])
    ```

    ## References
    - He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    - Balduzzi et al., "The Shattered Gradients Problem", ICML 2017.
    """

    code = "GA303"
    name = "missing-residual"
    category = "residual"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        need = int(settings.extra.get("residual_depth", 20))
        chain = longest_chain(analysis, allow_norm=True, allow_residual=False)
        if len(chain) < need:
            return
        st = structure(analysis)
        names = {n.name for n in chain}
        normed = any(followed_by_norm(analysis, n) for n in chain) or any(
            e.norm for n in chain for e in st.edges.get(n.name, []) if e.dst in names
        )
        block = next(
            (n for n in chain if n.module and n.inputs and analysis.graph[n.inputs[0]].shape == n.shape),
            None,
        )
        fix = (
            f"x = x + {module_expr(block.module)}(x)  # identity shortcut around this layer; likewise for "
            f"the others (or blocks of two)"
            if block is not None
            else "x = x + block(x)  # identity shortcut around each block (1x1 projection where shapes differ)"
        )
        g0, g1 = layer_grad(analysis, chain[0]), layer_grad(analysis, chain[-1])
        yield self.finding(
            f"{len(chain)} weight layers in sequence with no residual connection ('{where(chain[0])}' to "
            f"'{where(chain[-1])}'{', normalized' if normed else ''}): every layer's gain multiplies into the "
            f"gradient (predicted {GRADIENT_NAME} {g0:.3g} at the first vs {g1:.3g} at the last)",
            node=chain[0],
            fix=fix,
            severity="info" if normed else "warning",
            layers=len(chain),
            normalized=normed,
        )
