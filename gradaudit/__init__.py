"""gradaudit: predict vanishing and exploding gradients before training.

    >>> import gradaudit
    >>> report = gradaudit.audit(model, (torch.randn(2, 3, 224, 224),))
    >>> report.verdict
    'healthy'
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["audit", "__version__"]


def __getattr__(name: str):
    # torch is heavy: import the API only when it is used, so `gradaudit --help` is instant
    if name == "audit":
        from gradaudit.api import audit

        return audit
    raise AttributeError(name)
