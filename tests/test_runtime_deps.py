"""The runtime dependencies pyproject.toml declares are enough: every report format works
on a plain ``pip install gradaudit``, and a feature of an optional extra that is missing
says so in one line with the command that installs it (exit 2).

Each run is a real ``python -m gradaudit`` in which nothing but the standard library,
gradaudit and the distributions its declared runtime dependencies pull in (read from
pyproject.toml, resolved through the installed packages' own metadata, markers applied)
can be imported: an import meta-path hook answers every other top-level import with
``ModuleNotFoundError``, as a fresh virtualenv with only ``pip install .`` would. This
test environment has the test extras (selenium, jsonschema, ...) installed, so the hook
is what makes the check strict: any import of an undeclared package fails, not only of
the one that once broke (matplotlib). It needs no network and no second torch install,
so it runs on every machine the suite runs on, on both torch versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.oldest

ROOT = Path(__file__).resolve().parent.parent

#: Runs ``python -m gradaudit`` with every import outside GRADAUDIT_ALLOWED (and the
#: standard library) failing as if the package were not installed.
BLOCKER = r"""
import os, runpy, sys

ALLOWED = set(os.environ["GRADAUDIT_ALLOWED"].split(","))
STDLIB = set(sys.stdlib_module_names)


class NotDeclared:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in STDLIB or top in ALLOWED:
            return None
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)


sys.meta_path.insert(0, NotDeclared())
if sys.argv[1:2] == ["--exec"]:
    exec(sys.argv[2])
else:
    sys.argv[0] = "gradaudit"
    runpy.run_module("gradaudit", run_name="__main__", alter_sys=True)
"""


def runtime_imports() -> set[str]:
    """Top-level import names of gradaudit's declared runtime dependencies and of
    everything they require in turn (without extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    with open(ROOT / "pyproject.toml", "rb") as fh:
        declared = tomllib.load(fh)["project"]["dependencies"]
    todo = [Requirement(d) for d in declared]
    dists: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (req.marker and not req.marker.evaluate({"extra": ""})) or name in dists:
            continue
        dists.add(name)
        try:
            todo.extend(Requirement(r) for r in metadata.distribution(req.name).requires or [])
        except metadata.PackageNotFoundError:
            continue  # required on another platform, or not installed: cannot be imported either
    tops = metadata.packages_distributions()
    return {top for top, owners in tops.items() if any(canonicalize_name(d) in dists for d in owners)} | {"gradaudit"}


@pytest.fixture(scope="module")
def allowed() -> str:
    names = runtime_imports()
    assert {"torch", "numpy", "click", "rich", "jinja2", "markupsafe"} <= names
    assert not names & {"matplotlib", "selenium", "pytest", "jsonschema", "safetensors", "onnx"}
    return ",".join(sorted(names))


def declared_only(allowed: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADAUDIT_ALLOWED": allowed}
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_only_declared_packages_import(allowed):
    """The check is real: installed but undeclared packages cannot be imported there."""
    code = (
        "for m in ('jinja2', 'torch', 'pytest', 'selenium', 'safetensors'):\n"
        "    try:\n        __import__(m); print(m, 'yes')\n"
        "    except ModuleNotFoundError as e:\n        print(m, 'no', e)\n"
    )
    proc = declared_only(allowed, "--exec", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "jinja2 yes", "torch yes", "pytest no No module named 'pytest'", "selenium no No module named 'selenium'",
        "safetensors no No module named 'safetensors'",
    ]


def test_html_with_only_the_runtime_dependencies(allowed, tmp_path):
    out = tmp_path / "report.html"
    proc = declared_only(allowed, "check", "examples/deep_sigmoid.py", "--format", "html", "-o", str(out))
    assert proc.returncode == 1, proc.stderr  # findings, no crash
    page = out.read_text(encoding="utf-8")
    assert "GA101" in page and '<svg class="chart"' in page and "<polyline" in page
    assert "GA101" in proc.stderr  # the human summary (rich) beside it


def test_every_other_format_with_only_the_runtime_dependencies(allowed):
    code = (
        "import json, gradaudit\n"
        "from gradaudit.loading import load_target\n"
        "from gradaudit.report import FORMATS, get_renderer\n"
        "t = 'examples/deep_sigmoid.py'\n"
        "loaded = load_target(t)\n"
        "report = gradaudit.audit(loaded.model, loaded.inputs, target=t)\n"
        "for fmt in FORMATS:\n"
        "    text = get_renderer(fmt).render(report)\n"
        "    assert 'GA101' in text, fmt\n"
        "    if fmt in ('json', 'sarif'):\n"
        "        json.loads(text)\n"
        "    print(fmt)\n"
    )
    proc = declared_only(allowed, "--exec", code)
    assert proc.returncode == 0, proc.stderr
    from gradaudit.report import FORMATS

    assert proc.stdout.split() == list(FORMATS)


def test_probe_and_gradcheck_with_only_the_runtime_dependencies(allowed):
    proc = declared_only(allowed, "check", "tests/gold/tiny_model.py", "--probe", "--gradcheck", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    assert "measured" in proc.stdout


def test_missing_extra_is_one_line_with_the_install_command(allowed, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    batch = tmp_path / "batch.safetensors"
    safetensors_torch.save_file({"0": torch.randn(8, 16)}, str(batch))
    proc = declared_only(allowed, "check", "tests/gold/tiny_model.py", "--probe", "--inputs", str(batch))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: tests/gold/tiny_model.py: --inputs: reading .safetensors needs the 'safetensors' package, "
        "which is not installed: pip install 'gradaudit[probe]'"
    ]


def test_require_names_the_extra():
    from gradaudit.errors import ConfigError, require

    assert require("json", "none", "reading JSON").dumps([1]) == "[1]"
    with pytest.raises(ConfigError, match=r"^auditing an ONNX model needs the 'gradaudit_no_such_pkg' package, "
                                          r"which is not installed: pip install 'gradaudit\[onnx\]'$"):
        require("gradaudit_no_such_pkg.sub", "onnx", "auditing an ONNX model")
