"""GA301 saturating-activation-stack."""

from __future__ import annotations

import math
from typing import Callable, Iterator

from gradaudit.rules.base import Finding, Rule, register
from gradaudit.rules.evidence.fixes import add_norm_fix, swap_activation_fix
from gradaudit.rules.evidence.inits import layer_inits
from gradaudit.rules.evidence.ops import SATURATING
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, layer_grad
from gradaudit.rules.evidence.structure import longest_chain, next_activation
from gradaudit.rules.evidence.text import factor_text, fmt, where


def sigmoid_prime(u: float) -> float:
    """sigma'(u) = sigma(u) (1 - sigma(u)), at most 1/4 (at u = 0)."""
    s = 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))
    return s * (1.0 - s)


def tanh_prime(u: float) -> float:
    """tanh'(u) = 1 - tanh(u)^2, at most 1 (at u = 0)."""
    return 1.0 - math.tanh(u) ** 2


def useful_band(w: float, dphi: Callable[[float], float] = sigmoid_prime) -> float:
    """Width of the set of inputs x with |phi'(w x + b) w| > 1, maximised over the bias b.

    For an even, unimodal phi' (sigmoid, tanh) the set is |w x + b| < u* with u* >= 0
    solving phi'(u*) = 1 / |w| (bisection), so it is an interval of width 2 u* / |w|
    whatever b (b only shifts it). Empty, width 0, when |w| phi'(0) <= 1: for the sigmoid
    |w| <= 4, since sigma'(u) <= 1/4.
    """
    a = abs(w)
    if a == 0 or a * dphi(0.0) <= 1.0:
        return 0.0
    target = 1.0 / a
    lo, hi = 0.0, 1.0
    while dphi(hi) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if dphi(mid) > target:
            lo = mid
        else:
            hi = mid
    return 2.0 * 0.5 * (lo + hi) / a


def widest_band(dphi: Callable[[float], float] = sigmoid_prime) -> tuple[float, float]:
    """``(width, |w|)``: the widest :func:`useful_band` over the weight, by golden-section
    search on log|w| (the band is 0 at |w| = 1/phi'(0), rises, then shrinks like
    ln|w| / |w|). For the sigmoid: about 0.45 wide at |w| ~ 6.9 (the seed article on
    sigmoid explosion; ORACLES.md)."""
    lo = math.log(1.0 / dphi(0.0))
    hi = lo + math.log(1e3)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = useful_band(math.exp(a), dphi), useful_band(math.exp(b), dphi)
    for _ in range(200):
        if fa < fb:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = useful_band(math.exp(b), dphi)
        else:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = useful_band(math.exp(a), dphi)
    w = math.exp(0.5 * (lo + hi))
    return useful_band(w, dphi), w


_DERIVATIVE = {"sigmoid": (sigmoid_prime, "1/4"), "tanh": (tanh_prime, "1")}


@register
class SaturatingActivationStack(Rule):
    """Three or more saturating activations in a chain with no normalization between.

    ## What it does
    Finds the longest plain chain of weight layers (no normalization and no residual add
    between) whose outputs go through sigmoid, tanh, hardtanh, hardsigmoid, softsign or
    logsigmoid, and reports it when it holds at least 3 of them (setting
    ``saturating_stack``). The message quotes the derivative bound and the predicted
    per-layer gradient factor along the chain.

    ## Why is this bad?
    sigma'(x) <= 1/4, so a sigmoid layer passes gradient without shrinking it,
    |sigma'(w x + b) w| > 1, only when |w| > 4, and then only for inputs x in a narrow
    band: at most about 0.45 wide, reached at |w| ~ 6.9 (computed by
    :func:`widest_band`). Outside it the unit is saturated and passes almost nothing.
    Stacked, these factors multiply: gradients vanish with small weights and saturate
    (or explode, with large ones) at depth. tanh'(x) <= 1 has the same problem on a
    wider band. A normalization layer keeps tanh pre-activations near the useful band;
    for the sigmoid it is not enough (E[sigma'(z)^2] = 0.045 at unit variance, so the
    gradient still shrinks ~5x per layer): use a ReLU-family activation.

    ## Example
    ```python
    model = nn.Sequential(
        nn.Linear(64, 64), nn.Sigmoid(),
        nn.Linear(64, 64), nn.Sigmoid(),
        nn.Linear(64, 64), nn.Sigmoid(),
        nn.Linear(64, 10),
    )
    ```

    ## Use instead
    ```python
    model = nn.Sequential(
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    ```

    ## References
    - Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS 2010 (saturation of stacked sigmoids).
    - LeCun et al., "Efficient BackProp", 1998.
    - Ioffe & Szegedy, "Batch Normalization", ICML 2015.
    """

    code = "GA301"
    name = "saturating-activation-stack"
    category = "saturation"
    default_severity = "warning"

    def check(self, analysis) -> Iterator[Finding]:
        settings = analysis.config["settings"]
        need = int(settings.extra.get("saturating_stack", 3))
        inits = layer_inits(analysis)

        def keep(n) -> bool:
            li = inits.get(n.name)
            normalized = li.normalized if li is not None else False
            return not normalized and next_activation(analysis, n) in SATURATING

        chain = longest_chain(analysis, allow_norm=False, allow_residual=False, keep=keep)
        if len(chain) < need:
            return
        acts = [next_activation(analysis, n) for n in chain]
        kinds = sorted(set(acts))
        g0, g1 = layer_grad(analysis, chain[0]), layer_grad(analysis, chain[-1])
        steps = len(chain) - 1
        per_layer = (g0 / g1) ** (1.0 / steps) if g0 > 0 and g1 > 0 else 0.0
        facts = []
        if "sigmoid" in kinds:
            band, w = widest_band(sigmoid_prime)
            facts.append(
                f"sigmoid'(x) <= 1/4, so a layer keeps the gradient (|sigmoid'(wx + b) w| > 1) only if |w| > 4, "
                f"and then only for inputs in a band at most {band:.2f} wide (at |w| ~ {w:.1f})"
            )
        if "tanh" in kinds:
            band, w = widest_band(tanh_prime)
            facts.append(
                f"tanh'(x) <= 1, so |tanh'(wx + b) w| > 1 needs |w| > 1 and inputs in a band at most {band:.2f} "
                f"wide (at |w| ~ {w:.1f})"
            )
        others = [k for k in kinds if k not in _DERIVATIVE]
        if others:
            facts.append(f"{'/'.join(others)} saturate outside a bounded input range and pass no gradient there")
        yield self.finding(
            f"{len(chain)} {'/'.join(kinds)} activations in a chain with no normalization between "
            f"('{where(chain[0])}' to '{where(chain[-1])}'): {'; '.join(facts)}. The predicted {GRADIENT_NAME} changes "
            f"{fmt(per_layer)}x per layer along the chain ({factor_text(g0 / g1) if g1 > 0 else 'from exactly 0'} over it)",
            node=chain[0],
            fix=swap_activation_fix(analysis, chain[0]) if 'sigmoid' in kinds else add_norm_fix(chain[0]),
            count=len(chain),
            activations=kinds,
            per_layer_gradient_factor=per_layer,
        )
