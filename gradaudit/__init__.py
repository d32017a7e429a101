"""gradaudit: predict vanishing and exploding gradients before training.

    >>> import gradaudit
    >>> report = gradaudit.audit(model, (torch.randn(2, 3, 224, 224),))
    >>> report.verdict
    'healthy'
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["audit", "AuditOptions", "AuditReport", "FindingsError", "Settings", "__version__"]

#: Public names and the modules that define them, imported on first use: torch is heavy,
#: and `gradaudit --help` must stay instant.
_LAZY = {
    "audit": "gradaudit.api",
    "Settings": "gradaudit.api",
    "AuditOptions": "gradaudit.options",
    "AuditReport": "gradaudit.report.model",
    "FindingsError": "gradaudit.report.model",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
