"""``[tool.gradaudit]`` in the nearest ``pyproject.toml``; command-line flags override it.

    [tool.gradaudit]
    select = ["GA1"]                      # rule codes or prefixes
    ignore = ["GA205"]
    fail-on = "warning"                   # error | warning | info
    deep = 12                             # depth from which structural rules apply
    crossing-decades = 3.0                # decades of gradient change that count
    per-module-ignores = { "encoder.*" = ["GA301"] }
    targets = [
        { path = "models/net.py:build", input-shape = [[2, 3, 32, 32]] },
        { path = "models/bert.py", input-shape = [[2, 128]], input-dtype = "int64", input-range = [0, 30522] },
    ]

    [tool.gradaudit.thresholds]           # named thresholds some rules read
    some-threshold = 0.5

The search walks up from the working directory and takes the first ``pyproject.toml``
that has a ``[tool.gradaudit]`` table. ``--config FILE`` names a file instead: a
``pyproject.toml`` (its ``[tool.gradaudit]`` table) or a standalone TOML file whose top
level holds the same keys. Target paths are relative to the file's folder.

Unknown keys and bad values raise :class:`~gradaudit.errors.ConfigError` naming the key
and the file. This module imports neither torch nor the rules, so the CLI starts fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from gradaudit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SEVERITIES = ("error", "warning", "info")
#: Top-level keys that become fields of :class:`gradaudit.api.Settings`.
SETTING_KEYS = {"deep": int, "crossing-decades": float}
KNOWN_KEYS = ("select", "ignore", "fail-on", "per-module-ignores", "targets", "thresholds", *SETTING_KEYS)
TARGET_KEYS = ("path", "input-shape", "input-dtype", "input-range")


@dataclass
class TargetConfig:
    """One ``targets`` entry: what to audit and with which inputs."""

    path: str
    input_shapes: list[tuple[int, ...]] | None = None
    input_dtype: str | None = None
    input_range: tuple[float, float] | None = None


@dataclass
class Config:
    """The validated ``[tool.gradaudit]`` table (empty when no file was found)."""

    path: str | None = None
    select: list[str] | None = None
    ignore: list[str] | None = None
    fail_on: str | None = None
    per_module_ignores: dict[str, list[str]] = field(default_factory=dict)
    targets: list[TargetConfig] = field(default_factory=list)
    #: ``Settings`` field name -> value (``deep``, ``crossing_decades``).
    settings: dict[str, Any] = field(default_factory=dict)
    #: free-form numeric thresholds for ``Settings.extra``.
    thresholds: dict[str, float] = field(default_factory=dict)

    def target_for(self, spec: str) -> TargetConfig | None:
        """The ``targets`` entry naming the same file (and attribute) as ``spec``."""
        want = _normalise_spec(spec)
        for t in self.targets:
            if _normalise_spec(t.path) == want:
                return t
        return None


def _normalise_spec(spec: str) -> str:
    path, sep, attr = spec.partition(".py:")
    if sep:
        return os.path.abspath(path + ".py") + ":" + attr
    return os.path.abspath(spec) if spec.endswith((".py", ".onnx")) else spec


def find_config(start: str | None = None) -> str | None:
    """The nearest ``pyproject.toml`` with a ``[tool.gradaudit]`` table, walking up."""
    folder = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(candidate):
            try:
                with open(candidate, "rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{_show(candidate)}: invalid TOML: {exc}") from exc
            if isinstance(data.get("tool"), dict) and "gradaudit" in data["tool"]:
                return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def load_config(path: str | None = None, *, start: str | None = None) -> Config:
    """Read and validate ``path`` (or the nearest config); an empty :class:`Config` if none."""
    explicit = path is not None
    if path is None:
        path = find_config(start)
        if path is None:
            return Config()
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{_show(path)}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{_show(path)}: cannot read: {exc}") from exc
    tool = data.get("tool")
    if isinstance(tool, dict) and "gradaudit" in tool:
        table = tool["gradaudit"]
    elif explicit and os.path.basename(path) != "pyproject.toml":
        table = data
    else:
        raise ConfigError(f"{_show(path)}: no [tool.gradaudit] table")
    return parse_table(table, path)


def parse_table(table: Any, path: str) -> Config:
    """Validate a ``[tool.gradaudit]`` table read from ``path``."""
    where = _show(path)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [tool.gradaudit] must be a table")
    for key in table:
        if key not in KNOWN_KEYS:
            hint = f" (did you mean '{key.replace('_', '-')}'?)" if key.replace("_", "-") in KNOWN_KEYS else ""
            raise ConfigError(
                f"{where}: unknown key '{key}' in [tool.gradaudit]{hint}; known keys: {', '.join(KNOWN_KEYS)}"
            )
    cfg = Config(path=os.path.abspath(path))
    cfg.select = _codes(table, "select", where)
    cfg.ignore = _codes(table, "ignore", where)
    if "fail-on" in table:
        value = table["fail-on"]
        if value not in SEVERITIES:
            raise ConfigError(f"{where}: fail-on must be one of {', '.join(SEVERITIES)} (got {value!r})")
        cfg.fail_on = value
    if "per-module-ignores" in table:
        pmi = table["per-module-ignores"]
        if not isinstance(pmi, dict):
            raise ConfigError(f"{where}: per-module-ignores must be a table of glob = [codes]")
        for glob, codes in pmi.items():
            cfg.per_module_ignores[glob] = _code_list(codes, f"per-module-ignores.\"{glob}\"", where)
    for key, kind in SETTING_KEYS.items():
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ConfigError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
            if value <= 0:
                raise ConfigError(f"{where}: {key} must be positive (got {value!r})")
            cfg.settings[key.replace("-", "_")] = kind(value)
    if "thresholds" in table:
        th = table["thresholds"]
        if not isinstance(th, dict):
            raise ConfigError(f"{where}: thresholds must be a table of name = number")
        for name, value in th.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: thresholds.{name} must be a number (got {value!r})")
            cfg.thresholds[name.replace("-", "_")] = float(value)
    if "targets" in table:
        cfg.targets = _targets(table["targets"], path, where)
    return cfg


def _codes(table: dict, key: str, where: str) -> list[str] | None:
    if key not in table:
        return None
    return _code_list(table[key], key, where)


def _code_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: {key} must be a list of rule codes like [\"GA101\"] (got {value!r})")
    return [v.strip().upper() for v in value]


def _targets(value: Any, path: str, where: str) -> list[TargetConfig]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: targets must be a list of tables like {{ path = \"models/net.py\" }}")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, entry in enumerate(value):
        key = f"targets[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {key} must be a table with a path (got {entry!r})")
        for k in entry:
            if k not in TARGET_KEYS:
                raise ConfigError(f"{where}: unknown key '{k}' in {key}; known keys: {', '.join(TARGET_KEYS)}")
        spec = entry.get("path")
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"{where}: {key}.path must be a non-empty string")
        target = TargetConfig(path=_relative_to(spec.strip(), base))
        if "input-shape" in entry:
            shapes = entry["input-shape"]
            if isinstance(shapes, list) and shapes and all(isinstance(d, int) for d in shapes):
                shapes = [shapes]
            if not (
                isinstance(shapes, list)
                and shapes
                and all(
                    isinstance(s, list) and s and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
                    for s in shapes
                )
            ):
                raise ConfigError(
                    f"{where}: {key}.input-shape must be a list of shapes like [[2, 3, 32, 32]] (got {shapes!r})"
                )
            target.input_shapes = [tuple(s) for s in shapes]
        if "input-dtype" in entry:
            dtype = entry["input-dtype"]
            from gradaudit.loading import _DTYPES

            if not isinstance(dtype, str) or dtype.lower().removeprefix("torch.") not in _DTYPES:
                raise ConfigError(f"{where}: {key}.input-dtype: unknown dtype {dtype!r}")
            target.input_dtype = dtype
        if "input-range" in entry:
            rng = entry["input-range"]
            if not (
                isinstance(rng, list)
                and len(rng) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
                and rng[1] > rng[0]
            ):
                raise ConfigError(f"{where}: {key}.input-range must be [low, high] with high > low (got {rng!r})")
            target.input_range = (float(rng[0]), float(rng[1]))
        if (target.input_dtype or target.input_range) and not target.input_shapes:
            raise ConfigError(f"{where}: {key}: input-dtype and input-range need input-shape")
        out.append(target)
    return out


def _relative_to(spec: str, base: str) -> str:
    """Make a file target relative to the config's folder (module targets stay as they are)."""
    path, sep, attr = spec.partition(".py:")
    if sep:
        full = path + ".py"
        return _show(os.path.join(base, full)) + ":" + attr
    if spec.endswith((".py", ".onnx")):
        return _show(os.path.join(base, spec))
    return spec


def known_thresholds() -> set[str]:
    """Names the rules and the probe read from ``Settings.extra``.

    Rules read them as ``settings.extra.get("name", default)``; the probe keeps its
    defaults in ``gradaudit.probe.thresholds.DEFAULTS``. Found by reading the rule sources,
    so a new rule's threshold is known without a list to keep in step.
    """
    import re

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules")
    names: set[str] = set()
    pattern = re.compile(r"extra\.get\(\s*[\"'](\w+)[\"']")
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".py"):
            with open(os.path.join(folder, entry), encoding="utf-8") as fh:
                names.update(pattern.findall(fh.read()))
    try:
        from gradaudit.probe.thresholds import DEFAULTS
    except ImportError:  # pragma: no cover - the probe ships with the package
        DEFAULTS = {}
    names.update(DEFAULTS)
    return names


def _show(path: str) -> str:
    """A path relative to the working directory when inside it."""
    apath = os.path.abspath(path)
    try:
        rel = os.path.relpath(apath)
    except ValueError:
        return apath
    return apath if rel.startswith("..") else rel
