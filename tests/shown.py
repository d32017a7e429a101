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
