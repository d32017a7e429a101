"""GA206 identical-layers."""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.structure import graph_node


@register
class IdenticalLayers(Rule):
    """Consecutive layers start with identical weights (deep copies of one layer).

    ## What it does
    Finds a run of layers ``container.0``, ``container.1``, ... whose weights are equal
    value for value at initialisation, in separate tensors: what
    ``nn.TransformerEncoder(layer, N)``, ``nn.TransformerDecoder`` and any
    ``[copy.deepcopy(block) for _ in range(N)]`` build. It tells that the stack's
    gradients were evaluated numerically (the stack run on sampled inputs, as an unknown
    op is), and how much the gradient changes across the stack, measured against what
    independently drawn layers would give.

    ## Why is this bad?
    It is not an error, and the layers will differ after the first optimizer step, but
    it changes the step-0 gradient: the same Jacobian applied N times aligns the
    gradient with its dominant directions, so its size follows that matrix's
    eigenvalues, not the average gain of independent layers. A 24-layer Post-LN
    ``nn.TransformerEncoder`` at d 128 has a real gradient that falls about 10x over its
    top 12 layers and grows back 5x toward the input, where independent layers would
    fall 760x. It is also rarely what the author meant: a copied block repeats its
    initial weights, not its initialiser.

    ## Example
    ```python
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4)
    encoder = nn.TransformerEncoder(layer, num_layers=24)  # 24 deep copies of `layer`
    ```

    ## Use instead
    To start from independent draws, re-initialise each copy:
    ```python
    for layer in encoder.layers:
        for m in layer.modules():
            if hasattr(m, "reset_parameters") and m is not layer:
                m.reset_parameters()
    ```
    (``nn.MultiheadAttention`` re-draws in ``_reset_parameters()``.)

    ## References
    - PyTorch documentation, ``nn.TransformerEncoder``: "TransformerEncoder is a stack of
      N encoder layers" built with ``copy.deepcopy`` (``_get_clones``).
    - Ginibre, "Statistical Ensembles of Complex, Quaternion, and Real Matrices",
      J. Math. Phys. 6, 1965 (powers of one random matrix).
    """

    code = "GA206"
    name = "identical-layers"
    category = "init"
    default_severity = "info"

    def check(self, analysis) -> Iterator[Finding]:
        for stack in analysis.tied:
            node = graph_node(analysis, stack.nodes[0])
            change, independent = _decades(stack.measured_gain), _decades(stack.predicted_gain)
            effect = (
                f"the gradient's RMS changes {change:+.2f} decades across them (independently drawn layers: {independent:+.2f})"
                if change is not None and independent is not None
                else "no gradient reaches the stack's input"
            )
            yield self.finding(
                f"the {stack.blocks} layers of '{stack.container}' start with identical weights (deep copies of one "
                f"layer); their gradients were evaluated numerically on sampled inputs: {effect}",
                node=node,
                container=stack.container,
                blocks=stack.blocks,
                decades=change,
                independent_decades=independent,
            )


def _decades(gain: float) -> float | None:
    """log10 of an RMS ratio given as a ratio of mean squares (input over output); None
    when there is none (0, or not measured)."""
    return 0.5 * math.log10(gain) if math.isfinite(gain) and gain > 0 else None
