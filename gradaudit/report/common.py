"""Small helpers the machine and HTML renderers share: paths, source lines, fingerprints.

Every renderer formats the same :class:`~gradaudit.report.model.AuditReport`; these
functions only turn its fields into the shapes each format wants.
"""

from __future__ import annotations

import hashlib
import linecache
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: Where the generated rule catalog lives, relative to the repository root.
CATALOG_DIR = "rules"
#: The repository's address; rule pages are ``{REPO_URL}/blob/main/rules/GA101.md``.
REPO_URL = "https://github.com/gradaudit/gradaudit"


def rule_page(code: str) -> str:
    """Repository-relative path of a rule's catalog page (``rules/GA101.md``)."""
    return f"{CATALOG_DIR}/{code}.md"


def rule_url(code: str) -> str:
    """Absolute address of a rule's catalog page on the repository site."""
    return f"{REPO_URL}/blob/main/{rule_page(code)}"


def target_path(target: str | None) -> str | None:
    """The file part of a target string (``model.py:attr`` -> ``model.py``), if it is a file."""
    if not target:
        return None
    candidates = [target]
    head, sep, _ = target.rpartition(":")
    if sep and head:
        candidates.insert(0, head)
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    return None


def relative_uri(path: str, base: str | None = None) -> tuple[str, bool]:
    """``(uri, relative)``: a forward-slash, percent-encoded path relative to ``base``
    (default: the working directory) when the file lies inside it, else a ``file://`` URI."""
    base = os.path.abspath(base or os.getcwd())
    apath = os.path.abspath(path)
    try:
        rel = os.path.relpath(apath, base)
    except ValueError:  # another drive on Windows
        rel = None
    if rel is not None and not rel.startswith(".."):
        return quote(rel.replace(os.sep, "/"), safe="/"), True
    return Path(apath).as_uri(), False


def source_line(location: dict | None) -> str | None:
    """The text of the user's source line a location points at (stripped), if readable."""
    if not location or not location.get("path") or not location.get("line"):
        return None
    text = linecache.getline(os.path.abspath(location["path"]), int(location["line"]))
    return text.strip() or None


def fingerprint(rule: str, module: str | None, path: str | None) -> str:
    """Stable hash of rule + module + file: the same problem keeps its identity when
    lines move or numbers change, so code-scanning alerts are not reopened."""
    key = "\x1f".join([rule, module or "", (path or "").replace(os.sep, "/")])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


#: One word per severity, as the JSON ``severity`` field spells it: (singular, plural).
SEVERITY_WORDS = {"error": ("error", "errors"), "warning": ("warning", "warnings"), "info": ("info", "info")}
#: Section titles of the findings, per severity.
SEVERITY_TITLES = {"error": "Errors", "warning": "Warnings", "info": "Info"}


def severity_words(counts: dict[str, int]) -> str:
    """``{"error": 1, "warning": 3, "info": 1}`` -> ``1 error, 3 warnings, 1 info``."""
    return ", ".join(f"{counts.get(s, 0)} {SEVERITY_WORDS[s][counts.get(s, 0) != 1]}" for s in SEVERITY_WORDS)


def fmt_num(x: Any) -> str:
    """A number as a reader wants it: 3 significant digits, scientific when tiny/huge."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x in (float("inf"), float("-inf")):
            return "inf" if x > 0 else "-inf"
        return f"{x:.3g}"
    return str(x)


def first_clause(message: str) -> str:
    """A finding message up to its first "; " (messages put their main figure first).
    Never split at a period: "Pascanu et al." and "1.5x" are not sentence ends."""
    return message.split("; ", 1)[0].rstrip(" ;")


@dataclass(frozen=True)
class Headline:
    """The one line every report starts with: ``label`` (``HEALTHY``, ``INCOMPLETE``, a
    verdict category in capitals for an error, ``WARNING`` for a risk) and ``sentence``."""

    label: str
    sentence: str
    severity: str | None  # of the finding it comes from; None for healthy / incomplete


def headline(report: Any) -> Headline:
    """The headline of ``report``, built from the same evidence as its verdict: the
    worst finding's first clause (its figure is the finding's), the coverage gap of an
    incomplete audit, or the depth summary of a healthy one. A warning reads as a risk,
    never as a verdict."""
    from gradaudit.rules.base import SEVERITY_ORDER

    verdict = report.verdict
    serious = sorted((f for f in report.findings + report.baselined if f.severity != "info"),
                     key=lambda f: (SEVERITY_ORDER[f.severity], f.rule))
    if verdict == "incomplete":
        return Headline("INCOMPLETE", report.coverage.sentence(), None)
    if serious:
        worst = next((f for f in serious if f.category == verdict), serious[0])
        if worst.severity == "error":
            return Headline(verdict.upper(), first_clause(worst.message), "error")
        return Headline("WARNING", f"{worst.category} risk: {first_clause(worst.message)}", worst.severity)
    frozen = report.frozen_layers
    if frozen and report.judged is None:
        total = report.depth.n_layers
        return Headline("HEALTHY", f"{frozen} of {total} weight layers are frozen (requires_grad=False) and "
                        f"{total - frozen} train{'s' if total - frozen == 1 else ''}: no depth to judge", None)
    source, d = report.judged if report.judged is not None else ("predicted", report.depth)
    if d.n_layers >= 2 and math.isfinite(d.spread_decades):
        normed = report.normalized_layers
        note = (f"; {normed} of them are followed by a normalization, which absorbs a large gradient"
                if normed else "")
        note += f"; {frozen} frozen layers are not judged" if frozen else ""
        return Headline(
            "HEALTHY",
            f"the {source} weight-gradient scale stays within {d.spread_decades:.2g} decades across {d.n_layers} "
            f"weight layers (first / last layer: {fmt_num(d.end_to_end_ratio)}{note})",
            None,
        )
    return Headline("HEALTHY", "no problem predicted", None)
