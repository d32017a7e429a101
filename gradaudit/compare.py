"""What changed between two audits of the same architecture: findings added and gone,
the predicted gradient per layer, the verdict.

Both sides are reports in the JSON contract (``--format json`` files, or a target
audited on the spot). Findings are matched by rule and module qualified name (never by
line, so they survive code moving), first exactly and then, for what is left, by rule
alone in report order: a rule that reports a layer where a trend crosses a threshold
(GA101 names the layer where the gradient falls below 1e-3) keeps its identity when that
layer shifts. Layers are matched by module qualified name (node name for functional
ops). The same matching decides which findings a baseline already holds
(:mod:`gradaudit.baseline`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import ConfigError

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def finding_key(finding: dict) -> tuple[str, str | None]:
    """``(rule, module qualified name)`` (the node name for findings without a module)."""
    return finding["rule"], finding.get("module") or finding.get("node")


def match(base: list[dict], new: list[dict]) -> tuple[list[tuple[dict, dict]], list[dict], list[dict]]:
    """``(kept pairs (base, new), added, gone)``: exact keys first, then the same rule."""
    pending = list(base)
    kept: list[tuple[dict, dict]] = []
    unmatched: list[dict] = []
    for f in new:
        hit = next((b for b in pending if finding_key(b) == finding_key(f)), None)
        if hit is None:
            unmatched.append(f)
        else:
            pending.remove(hit)
            kept.append((hit, f))
    added = []
    for f in unmatched:
        hit = next((b for b in pending if b["rule"] == f["rule"]), None)
        if hit is None:
            added.append(f)
        else:
            pending.remove(hit)
            kept.append((hit, f))
    return kept, added, pending


def read_json(path: str, what: str, missing: str = "no such file") -> Any:
    """The JSON document in ``path``; :class:`ConfigError` naming ``what`` it should be."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {missing}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not {what}: {exc}") from exc


def load_report(path: str) -> dict:
    """A ``--format json`` report file (one target); :class:`ConfigError` otherwise."""
    data = read_json(path, "a gradaudit JSON report")
    if isinstance(data, dict) and isinstance(data.get("reports"), list):
        if len(data["reports"]) != 1:
            raise ConfigError(f"{path}: holds {len(data['reports'])} reports; compare takes one per side")
        data = data["reports"][0]
    if not isinstance(data, dict) or data.get("format_version") != 1 or "findings" not in data:
        raise ConfigError(f"{path}: not a gradaudit JSON report (format_version 1)")
    return data


@dataclass
class Comparison:
    """The difference between the ``base`` and ``new`` reports (JSON contract dicts)."""

    base_label: str
    new_label: str
    base: dict
    new: dict
    kept: list[tuple[dict, dict]] = field(default_factory=list)
    added: list[dict] = field(default_factory=list)
    gone: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)

    @property
    def base_verdict(self) -> str:
        return self.base["summary"]["verdict"]

    @property
    def new_verdict(self) -> str:
        return self.new["summary"]["verdict"]

    def worse(self, fail_on: str = "error") -> bool:
        """Whether the new audit is worse at ``fail_on``: a finding at or above it that is
        new or got more severe, or an audit that no longer covers every layer."""
        limit = SEVERITY_ORDER[fail_on]
        if any(SEVERITY_ORDER[f["severity"]] <= limit for f in self.added):
            return True
        for b, n in self.kept:
            if SEVERITY_ORDER[n["severity"]] <= limit < SEVERITY_ORDER[b["severity"]]:
                return True
        return _complete(self.base) and not _complete(self.new)

    def to_json(self) -> dict:
        return {
            "format_version": 1,
            "base": self.base_label,
            "new": self.new_label,
            "verdict": {"base": self.base_verdict, "new": self.new_verdict},
            "gradient_spread_decades": {
                "base": self.base["summary"].get("gradient_spread_decades"),
                "new": self.new["summary"].get("gradient_spread_decades"),
            },
            "findings": {
                "added": self.added,
                "gone": self.gone,
                "kept": [{"base": b, "new": n} for b, n in self.kept],
            },
            "layers": self.layers,
            "layers_only_in_base": self.only_base,
            "layers_only_in_new": self.only_new,
        }


def _complete(report: dict) -> bool:
    coverage = report["summary"].get("coverage")
    return not isinstance(coverage, dict) or bool(coverage.get("complete", True))


def compare(base: dict, new: dict, base_label: str, new_label: str) -> Comparison:
    """Match findings and layers of two reports."""
    kept, added, gone = match(base.get("findings") or [], new.get("findings") or [])
    result = Comparison(base_label, new_label, base, new, kept, added, gone)
    base_layers = {_layer_name(layer): layer for layer in base.get("layers") or []}
    new_names = []
    for layer in new.get("layers") or []:
        name = _layer_name(layer)
        new_names.append(name)
        old = base_layers.get(name)
        if old is None:
            result.only_new.append(name)
            continue
        b, n = old["predicted"], layer["predicted"]
        result.layers.append({
            "layer": name,
            "depth": layer.get("depth"),
            "op": layer.get("op"),
            "base_grad_rms": b.get("grad_rms"),
            "new_grad_rms": n.get("grad_rms"),
            "grad_ratio": _ratio(n.get("grad_rms"), b.get("grad_rms")),
            "base_act_rms": b.get("act_rms"),
            "new_act_rms": n.get("act_rms"),
            "act_ratio": _ratio(n.get("act_rms"), b.get("act_rms")),
        })
    result.only_base = [name for name in base_layers if name not in set(new_names)]
    return result


def _layer_name(layer: dict) -> str:
    return layer.get("module") or layer["node"]


def _ratio(new: Any, base: Any) -> float | None:
    if not isinstance(new, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return None
    value = float(new) / float(base)
    return value if math.isfinite(value) else None
