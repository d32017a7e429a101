"""Renderers of an :class:`~gradaudit.report.model.AuditReport`.

Each format is a module ``gradaudit.report.<format>`` with ``render(report) -> str``
(and, where one document can hold several targets, ``render_many(reports) -> str``).
They are imported only when used, so the command line starts without torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gradaudit.errors import ConfigError

#: Output formats of ``gradaudit check --format``.
FORMATS = ("text", "json", "sarif", "github", "html", "markdown")
#: Formats meant for programs; the human summary then goes to stderr.
MACHINE_FORMATS = frozenset({"json", "sarif", "github", "html", "markdown"})


def get_renderer(fmt: str) -> ModuleType:
    """The module rendering ``fmt``; :class:`ConfigError` for an unknown or missing one."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    try:
        return importlib.import_module(f"gradaudit.report.{fmt}")
    except ModuleNotFoundError as exc:
        if exc.name == f"gradaudit.report.{fmt}":
            raise ConfigError(f"the {fmt} format is not available in this installation of gradaudit") from None
        raise ConfigError(f"the {fmt} format needs the package {exc.name!r}: pip install {exc.name}") from None
