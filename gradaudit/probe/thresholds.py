"""The probe's thresholds: defaults, overridable under ``[tool.gradaudit.thresholds]``
(read from ``Settings.extra``)."""

from __future__ import annotations

from typing import Any

from gradaudit.errors import ConfigError

#: Defaults of the thresholds read from ``Settings.extra``.
DEFAULTS = {
    "dead_fraction": 0.7,  # a unit is dead when zero for >= this fraction of the batch
    "dead_units_min": 0.5,  # report a layer when >= this fraction of its units is dead
    "saturation_abs": 5.0,  # |pre-activation| counted as saturated
    "saturation_fraction": 0.5,  # report when > this fraction of entries is saturated
    "disagree_factor": 2.0,  # predicted vs measured ratio reported as a disagreement
    "dead_min_samples": 32,  # observations per unit below which dead units are not judged
    "underflow_fraction": 0.01,  # gradient entries lost to underflow worth reporting
}


def threshold(settings: Any, key: str) -> float:
    """``settings.extra[key]`` as a number, else the default; :class:`ConfigError` when
    the configured value is not a number."""
    extra = getattr(settings, "extra", None) or {}
    value = extra.get(key, DEFAULTS[key])
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"threshold {key} must be a number (got {value!r})") from exc
