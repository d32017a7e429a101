"""Baselines: adopt gradaudit on models that already have findings.

``gradaudit check --update-baseline --baseline FILE`` records today's findings;
``gradaudit check --baseline FILE`` then fails only on findings that are not in it. A
finding is identified by its target, rule and module qualified name, never by its line,
so it survives code moving; findings are matched as :func:`gradaudit.compare.match`
does (exactly, then by rule for what is left, so a trend finding whose crossing layer
shifts stays the same finding). Findings found in the baseline are listed as suppressed
(``suppressed_by: "baseline"``; SARIF marks them as externally suppressed), so every
output format and the exit status see only the new ones; the verdict still counts them
(a known problem is no all-clear).

The file is JSON, sorted for readable diffs::

    {"format_version": 1,
     "targets": {"models/net.py": [{"rule": "GA101", "module": "encoder.0", "name": ...,
                                    "severity": "error", "message": ...}]}}

Target keys are paths relative to the baseline file's folder (``/`` separated), with the
``:attr`` of the target kept. Updating replaces the entries of the targets audited in that
run and keeps the others (a pre-commit run sees only the changed files).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Iterable

from gradaudit.compare import match, read_json
from gradaudit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

FORMAT_VERSION = 1
#: What a baseline keeps of a finding: its identity, and what a reader of the file needs.
FIELDS = ("rule", "name", "module", "node", "severity", "message")


def target_key(target: str, baseline_path: str) -> str:
    """``target`` as the baseline file names it: relative to the file's folder when it is
    a path (``/`` separated), unchanged for a ``package.module:attr`` target."""
    path, sep, attr = target.partition(".py:")
    path = path + ".py" if sep else target
    if not path.endswith((".py", ".onnx")):
        return target
    folder = os.path.dirname(os.path.abspath(baseline_path))
    rel = os.path.relpath(os.path.abspath(path), folder).replace(os.sep, "/")
    return f"{rel}:{attr}" if sep else rel


def load(path: str) -> dict[str, list[dict]]:
    """Target key -> recorded findings; :class:`ConfigError` for a missing or bad file."""
    data = read_json(path, "a gradaudit baseline", "no such baseline file (write it with --update-baseline)")
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"--baseline {path}: not a gradaudit baseline (format_version {FORMAT_VERSION})")
    targets = data.get("targets")
    if not isinstance(targets, dict) or not all(
        isinstance(v, list) and all(isinstance(f, dict) and isinstance(f.get("rule"), str) for f in v)
        for v in targets.values()
    ):
        raise ConfigError(f"--baseline {path}: 'targets' must map targets to lists of findings")
    return targets


def update(path: str, reports: Iterable[AuditReport]) -> dict[str, list[dict]]:
    """Record the findings of ``reports`` in ``path`` (other targets' entries are kept)."""
    targets = load(path) if os.path.isfile(path) else {}
    for report in reports:
        entries = [{k: f.to_json().get(k) for k in FIELDS} for f in report.findings]
        entries.sort(key=lambda e: (e["rule"], e["module"] or e["node"] or ""))
        targets[target_key(report.target, path)] = entries
    data = {"format_version": FORMAT_VERSION, "targets": dict(sorted(targets.items()))}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"--baseline {path}: the folder {folder} does not exist")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return targets


def apply(report: AuditReport, targets: dict[str, list[dict]], path: str) -> tuple[int, int]:
    """Move the findings of ``report`` that the baseline holds to ``report.suppressed``;
    ``(baselined, fixed)``: how many were moved, and how many recorded ones are gone."""
    recorded = targets.get(target_key(report.target, path), [])
    current = [f.to_json() for f in report.findings]
    kept, _, gone = match(recorded, current)
    known = {id(n) for _, n in kept}
    remaining = []
    for finding, as_json in zip(report.findings, current):
        if id(as_json) in known:
            report.suppressed.append({**as_json, "suppressed_by": "baseline", "suppression": f"in the baseline {path}"})
            report.baselined.append(finding)
        else:
            remaining.append(finding)
    report.findings = remaining
    return len(kept), len(gone)
