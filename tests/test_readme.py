"""The README's Python API section runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(_section("Python API")))))
def test_api_section_runs(index):
    code = _python_blocks(_section("Python API"))[index]
    exec(compile(code, f"README.md[Python API block {index}]", "exec"), {"__name__": "readme"})
