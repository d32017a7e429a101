"""GA104 activation-blowup."""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.crossings import activation_crossing
from gradaudit.rules.evidence.fixes import culprit_fix
from gradaudit.rules.evidence.text import fmt, where

#: Largest finite float16 value.
FLOAT16_MAX = 65504.0


@register
class ActivationBlowup(Rule):
    """Predicted activations grow by 1000x or more across the layers, or overflow float16.

    ## What it does
    Propagates the mean and second moment of every activation forward from standard
    normal inputs through the model's actual weights and reports (1) the first weight
    layer whose output RMS is at least 1e3 times the first weight layer's, and (2) the
    first value whose predicted RMS times 6 (a 6-sigma value, which a tensor of ~1e8
    Gaussian entries reaches) exceeds 65504, the largest float16 number (setting
    ``fp16_sigmas`` changes the 6). The overflow finding is an error when that value is
    float16 in the model itself, a warning otherwise (it overflows under
    ``torch.autocast(dtype=torch.float16)``). The growth in (1) counts the weight
    layers whose output no normalization rescales (a norm restores the scale, so
    what it reads does not carry on), on the probe's measurement when `--probe` ran.

    ## Why is this bad?
    Each layer multiplies the second moment of its input by n Var[w] times the
    activation's gain; above 1 the signal grows geometrically (the seed example: fan-in
    100 with sigma_w = 0.5 multiplies the variance by 25 per layer). Huge activations
    saturate any bounded nonlinearity, make the loss overflow, and in float16 become inf
    and then NaN in the first forward pass.

    ## Example
    ```python
    layers = []
    for _ in range(8):
        layer = nn.Linear(100, 100)
        nn.init.normal_(layer.weight, std=0.5)      # n Var[w] = 25
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers)
    ```

    ## Use instead
    ```python
    for _ in range(8):
        layer = nn.Linear(100, 100)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")   # n Var[w] = 2
        layers += [layer, nn.ReLU()]
    ```

    ## References
    - He et al., "Delving Deep into Rectifiers", ICCV 2015.
    - Micikevicius et al., "Mixed Precision Training", ICLR 2018.
    - IEEE 754-2008 binary16: largest finite value 65504.
    """

    code = "GA104"
    name = "activation-blowup"
    category = "exploding"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        hit = activation_crossing(analysis, +1)
        if hit is not None:
            prof, i, fix = hit
            layers, acts = prof.layers, prof.acts
            node = layers[i]
            yield self.finding(
                f"{prof.source} activation RMS grows from {fmt(acts[0])} at '{where(layers[0])}' to "
                f"{fmt(acts[i])} at '{where(node)}' (layer {i + 1} of {len(layers)}, "
                f"{acts[i] / acts[0]:.3g}x larger); {prof.rate_text(i)}",
                node=node,
                fix=fix,
                ratio=acts[i] / acts[0],
                layer_index=i + 1,
            )
        yield from self._float16(analysis, settings)

    def _float16(self, analysis, settings) -> Iterator[Finding]:
        sigmas = float(settings.extra.get("fp16_sigmas", 6.0))
        for node in analysis.graph:
            if node.op in ("input", "param", "output"):
                continue
            s = analysis.stat(node.name)
            if s is None or not s.act_rms * sigmas > FLOAT16_MAX:
                continue
            meta = node.meta
            native = meta is not None and meta.dtype == "float16"
            order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
            layers = [n for n in analysis.weight_layers() if analysis.stat(n.name) is not None]
            upto = [n for n in layers if order[n.name] <= order[node.name]]
            fix = (culprit_fix(analysis, upto) if upto else None) or (
                "torch.set_autocast_dtype('cuda', torch.bfloat16)  # bfloat16 reaches 3.4e38, float16 65504"
            )
            yield self.finding(
                f"predicted RMS {fmt(s.act_rms)} at '{where(node)}' ({node.op}) puts {sigmas:g}-sigma values at "
                f"{fmt(s.act_rms * sigmas)}, beyond float16's largest value 65504"
                + (" (this value is float16 in the model)" if native else "; under float16 autocast they become inf"),
                node=node,
                fix=fix,
                severity="error" if native else "warning",
                act_rms=s.act_rms,
                float16=True,
            )
            return
