"""Shared check of GA101 vanishing-gradients and GA102 exploding-gradients (not a rule itself).

Both judge one profile (:func:`gradaudit.rules.evidence.profiles.gradient_profile`:
measured when the probe ran, else predicted, with closed gates opened) of one quantity,
the layer gradient G_l of :mod:`gradaudit.propagation.depth`, by one figure: its change
from the last weight layer to the first, estimated from the medians of the last and the
first quarter of the layers
(:attr:`~gradaudit.rules.evidence.profiles.GradientProfile.change_decades`). The message's first
clause quotes that figure, and is also the report's headline. Judged on the profile with
closed gates opened (a what-if: every zero/small-initialised gate at unit gain at once),
a change past the limit is a warning, not an error.
"""

from __future__ import annotations

import math
from typing import Iterator

from gradaudit.rules.evidence.crossings import gradient_crossing
from gradaudit.rules.evidence.profiles import GRADIENT_NAME, GRADIENT_TERM, OPENED
from gradaudit.rules.evidence.text import factor_text, where

_WORDS = {-1: ("falls", "of"), +1: ("grows", "times")}


def check(rule, analysis, direction: int) -> Iterator:
    c = gradient_crossing(analysis, direction)
    if c is None or (c.cross is None and not c.warn):
        return
    prof = c.profile
    layers, grads, q = prof.layers, prof.grads, prof.group
    moves, rel = _WORDS[direction]
    decades = prof.change_decades
    ratio = 10.0 ** decades if math.isfinite(decades) else (0.0 if decades < 0 else math.inf)
    change = ratio if direction > 0 else (1 / ratio if ratio > 0 else 0.0)
    which = "weight layers whose output no normalization rescales" if direction > 0 else "weight layers"
    how = f", from the medians of the first and last {q}" if q > 1 else ""
    head = (
        f"{prof.source} {GRADIENT_NAME} {moves} {factor_text(change)} from the last weight layer to the first "
        f"({_decades(decades)} over {len(layers)} {which}{how})"
    )
    data = dict(ratio=ratio, decades=decades, group=q, decades_per_layer=prof.decades_per_layer,
                source=prof.source, layers=len(layers))
    if c.cross is not None:
        node = layers[c.cross]
        at = grads[c.cross] / prof.late if prof.late > 0 else 0.0  # the last layers' own gradient underflowed
        # the opened profile is a what-if (every closed gate at unit gain at once), not the
        # model at step 0: past the limit there it warns
        what_if = prof.source == OPENED
        yield rule.finding(
            f"{head}; layer {c.cross + 1} ('{where(node)}') is the nearest the output past the {c.limit:.0e} limit, "
            f"at {_ratio(at)} {rel} the last layers'; {prof.rate_text}"
            + ("; a warning, not an error: the gates open gradually in training, not all at once" if what_if else "")
            + f" [{GRADIENT_TERM}]",
            node=node,
            fix=c.fix,
            layer_index=c.cross + 1,
            severity="warning" if what_if else None,
            **data,
        )
    else:
        yield rule.finding(
            f"{head}; not past the {c.limit:.0e} limit, but already a {10 ** abs(decades):.3g}x difference that "
            f"one learning rate will not suit [{GRADIENT_TERM}]",
            node=layers[0],
            fix=c.fix,
            severity="warning",
            **data,
        )


def _decades(d: float) -> str:
    if math.isfinite(d):
        return f"{d:+.1f} decades"
    return "no gradient at all reaches the first layers" if d < 0 else "the last layers get no gradient at all"


def _ratio(r: float) -> str:
    return "exactly 0" if r == 0 else f"{r:.3g}"
