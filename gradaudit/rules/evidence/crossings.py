"""Where a profile passes the rules' limit (``crossing_decades``), with the fix of the
layers up to there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradaudit.rules.evidence.fixes import culprit_fix
from gradaudit.rules.evidence.profiles import ActivationProfile, GradientProfile, activation_profile, gradient_profile

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.propagation.engine import Analysis


@dataclass
class GradientCrossing:
    """Where the gradient profile passes ``limit`` times the last layer's value.

    ``cross`` is set when the change from the last quarter of the weight layers to the
    first (:attr:`GradientProfile.change_decades`) is past the limit: the index of the
    layer nearest the output already past it. ``warn`` is set when, short of that, the
    change reaches :data:`WARN_DECADES`: a fact about this model's profile (a rate
    extrapolated past the model's depth is never reported).
    """

    profile: GradientProfile
    limit: float
    cross: int | None
    warn: bool
    fix: str | None  # :func:`culprit_fix` of the profile's layers, when there is a finding


#: End-to-end change (decades) from which a risk is reported without a crossing.
WARN_DECADES = 2.0


def gradient_crossing(analysis: Analysis, direction: int) -> GradientCrossing | None:
    """Whether the gradient moves past ``10 ** (direction * crossing_decades)`` from the
    output's end of the network to the input's (:attr:`GradientProfile.change_decades`):
    ``direction`` +1 for growth toward the input (exploding, judged on the scale-free
    layers: see :func:`gradient_profile`), -1 for decay (vanishing). ``cross`` is then the
    layer nearest the output past that limit relative to the late median. None when
    there is no profile."""
    prof = gradient_profile(analysis, scale_free=direction > 0)
    if prof is None:
        return None
    decades = analysis.config["settings"].crossing_decades
    limit = 10.0 ** (direction * decades)
    change = direction * prof.change_decades
    cross = None
    if change >= decades:
        late = prof.late
        past = [i for i, g in enumerate(prof.grads) if (g >= late * limit if direction > 0 else g <= late * limit)]
        cross = max(past) if past else 0
    warn = cross is None and change >= min(WARN_DECADES, decades)
    fix = culprit_fix(analysis, prof.layers) if cross is not None or warn else None
    return GradientCrossing(prof, limit, cross, warn, fix)


def activation_crossing(analysis: Analysis, direction: int) -> tuple[ActivationProfile, int, str | None] | None:
    """The first weight layer whose predicted activation RMS is past
    ``10 ** (direction * crossing_decades)`` times the first layer's (``direction`` +1:
    growth, -1: decay), as ``(profile, index, fix)`` with the :func:`culprit_fix` of the
    layers up to it; None when no layer is past it or the first layer's RMS is 0."""
    prof = activation_profile(analysis)
    if prof is None or not prof.acts[0] > 0:
        return None
    first = prof.acts[0]
    limit = 10.0 ** (direction * analysis.config["settings"].crossing_decades)
    if direction > 0:
        hit = next((i for i, a in enumerate(prof.acts) if a >= first * limit), None)
    else:
        hit = next((i for i, a in enumerate(prof.acts) if a <= first * limit), None)
    if hit is None:
        return None
    return prof, hit, culprit_fix(analysis, prof.layers[: hit + 1])
