"""Suppressions: ``# gradaudit: noqa`` comments and per-module ignores.

A finding is suppressed when

- the user's source line of the layer's *call* (the finding's ``location``) or of the
  layer's *definition* carries ``# gradaudit: noqa[GA101]`` (several codes separated by
  commas; code prefixes like ``GA1`` count) or a bare ``# gradaudit: noqa``; or
- its module's qualified name matches a glob of ``per-module-ignores``
  (``{"encoder.*" = ["GA301"]}``) naming its code.

The definition line of a layer is found from the model itself: the nearest ancestor
whose class is user code holds the ``self.<attr> = ...`` line that created the layer
(or the container holding it); for a model built from plain containers in a script
(``nn.Sequential(*layers)``), the call constructing the layer's class in the target file
(calls inside a loop stand for every instance the loop builds). A finding without a call
location is given its definition location, so reports can point at the user's code.

Suppressions that matched nothing are reported, like ruff's RUF100, as rule GA901
``unused-noqa`` (one finding per comment, naming the codes that matched nothing).
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import linecache
import os
import re
from dataclasses import dataclass, field
from typing import Any

NOQA = re.compile(r"#\s*gradaudit\s*:\s*noqa(?:\s*\[(?P<codes>[^\]]*)\])?", re.IGNORECASE)
UNUSED_CODE = "GA901"


@dataclass
class Noqa:
    """One ``# gradaudit: noqa`` comment; ``codes`` is ``None`` for a bare one."""

    path: str
    line: int
    text: str
    codes: tuple[str, ...] | None
    used: set[str] = field(default_factory=set)

    def matches(self, rule: str) -> str | None:
        """The code (or prefix, or ``"*"``) of this comment that covers ``rule``."""
        if self.codes is None:
            return "*"
        for code in self.codes:
            if rule.upper().startswith(code):
                return code
        return None


def parse_noqa(text: str) -> tuple[str, tuple[str, ...] | None] | None:
    """``(comment, codes)`` of the noqa comment in a source line, or ``None``."""
    m = NOQA.search(text)
    if not m:
        return None
    raw = m.group("codes")
    if raw is None:
        return m.group(0), None
    codes = tuple(c.strip().upper() for c in raw.split(",") if c.strip())
    return m.group(0), codes


def _key(path: str) -> str:
    return os.path.abspath(path)


class NoqaIndex:
    """The noqa comments of a set of files, read once and looked up by (file, line)."""

    def __init__(self) -> None:
        self.by_line: dict[tuple[str, int], Noqa] = {}
        self.files: dict[str, str] = {}

    def add_file(self, path: str) -> None:
        key = _key(path)
        if key in self.files or not os.path.isfile(key):
            return
        self.files[key] = path
        for lineno, text in enumerate(linecache.getlines(key), start=1):
            if "noqa" not in text.lower():
                continue
            parsed = _comment_noqa(text)
            if parsed is not None:
                comment, codes = parsed
                self.by_line[(key, lineno)] = Noqa(path, lineno, comment, codes)

    def at(self, location: dict | None) -> Noqa | None:
        if not location or not location.get("path") or not location.get("line"):
            return None
        self.add_file(location["path"])
        return self.by_line.get((_key(location["path"]), int(location["line"])))


