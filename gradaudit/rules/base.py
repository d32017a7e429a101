"""Rules, findings and the registry.

A rule is a class in its own module under ``gradaudit/rules/``, registered with
:func:`register`. Its docstring, in the ruff style (``## What it does``,
``## Why is this bad?``, ``## Example``, ``## Use instead``, ``## References``), is the
rule's documentation: it feeds ``gradaudit explain``, the generated catalog in the
top-level ``rules/`` folder and SARIF rule metadata. Codes never change once published.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from gradaudit.ir import Node
    from gradaudit.propagation.engine import Analysis

SEVERITIES = ("error", "warning", "info")
SEVERITY_ORDER = {s: i for i, s in enumerate(SEVERITIES)}
CATEGORIES = (
    "vanishing",
    "exploding",
    "saturation",
    "dead-units",
    "init",
    "normalization",
    "residual",
    "nan",
    "gradcheck",
    "precision",
    "other",
)


@dataclass
class Finding:
    """One problem found in one place. ``fix`` is a concrete line of code."""

    rule: str
    name: str
    category: str
    severity: str
    message: str
    fix: str | None = None
    node: str | None = None
    module: str | None = None
    location: dict | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "name": self.name,
            "category": self.category,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "node": self.node,
            "module": self.module,
            "location": self.location,
            "data": self.data,
        }


class Rule:
    """Base class of every rule. Subclasses set the class attributes and ``check``."""

    code: ClassVar[str]
    name: ClassVar[str]
    category: ClassVar[str]
    default_severity: ClassVar[str] = "warning"
    #: ``static`` rules look at graph and predicted statistics; ``probe`` rules need the
    #: real measurement and only run with ``--probe``.
    stage: ClassVar[str] = "static"

    def check(self, analysis: Analysis) -> Iterator[Finding]:  # pragma: no cover
        raise NotImplementedError

    def finding(
        self,
        message: str,
        *,
        node: Node | None = None,
        fix: str | None = None,
        severity: str | None = None,
        **data: Any,
    ) -> Finding:
        """A finding of this rule, located at ``node`` (its module and source line)."""
        return Finding(
            rule=self.code,
            name=self.name,
            category=self.category,
            severity=severity or self.default_severity,
            message=message,
            fix=fix,
            node=node.name if node is not None else None,
            module=node.module if node is not None else None,
            location=node.location.to_json() if node is not None and node.location else None,
            data=data,
        )

    # -- documentation ---------------------------------------------------------------
    @classmethod
    def doc(cls) -> str:
        # cleandoc, not dedent: the first docstring line carries no indentation
        return inspect.cleandoc(cls.__doc__ or "")

    @classmethod
    def doc_sections(cls) -> dict[str, str]:
        """The docstring split into its ``## Heading`` sections (plus ``summary``)."""
        text = cls.doc()
        parts = re.split(r"^## +(.+)$", text, flags=re.M)
        sections = {"summary": parts[0].strip()}
        for heading, body in zip(parts[1::2], parts[2::2]):
            sections[heading.strip()] = body.strip()
        return sections

    @classmethod
    def summary(cls) -> str:
        """The docstring's summary line (ruff's convention): the one-line description.
        Never cut at a period inside it ("Pascanu et al.", "1.5x")."""
        return " ".join(cls.doc_sections()["summary"].split())


REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator adding a rule to the registry; codes and names must be unique."""
    if not re.fullmatch(r"GA\d{3}", cls.code):
        raise ValueError(f"bad rule code {cls.code!r}")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"rule name {cls.name!r} must be kebab-case")
    if cls.category not in CATEGORIES:
        raise ValueError(f"rule {cls.code}: unknown category {cls.category!r}")
    if cls.default_severity not in SEVERITIES:
        raise ValueError(f"rule {cls.code}: unknown severity {cls.default_severity!r}")
    other = REGISTRY.get(cls.code)
    if other is not None and other is not cls:
        raise ValueError(f"rule code {cls.code} used twice ({other.__name__}, {cls.__name__})")
    REGISTRY[cls.code] = cls
    return cls


_LOADED = False


def all_rules() -> dict[str, type[Rule]]:
    """Import every rule module once and return the registry sorted by code (subpackages
    such as :mod:`gradaudit.rules.evidence` hold no rules and are skipped)."""
    global _LOADED
    if not _LOADED:
        import gradaudit.rules as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.ispkg and info.name != "base" and not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
        _LOADED = True
    return dict(sorted(REGISTRY.items()))


def resolve_codes(codes: list[str] | tuple[str, ...]) -> set[str]:
    """Expand rule codes and prefixes (``GA1`` = every GA1xx) and reject unknown ones.

    Raises ``ValueError`` naming the unknown code.
    """
    rules = all_rules()
    out: set[str] = set()
    for raw in codes:
        code = raw.strip().upper()
        if not code:
            continue
        if code == "ALL":
            out.update(rules)
            continue
        matched = {c for c in rules if c.startswith(code)}
        if not matched:
            raise ValueError(f"unknown rule code {raw!r} (see 'gradaudit rules')")
        out.update(matched)
    return out
