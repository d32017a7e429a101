"""Errors a user can act on. Each becomes one clear line and exit status 2."""

from __future__ import annotations

import importlib
from types import ModuleType


class GradauditError(Exception):
    """Base class: bad input, not a bug. ``location`` is the user's line, when known."""

    exit_code = 2

    def __init__(self, message: str, *, location=None) -> None:
        super().__init__(message)
        self.location = location


class LoadError(GradauditError):
    """The target could not be loaded (missing file, import error, no model found...)."""


class CaptureError(GradauditError):
    """The model could not be captured into the IR (untraceable code, bad input shape).

    ``inputs_suspect`` is true when the example inputs are the likely cause (they do not
    fit a layer, or the forward raised on them), so that a hint about inputs fits."""

    inputs_suspect = False


class ModelCallError(CaptureError):
    """The example call does not suit the model whichever capture runs: the inputs do not
    fit ``forward``'s signature."""


class ConfigError(GradauditError):
    """A configuration value or a command-line option is invalid."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, an optional dependency installed by the ``extra`` of gradaudit;
    when it is missing, a :class:`ConfigError` (one line, exit 2) saying what needs it and
    the command that installs it."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):  # missing inside it: a broken install
            raise ConfigError(f"{purpose} needs '{top}', which fails to import: {exc}") from exc
        raise ConfigError(
            f"{purpose} needs the '{top}' package, which is not installed: pip install 'gradaudit[{extra}]'"
        ) from exc
