"""SARIF 2.1.0 output (``--format sarif``) for code-scanning tools.

One run per log, with every registered rule as a ``reportingDescriptor`` (metadata
from the rule docstring: ``shortDescription`` = the summary sentence,
``fullDescription`` = "What it does", ``help.markdown`` = the whole page, ``helpUri`` =
the catalog page) and one ``result`` per finding, located at the user's source line
(``artifactLocation.uri`` relative to ``%SRCROOT%``, the working directory).
Suppressed findings are kept as results carrying an ``inSource`` / ``external``
suppression, as SARIF intends, so a scanner can show them as dismissed.

GitHub code scanning's upload limits are respected: at most 25,000 results and 25,000
rules per run, 1,000 locations per result, 20 tags per rule; messages are cut to
:data:`MAX_MESSAGE` characters. When results must be dropped, the most severe are kept
and the run says so in a tool notification and ``properties.truncated``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Iterable

from gradaudit import __version__
from gradaudit.report.common import REPO_URL, fingerprint, relative_uri, rule_url, target_path

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
MAX_RESULTS = 25_000
MAX_RULES = 25_000
MAX_TAGS = 20
MAX_MESSAGE = 8_000
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
FINGERPRINT_KEY = "gradaudit/v1"


def render(report: AuditReport, **opts) -> str:
    """The SARIF log of one report, as indented JSON text."""
    return render_many([report], **opts)


def render_many(reports: Iterable[AuditReport], **opts) -> str:
    """One SARIF log with one run holding the results of every report."""
    return json.dumps(to_sarif(list(reports), **opts), indent=2, ensure_ascii=False) + "\n"


def to_sarif(reports: list[AuditReport], *, base: str | None = None, srcroot: bool = True, **_: object) -> dict:
    """The SARIF log as a dict. ``base`` is the directory ``%SRCROOT%`` stands for
    (default: the working directory); ``srcroot=False`` leaves its absolute address out
    of the log (``originalUriBaseIds``), for logs published beside the sources."""
    from gradaudit.rules.base import SEVERITY_ORDER, all_rules

    base = os.path.abspath(base or os.getcwd())
    rules = list(all_rules().values())[:MAX_RULES]
    index = {cls.code: i for i, cls in enumerate(rules)}

    entries: list[tuple[int, dict, AuditReport, bool]] = []
    for rep in reports:
        for f in rep.findings:
            entries.append((SEVERITY_ORDER[f.severity], f.to_json(), rep, False))
        for s in rep.suppressed:
            entries.append((SEVERITY_ORDER.get(s.get("severity", "info"), 2), s, rep, True))
    truncated = len(entries) > MAX_RESULTS
    if truncated:
        # keep the most severe, unsuppressed first; stable otherwise
        order = sorted(range(len(entries)), key=lambda i: (entries[i][3], entries[i][0], i))
        keep = set(order[:MAX_RESULTS])
        dropped = len(entries) - MAX_RESULTS
        entries = [e for i, e in enumerate(entries) if i in keep]
    results = [_result(f, rep, index, base, suppressed) for _, f, rep, suppressed in entries]

    run: dict = {
        "tool": {
            "driver": {
                "name": "gradaudit",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": REPO_URL,
                "rules": [_descriptor(cls) for cls in rules],
            }
        },
        "artifacts": _artifacts(results),
        "results": results,
        "columnKind": "unicodeCodePoints",
        "invocations": [_invocation(reports, truncated, dropped if truncated else 0)],
        "properties": {
            "targets": [rep.target for rep in reports],
            "verdicts": {rep.target: rep.verdict for rep in reports},
            "truncated": truncated,
        },
    }
    if srcroot:
        run["originalUriBaseIds"] = {"%SRCROOT%": {"uri": _dir_uri(base)}}
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def _descriptor(cls) -> dict:
    sections = cls.doc_sections()
    what = " ".join(sections.get("What it does", sections["summary"]).split())
    tags = [cls.category, "gradients"][:MAX_TAGS]
    return {
        "id": cls.code,
        "name": _pascal(cls.name),
        "shortDescription": {"text": cls.summary()},
        "fullDescription": {"text": _cut(what)},
        "help": {"text": cls.doc(), "markdown": f"# {cls.code} {cls.name}\n\n{cls.doc()}"},
        "helpUri": rule_url(cls.code),
        "defaultConfiguration": {"level": LEVELS[cls.default_severity]},
        "properties": {
            "tags": tags,
            "category": cls.category,
            "stage": cls.stage,
            "problem.severity": {"error": "error", "warning": "warning", "info": "recommendation"}[cls.default_severity],
        },
    }


def _result(f: dict, rep: AuditReport, index: dict[str, int], base: str, suppressed: bool) -> dict:
    loc = f.get("location")
    path = loc.get("path") if loc else None
    line = int(loc.get("line") or 1) if loc else 1
    if not path:  # code scanning needs a location: fall back to the audited file
        path = target_path(rep.target)
        line = 1
    text = f.get("message") or f.get("rule", "")
    if f.get("fix"):
        text = f"{text}\nFix: {f['fix']}"
    if f.get("module"):
        text = f"{text}\nModule: {f['module']}"
    res: dict = {
        "ruleId": f["rule"],
        "level": LEVELS.get(f.get("severity", "warning"), "warning"),
        "message": {"text": _cut(text)},
    }
    if f["rule"] in index:
        res["ruleIndex"] = index[f["rule"]]
    if path:
        uri, rel = relative_uri(path, base)
        art: dict = {"uri": uri}
        if rel:
            art["uriBaseId"] = "%SRCROOT%"
        res["locations"] = [{"physicalLocation": {"artifactLocation": art, "region": {"startLine": max(line, 1)}}}]
        if f.get("module"):
            res["locations"][0]["logicalLocations"] = [
                {"fullyQualifiedName": f["module"], "kind": "member"}
            ]
        fp_path = uri
    else:
        fp_path = rep.target
    res["partialFingerprints"] = {FINGERPRINT_KEY: fingerprint(f["rule"], f.get("module") or f.get("node"), fp_path)}
    props = {"category": f.get("category"), "node": f.get("node"), "module": f.get("module"), "target": rep.target}
    if f.get("fix"):
        props["fix"] = f["fix"]
    data = {k: v for k, v in (f.get("data") or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}
    props.update({"data": _finite(data)} if data else {})
    res["properties"] = props
    if suppressed:
        how = f.get("suppressed_by") or "noqa"
        res["suppressions"] = [
            {
                "kind": "inSource" if how == "noqa" else "external",
                "justification": f.get("suppression") or how,
            }
        ]
    return res


def _artifacts(results: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for res in results:
        for loc in res.get("locations", []):
            art = loc["physicalLocation"]["artifactLocation"]
            if art["uri"] not in seen:
                seen[art["uri"]] = {"location": dict(art), "sourceLanguage": "python"}
    arts = list(seen.values())
    pos = {a["location"]["uri"]: i for i, a in enumerate(arts)}
    for res in results:
        for loc in res.get("locations", []):
            loc["physicalLocation"]["artifactLocation"]["index"] = pos[loc["physicalLocation"]["artifactLocation"]["uri"]]
    return arts


def _invocation(reports: list, truncated: bool, dropped: int) -> dict:
    inv: dict = {"executionSuccessful": True}
    notes = []
    if truncated:
        notes.append(
            {
                "level": "warning",
                "message": {"text": f"{dropped} results were left out to stay within {MAX_RESULTS} results per run"},
            }
        )
    for rep in reports:
        for est in rep.estimated_ops:
            notes.append(
                {
                    "level": "note",
                    "message": {"text": _cut(f"statistics of {est.get('op')} at '{est.get('module') or est.get('node')}' were estimated: {est.get('reason')}")},
                }
            )
    if notes:
        inv["toolExecutionNotifications"] = notes[:1000]
    return inv


def _dir_uri(path: str) -> str:
    from pathlib import Path

    uri = Path(path).as_uri()
    return uri if uri.endswith("/") else uri + "/"


def _pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "\u2026"


def _finite(data: dict) -> dict:
    """JSON-safe numbers as in the JSON report: inf/nan as strings, 6 significant digits."""
    out = {}
    for k, v in data.items():
        if isinstance(v, float):
            v = str(v) if (v != v or v in (float("inf"), float("-inf"))) else float(f"{v:.6g}")
        out[k] = v
    return out
