"""``--format json``: the report's JSON contract (``format_version`` 1, see DESIGN.md).

One target gives the plain report object; several give
``{"format_version": 1, "reports": [...]}``.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable

from gradaudit.report.model import FORMAT_VERSION

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport


def render(report: AuditReport, **_: object) -> str:
    return json.dumps(finite(report.to_json()), indent=2, allow_nan=False) + "\n"


def render_many(reports: Iterable[AuditReport], **_: object) -> str:
    reports = list(reports)
    if len(reports) == 1:
        return render(reports[0])
    doc = {"format_version": FORMAT_VERSION, "reports": [finite(r.to_json()) for r in reports]}
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def finite(value: Any) -> Any:
    """JSON has no inf / nan: write them as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
