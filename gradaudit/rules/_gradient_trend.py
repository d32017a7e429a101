"""Shared check of GA101 vanishing-gradients and GA102 exploding-gradients (not a rule itself).

Both judge one profile (:func:`gradaudit.rules.helpers.gradient_profile`: measured when
the probe ran, else predicted, with closed gates opened) of one quantity, the layer
gradient G_l of :mod:`gradaudit.propagation.depth`, and quote the figure they decided on
in the message's first clause, which is also the report's headline.
"""

from __future__ import annotations

from typing import Iterator

from gradaudit.rules.helpers import GRADIENT_NAME, GRADIENT_TERM, factor_text, gradient_crossing, where

_WORDS = {-1: ("falls", "shrink", "of"), +1: ("grows", "grow", "times")}


def check(rule, analysis, direction: int) -> Iterator:
    c = gradient_crossing(analysis, direction)
    if c is None:
        return
    prof = c.profile
    layers, grads = prof.layers, prof.grads
    moves, verb, rel = _WORDS[direction]
    ratio = grads[0] / grads[-1]
    change = ratio if direction > 0 else (1 / ratio if ratio > 0 else 0.0)
    decades = prof.end_to_end_decades
    which = "weight layers whose output no normalization rescales" if direction > 0 else "weight layers"
    head = (
        f"{prof.source} {GRADIENT_NAME} {moves} {factor_text(change)} from the last weight layer "
        f"to the first ({_decades(decades)} over {len(layers)} {which})"
    )
    data = dict(ratio=ratio, decades=decades, decades_per_layer=prof.decades_per_layer, source=prof.source,
                layers=len(layers))
    if c.cross is not None:
        node = layers[c.cross]
        at = grads[c.cross] / grads[-1]
        past = f"layer {c.cross + 1} of {len(layers)} ('{where(node)}') gets {_ratio(at)} {rel} the last layer's"
        if direction * decades < 0:  # a layer in the middle crosses; end to end it went the other way
            head = f"{prof.source} {GRADIENT_NAME} at {past}, past the {c.limit:.0e} limit"
            tail = f"end to end it changes {_decades(decades)} over {len(layers)} layers"
        else:
            tail = f"{past}, past the {c.limit:.0e} limit"
        yield rule.finding(
            f"{head}; {tail}; {prof.rate_text} [{GRADIENT_TERM}]",
            node=node,
            fix=c.fix,
            layer_index=c.cross + 1,
            **data,
        )
    elif c.warn:
        yield rule.finding(
            f"{head}; not past the {c.limit:.0e} limit, but already a {10 ** abs(decades):.3g}x difference that "
            f"the learning rate of some layers will not suit [{GRADIENT_TERM}]",
            node=layers[0],
            fix=c.fix,
            severity="warning",
            **data,
        )


def _decades(d: float) -> str:
    return f"{d:+.1f} decades" if d == d and abs(d) != float("inf") else ("no gradient at all" if d < 0 else "-")


def _ratio(r: float) -> str:
    return "exactly 0" if r == 0 else f"{r:.3g}"
