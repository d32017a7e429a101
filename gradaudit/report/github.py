"""GitHub Actions workflow commands (``--format github``): one annotation per finding.

    ::error file=model.py,line=12,title=GA101 vanishing-gradients::gradient falls ...

``error`` findings become ``::error``, ``warning`` ``::warning`` and ``info``
``::notice``. Values are escaped as the Actions runner expects (its ``escapeData`` /
``escapeProperty``): ``%`` -> ``%25``, CR -> ``%0D``, LF -> ``%0A`` everywhere, and in
properties also ``:`` -> ``%3A`` and ``,`` -> ``%2C``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from gradaudit.report.common import target_path

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.report.model import AuditReport

COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(finding: dict, target: str | None = None) -> str:
    """The workflow command line of one finding (a dict as in the JSON output)."""
    props = []
    loc = finding.get("location") or {}
    path = loc.get("path") or target_path(target)
    if path:
        props.append(f"file={escape_property(path.replace(chr(92), '/'))}")
        if loc.get("line"):
            props.append(f"line={int(loc['line'])}")
    props.append(f"title={escape_property(finding['rule'] + ' ' + finding.get('name', ''))}")
    text = finding.get("message") or ""
    if finding.get("fix"):
        text = f"{text}\nFix: {finding['fix']}"
    cmd = COMMANDS.get(finding.get("severity", "warning"), "warning")
    return f"::{cmd} {','.join(props)}::{escape_data(text)}"


def render(report: AuditReport, **opts) -> str:
    return render_many([report], **opts)


def render_many(reports: Iterable[AuditReport], **_: object) -> str:
    """Annotation lines for every finding of every report (suppressed ones are left out)."""
    lines = []
    for rep in reports:
        for f in rep.findings:
            lines.append(annotation(f.to_json(), rep.target))
    return "".join(line + "\n" for line in lines)
