"""GA305 degenerate-normalization."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.normalization import DEGENERATE_SAMPLES, norm_samples
from gradaudit.rules.evidence.text import listing, where

#: Fewer values than this per statistic make a normalization's statistics noisy.
FEW_SAMPLES = 8


@register
class DegenerateNormalization(Rule):
    """A normalization computes its statistics from too few values with these inputs.

    ## What it does
    For every BatchNorm, InstanceNorm, GroupNorm and LayerNorm, counts the values each
    of its statistics is computed from with the example inputs' shapes (BatchNorm:
    batch x spatial positions per channel; InstanceNorm: spatial positions; GroupNorm:
    channels per group x positions; LayerNorm: the normalized shape), and reports those
    below 8 in one finding. Over one value a normalization's output is constant (its
    beta) and it passes no gradient; over two values ``a, b`` it outputs
    ``+-d / sqrt(d^2 + eps)`` with ``d = (a - b) / 2``, i.e. +-1 whatever the input
    unless the two values lie within ``sqrt(eps)`` of each other, and its Jacobian
    ``eps / (d^2 + eps)^(3/2)`` is set by eps and by how close the two values happen
    to be, not by the model. The vanishing/exploding rules therefore leave out the
    layers whose every path to the loss crosses such a normalization rather than call
    the model broken: the cause is the batch, not the architecture. The classic case
    is BatchNorm on the pooled (N, C, 1, 1) features of a squeeze-and-excitation block
    with a batch of 2.

    ## Why is this bad?
    Batch statistics from a handful of values are noisy, and from one or two they carry
    no information: training with such a batch makes those normalizations useless and
    their branches untrainable (torch refuses a single value per channel in training
    mode). If you train with larger batches, this finding is about the example inputs:
    audit with a batch you train with, so the prediction matches training.

    ## Example
    ```python
    gradaudit check net.py --input-shape 2,3,224,224     # SE blocks: BatchNorm over 2 values
    ```

    ## Use instead
    ```python
    gradaudit check net.py --input-shape 16,3,224,224    # the batch you train with
    ```
    or, to train with small batches, GroupNorm / LayerNorm in place of BatchNorm.

    ## References
    - Ioffe & Szegedy, "Batch Normalization", ICML 2015 (the backward pass).
    - Wu & He, "Group Normalization", ECCV 2018 (small-batch behaviour).
    """

    code = "GA305"
    name = "degenerate-normalization"
    category = "normalization"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        few = [(n, s) for n in analysis.graph if (s := norm_samples(n)) is not None and s < FEW_SAMPLES]
        if not few:
            return
        zero = [n for n, s in few if s <= DEGENERATE_SAMPLES]
        listed = [f"'{where(n)}' ({s})" for n, s in few]
        tail = (
            f"; {len(zero)} of them normalize {DEGENERATE_SAMPLES} values or fewer: their output is +-1 or "
            f"constant whatever the input, and the gradient through them is set by eps, not by the model"
            if zero else ""
        )
        yield self.finding(
            f"{len(few)} normalization(s) compute each statistic from fewer than {FEW_SAMPLES} values with these "
            f"inputs: {listing(listed)}{tail}; audit (and train) with a larger batch",
            node=few[0][0],
            fix="gradaudit.audit(model, torch.randn(16, *example.shape[1:]))  # the batch size you train with",
            layers=[where(n) for n, _ in few],
            samples=[s for _, s in few],
        )
