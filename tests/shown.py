"""Numbers in messages compared as numbers, never as rounded strings.

``f"{x:.3g}" in message`` fails on a machine where ``x`` sits on the other side of a
rounding boundary. :func:`shows` finds the number where a template puts it and accepts
it when the value, rounded the way the number is shown, can give it
(:func:`gradaudit.catalog.shows`).
"""

from __future__ import annotations

import re

from gradaudit.catalog import REL, shows as _shows

_NUMBER = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def shows(text: str, template: str, *values: float, rel: float = REL) -> bool:
    """Whether ``text`` contains ``template`` with each ``{}`` a number showing the
    corresponding value: ``shows(f.message, "grows {}x", ratio)``."""
    parts = template.split("{}")
    assert len(parts) == len(values) + 1, "one value per {}"
    pattern = _NUMBER.join(re.escape(p) for p in parts)
    return any(all(_shows(tok, v, rel) for tok, v in zip(m.groups(), values)) for m in re.finditer(pattern, text))


def depth_change(grads: list[float]) -> float:
    """GA101/GA102's figure recomputed from a report's ``layer_grad`` column, as their
    documentation defines it: log10 of the median of the first quarter of the weight
    layers over the median of the last quarter, scaled from the quarters' centres to the
    model's depth (the first and the last layer themselves below 8 layers)."""
    import math
    import statistics

    n, q = len(grads), max(1, len(grads) // 4)
    span = (n - 1) / (n - q) if n > q else 1.0
    return math.log10(statistics.median(grads[:q]) / statistics.median(grads[-q:])) * span
