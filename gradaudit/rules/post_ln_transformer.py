"""GA401 post-ln-transformer."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.fixes import features
from gradaudit.rules.evidence.ops import TRANSPARENT
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, layer_grad
from gradaudit.rules.evidence.structure import is_residual_add
from gradaudit.rules.evidence.text import fmt, module_expr, parent

_LN = frozenset({"layer_norm", "rms_norm"})


def post_ln_sites(analysis) -> list:
    """LayerNorm/RMSNorm nodes applied to a residual sum that only the norm reads:
    ``x = norm(x + f(x))``. In a Pre-LN block the sum also continues un-normalized into
    the next residual add, so it is not a site."""
    sites = []
    for node in analysis.graph:
        if node.op not in _LN:
            continue
        srcs = analysis.prev_nodes(node, TRANSPARENT)
        if len(srcs) != 1 or not is_residual_add(analysis, srcs[0]):
            continue
        readers = analysis.next_nodes(srcs[0], TRANSPARENT)
        if all(r.op in _LN for r in readers):
            sites.append(node)
    return sites


@register
class PostLnTransformer(Rule):
    """LayerNorm after the residual add (Post-LN) in a deep stack of blocks.

    ## What it does
    Finds LayerNorm/RMSNorm applied to a residual sum whose value nothing else reads,
    ``x = norm(x + f(x))`` (``nn.TransformerEncoderLayer(norm_first=False)``, the
    original Transformer and BERT), counts the blocks (parent modules) where it
    happens, and reports when there are at least 6 (setting ``post_ln_blocks``). The
    message quotes the predicted gradient RMS of the weights in the first and the last
    such block.

    ## Why is this bad?
    Xiong et al. (2020) show that at initialization the expected gradient of the
    parameters near the output of a Post-LN Transformer is large, O(d sqrt(ln d))
    for the last FFN independent of depth, and that it grows with the layer index
    toward the output, while for Pre-LN (``x = x + f(norm(x))``) it is
    O(d sqrt(ln d / L)) and does not grow. (With small residual branches, as with
    PyTorch's default init, the Post-LN profile is nearly flat and the Pre-LN one falls
    toward the output; the skew of Post-LN toward the output relative to Pre-LN remains.) Post-LN therefore needs a learning-rate
    warmup: Post-LN BERT diverged at lr 3e-4 without it, and deeper Post-LN stacks are
    harder to train at all.

    ## Example
    ```python
    layer = nn.TransformerEncoderLayer(512, 8, norm_first=False)   # x = norm(x + f(x))
    model = nn.TransformerEncoder(layer, num_layers=12)
    ```

    ## Use instead
    ```python
    layer = nn.TransformerEncoderLayer(512, 8, norm_first=True)    # x = x + f(norm(x))
    model = nn.TransformerEncoder(layer, num_layers=12, norm=nn.LayerNorm(512))
    ```

    ## References
    - Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020.
    - Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (Post-LN).
    - Liu et al., "Understanding the Difficulty of Training Transformers", EMNLP 2020.
    """

    code = "GA401"
    name = "post-ln-transformer"
    category = "normalization"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        need = int(settings.extra.get("post_ln_blocks", 6))
        sites = post_ln_sites(analysis)
        blocks: dict[str, list] = {}
        for node in sites:
            blocks.setdefault(parent(node.module) or node.name, []).append(node)
        if len(blocks) < need:
            return
        names = list(blocks)
        first, last = names[0], names[-1]

        def block_grad(prefix: str) -> float | None:
            layers = [n for n in analysis.weight_layers() if n.module and n.module.startswith(prefix + ".")]
            vals = [layer_grad(analysis, n) for n in layers if analysis.stat(n.name) is not None]
            return (sum(v * v for v in vals) / len(vals)) ** 0.5 if vals else None

        g_first, g_last = block_grad(first), block_grad(last)
        numbers = (
            f"; predicted {GRADIENT_NAME} of the weight layers: {fmt(g_first)} in '{first}', "
            f"{fmt(g_last)} in '{last}'"
            if g_first is not None and g_last is not None
            else ""
        )
        node = blocks[first][0]
        modules = {n.module for n in analysis.graph if n.module}
        if node.module and {f"{first}.self_attn", f"{first}.linear1"} <= modules:
            fix = (
                f"nn.TransformerEncoderLayer({features(node)}, nhead, norm_first=True)  "
                f"# Pre-LN for '{first}' and the other {len(blocks) - 1} blocks"
            )
        else:
            norm = module_expr(node.module) if node.module else "norm"
            fix = f"x = x + f({norm}(x))  # Pre-LN, instead of x = {norm}(x + f(x))"
        yield self.finding(
            f"LayerNorm follows the residual add (Post-LN, x = norm(x + f(x))) in {len(blocks)} blocks "
            f"('{first}' to '{last}'): at init the gradient of the weights near the output is large, "
            f"O(d sqrt(ln d)) for the last layer whatever the depth, against O(d sqrt(ln d / L)) for Pre-LN "
            f"(x = x + f(norm(x))), and it is skewed toward the output rather than toward the input (Xiong et "
            f"al. 2020), so training needs learning-rate warmup{numbers}",
            node=node,
            fix=fix,
            blocks=len(blocks),
            first_block_grad_rms=g_first,
            last_block_grad_rms=g_last,
        )
