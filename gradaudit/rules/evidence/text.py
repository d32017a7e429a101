"""How findings write things: numbers, ratios, lists of names, and the Python expressions
that reach a module or a parameter in a fix line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node


def module_expr(qualname: str | None, root: str = "model") -> str:
    """Python expression reaching a submodule: ``layers.3.fc`` -> ``model.layers[3].fc``."""
    if not qualname:
        return root
    parts = qualname.split(".")
    if not all(p.isdigit() or p.isidentifier() for p in parts):
        return f"{root}.get_submodule({qualname!r})"
    return root + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


def where(node: Node) -> str:
    """The name a person knows a node by: its module's qualified name (``features.15``,
    as in the per-layer table), else the node's name. Fix lines use :func:`module_expr`."""
    return node.module if node.module else node.name


def weight_name(node: Node) -> str:
    """The qualified name of a layer's weight: ``<module>.weight``, or for a functional
    layer that reads a parameter not named ``weight`` (``x @ self.W``), the parameter's
    own name, which is then the layer's name
    (:func:`gradaudit.frontends.patterns.functional_layers`)."""
    from gradaudit.ir import PARAMETER_LAYER

    if node.module_type == PARAMETER_LAYER:
        return where(node)
    return f"{where(node)}.weight"


def listing(items: list[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: the items a finding lists, the first ``limit`` in full."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def name_list(names: list[str], limit: int = 6) -> str:
    """``'a', 'b', 'c' and 4 more``: quoted names, the first ``limit`` in full."""
    return listing([f"'{n}'" for n in names], limit)


def times(decades: float) -> str:
    """``10 ** decades`` formatted (an overflowing value reads as inf)."""
    return fmt(10.0 ** decades) if decades < 300 else "inf"


def fmt(x: float) -> str:
    """A number in 3 significant digits."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def parent(qualname: str | None) -> str | None:
    if not qualname or "." not in qualname:
        return None
    return qualname.rsplit(".", 1)[0]


def factor_text(ratio: float) -> str:
    """A ratio for a message: ``3.4e+05x``, ``0.5x``; never ``inf`` or ``1e+300``."""
    if ratio == 0:
        return "to exactly 0"
    if not math.isfinite(ratio):
        return "from exactly 0"
    return f"{ratio:.3g}x"


def param_expr(node: Node, param: str) -> str:
    """Python expression reaching a parameter of ``node``'s module (the bare name when the
    node has no module)."""
    return f"{module_expr(node.module)}.{param}" if node.module else param
