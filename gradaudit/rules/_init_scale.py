"""Shared check of GA201 init-too-large and GA202 init-too-small (not a rule itself)."""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.propagation.coverage import finite_stats
from gradaudit.propagation.depth import layer_gradient
from gradaudit.rules.evidence.fixes import init_fix
from gradaudit.rules.evidence.inits import layer_inits
from gradaudit.rules.evidence.ops import RELU_FAMILY
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, log10_ratio
from gradaudit.rules.evidence.structure import longest_chain
from gradaudit.rules.evidence.text import fmt, times, where


#: Layers a mis-scaled gain must compound over to matter: inside one residual branch
#: (fc1 -> act -> fc2 of a transformer MLP, initialised small on purpose to keep the
#: branch small against the residual stream) two layers are a scale, not a depth effect.
MIN_CHAIN = 3


def mis_scaled_run(analysis, direction: int):
    """The longest plain chain (no normalization, no residual add between) of hidden
    layers whose n Var[w] is off by more than ``init_tolerance`` (2x) from the gain their
    activation needs, in ``direction`` (+1 too large, -1 too small), and how much the
    predicted statistics compound across it.

    Excluded: layers followed by normalization (it rescales them), symmetric layers
    (GA204) and, for "too small", Xavier-scaled layers before ReLU (GA203).

    Returns ``(chain, inits, decades)`` with ``decades`` the larger of the predicted
    change of activation RMS and of gradient RMS across the chain, in the direction the
    mis-scaling pushes (growth for too large, decay for too small); None when no chain.
    """
    settings = analysis.config["settings"]
    tol = float(settings.extra.get("init_tolerance", 2.0))
    inits = layer_inits(analysis)

    def bad(n) -> bool:
        li = inits.get(n.name)
        if li is None or not li.hidden or li.normalized or li.symmetric:
            return False
        if direction > 0:
            return li.ratio > tol
        if li.act in RELU_FAMILY and li.xavier_like:
            return False
        return li.ratio < 1.0 / tol

    chain = longest_chain(analysis, allow_norm=False, allow_residual=False, keep=bad)
    if len(chain) < MIN_CHAIN:
        return None
    a0, a1 = analysis.stat(chain[0].name), analysis.stat(chain[-1].name)
    if not (finite_stats(a0) and finite_stats(a1)):
        return None  # an incomplete prediction is GA001's, never judged
    act_change = direction * log10_ratio(a1.act_rms, a0.act_rms)
    g0, g1 = layer_gradient(chain[0], a0.grad_rms), layer_gradient(chain[-1], a1.grad_rms)
    grad_change = direction * log10_ratio(g0, g1)
    if not (math.isfinite(act_change) and math.isfinite(grad_change)):
        return None  # an exact zero somewhere: a closed gate or a cut network, other rules' case
    return chain, inits, max(act_change, grad_change), act_change, grad_change


def check(rule, analysis, direction: int) -> Iterator:
    settings = analysis.config["settings"]
    need = float(settings.extra.get("init_compound_decades", 1.0))
    found = mis_scaled_run(analysis, direction)
    if found is None:
        return
    chain, inits, decades, act_change, grad_change = found
    if not decades >= need:
        return
    lis = [inits[n.name] for n in chain]
    gains = [li.gain for li in lis]
    ratios = [li.ratio for li in lis]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if all(r > 0 for r in ratios) else 0.0
    first = lis[0]
    acts = sorted({li.act or "no activation" for li in lis})
    schemes = sorted({f"{li.scheme}'s {li.needed:g} for {li.act or 'a linear layer'}" for li in lis})
    word = "above" if direction > 0 else "below"
    factor = geo if direction > 0 else (1 / geo if geo > 0 else math.inf)
    moved = "grows" if direction > 0 else "falls"
    yield rule.finding(
        f"{len(chain)} layers in a plain stack ('{where(chain[0])}' to '{where(chain[-1])}', "
        f"{'/'.join(acts)}) are initialised {fmt(factor)}x {word} the gain their activation needs: "
        f"n Var[w] = {fmt(min(gains))}..{fmt(max(gains))} vs {', '.join(schemes)}; "
        f"across them the predicted activation RMS {moved} {times(abs(act_change))}x"
        f"{'' if act_change >= 0 else ' the other way'} and the {GRADIENT_NAME} toward the input "
        f"{moved} {times(abs(grad_change))}x{'' if grad_change >= 0 else ' the other way'}",
        node=chain[0],
        fix=init_fix(analysis, chain[0]),
        layers=[n.module or n.name for n in chain],
        n_var_w=first.gain,
        needed=first.needed,
        ratio=geo,
        decades=decades,
    )