def _comment_noqa(line: str) -> tuple[str, tuple[str, ...] | None] | None:
    """The noqa of a line's comment (not of a string literal that merely contains one)."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        tokens = []
        hash_at = line.find("#")
        return parse_noqa(line[hash_at:]) if hash_at >= 0 else None
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            return parse_noqa(tok.string)
    return None


def apply(
    findings: list,
    graph: Any,
    model: Any,
    per_module_ignores: dict[str, list[str]] | None = None,
    *,
    target: str | None = None,
    report_unused: bool = True,
) -> tuple[list, list[dict], list]:
    """Split findings into ``(kept, suppressed, unused)``.

    ``suppressed`` are JSON dicts of the suppressed findings with ``suppressed_by``
    (``"noqa"`` or ``"per-module-ignores"``) and ``suppression`` (the comment and its
    place, or the glob). ``unused`` are GA901 findings for noqa comments, in the files
    the model's code lives in, that suppressed nothing (empty when ``report_unused`` is
    false).
    """
    from gradaudit.report.common import target_path

    index = NoqaIndex()
    path = target_path(target)
    if path:
        index.add_file(path)
    for node in getattr(graph, "nodes", []) or []:
        loc = getattr(node, "location", None)
        if loc is not None and getattr(loc, "path", None):
            index.add_file(loc.path)

    defs = DefinitionFinder(model, path)
    ignores = {glob: tuple(c.upper() for c in codes) for glob, codes in (per_module_ignores or {}).items()}

    kept, suppressed = [], []
    for f in findings:
        definition = defs.location(f.module) if f.module is not None else None
        if definition is not None:
            index.add_file(definition["path"])
        if f.location is None and definition is not None:
            f.location = dict(definition)
        how = None
        for loc in (f.location, definition):
            nq = index.at(loc)
            code = nq.matches(f.rule) if nq is not None else None
            if code is not None:
                nq.used.add(code)
                how = ("noqa", f"{nq.text} at {nq.path}:{nq.line}")
                break
        if how is None and f.module is not None:
            for glob, codes in ignores.items():
                if fnmatch.fnmatchcase(f.module, glob) and any(f.rule.startswith(c) for c in codes):
                    how = ("per-module-ignores", f'per-module-ignores "{glob}" = {list(codes)}')
                    break
        if how is None:
            kept.append(f)
        else:
            item = f.to_json()
            item["suppressed_by"], item["suppression"] = how
            suppressed.append(item)

    unused = _unused(index) if report_unused else []
    return kept, suppressed, unused


def _unused(index: NoqaIndex) -> list:
    from gradaudit.rules.base import all_rules

    rules = all_rules()
    cls = rules[UNUSED_CODE]
    out = []
    for (_, _), nq in sorted(index.by_line.items(), key=lambda kv: (kv[1].path, kv[1].line)):
        if nq.codes is None:
            if nq.used:
                continue
            msg = f"unused suppression '{nq.text}': no finding on this line"
            fix = "remove the comment"
            codes: list[str] = []
        else:
            idle = [c for c in nq.codes if c not in nq.used]
            if not idle:
                continue
            unknown = [c for c in idle if not any(code.startswith(c) for code in rules)]
            parts = []
            if len(idle) > len(unknown):
                parts.append(f"no {', '.join(c for c in idle if c not in unknown)} finding on this line")
            if unknown:
                parts.append(f"unknown rule code{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
            msg = f"unused suppression '{nq.text}': {'; '.join(parts)}"
            left = [c for c in nq.codes if c in nq.used]
            fix = f"# gradaudit: noqa[{', '.join(left)}]" if left else "remove the comment"
            codes = idle
        finding = cls().finding(msg, fix=fix, codes=codes)
        finding.location = {"path": nq.path, "line": nq.line}
        out.append(finding)
    return out


# -- where a layer was defined ---------------------------------------------------------

_TORCH_DIR = None


def _is_user_class(cls: type) -> bool:
    global _TORCH_DIR
    if _TORCH_DIR is None:
        import torch

        _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return False
    if not path:
        return False
    apath = os.path.abspath(path)
    pkg = os.path.dirname(os.path.abspath(__file__))
    return not (apath.startswith(_TORCH_DIR + os.sep) or apath.startswith(pkg + os.sep) or "site-packages" in apath)


class DefinitionFinder:
    """Source locations of the lines that created a model's submodules."""

    def __init__(self, model: Any, target_path: str | None = None) -> None:
        self.model = model
        self.target_path = target_path
        self._cache: dict[str, dict | None] = {}
        self._calls: dict[str, list[tuple[int, bool]]] | None = None

    def location(self, qualname: str | None) -> dict | None:
        if qualname is None or self.model is None:
            return None
        if qualname not in self._cache:
            try:
                self._cache[qualname] = self._find(qualname)
            except Exception:  # a model we cannot inspect only loses the definition line
                self._cache[qualname] = None
        return self._cache[qualname]

    def _find(self, qualname: str) -> dict | None:
        parts = qualname.split(".") if qualname else []
        for i in range(len(parts), 0, -1):
            parent = self.model.get_submodule(".".join(parts[: i - 1]))
            attr = parts[i - 1]
            for klass in type(parent).__mro__:
                if klass.__module__.startswith("torch.") or not _is_user_class(klass):
                    continue
                loc = _attr_assignment(klass, attr)
                if loc is not None:
                    return loc
        return self._from_script(qualname)

    def _from_script(self, qualname: str) -> dict | None:
        """For containers built in a script: the call constructing the layer's class."""
        if not self.target_path or not qualname:
            return None
        sub = self.model.get_submodule(qualname)
        kind = type(sub).__name__
        calls = self._script_calls().get(kind)
        if not calls:
            return None
        same = [name for name, m in self.model.named_modules() if type(m) is type(sub)]
        j, k = same.index(qualname), len(same)
        loops = [c for c in calls if c[1]]
        if not loops:
            if len(calls) == k:
                return {"path": self.target_path, "line": calls[j][0]}
            return {"path": self.target_path, "line": calls[0][0]} if len(calls) == 1 else None
        if len(loops) > 1:
            return None
        loop_line = loops[0][0]
        before = [c for c in calls if not c[1] and c[0] < loop_line]
        after = [c for c in calls if not c[1] and c[0] > loop_line]
        if j < len(before):
            return {"path": self.target_path, "line": before[j][0]}
        if j >= k - len(after):
            return {"path": self.target_path, "line": after[j - (k - len(after))][0]}
        return {"path": self.target_path, "line": loop_line}

    def _script_calls(self) -> dict[str, list[tuple[int, bool]]]:
        if self._calls is None:
            self._calls = {}
            try:
                tree = ast.parse("".join(linecache.getlines(os.path.abspath(self.target_path))))
            except SyntaxError:
                return self._calls
            _collect_calls(tree, False, self._calls)
            for v in self._calls.values():
                v.sort()
        return self._calls


def _collect_calls(node: ast.AST, in_loop: bool, out: dict) -> None:
    for child in ast.iter_child_nodes(node):
        loop = in_loop or isinstance(child, (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp))
        if isinstance(child, ast.Call):
            func = child.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name:
                out.setdefault(name, []).append((child.lineno, loop))
        _collect_calls(child, loop, out)


def _attr_assignment(klass: type, attr: str) -> dict | None:
    """The line of ``self.<attr> = ...`` (or ``self.add_module("<attr>", ...)``) in a class."""
    try:
        lines, start = inspect.getsourcelines(klass)
        path = inspect.getsourcefile(klass)
    except (OSError, TypeError):
        return None
    if not path:
        return None
    pattern = re.compile(
        rf"\bself\.{re.escape(attr)}\s*(?::[^=]*)?=(?!=)|\badd_module\(\s*['\"]{re.escape(attr)}['\"]|\bregister_module\(\s*['\"]{re.escape(attr)}['\"]"
    )
    for offset, text in enumerate(lines):
        if pattern.search(text):
            from gradaudit.frontends.fx import display_path

            return {"path": display_path(os.path.abspath(path)), "line": start + offset}
    return None
