"""The pytest plugin: ``assert_trainable`` as a helper and as a fixture, run by pytest
itself (``pytester``); its failure message is the text report. The ``pytest11`` entry
point is declared in pyproject.toml, and when gradaudit is installed from this tree, the
installed distribution registers it and a plain pytest run (no ``-p``) finds the fixture."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch  # noqa: F401  imported before pytester's in-process runs, which must not unload it

import gradaudit  # noqa: F401

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.oldest

ROOT = Path(__file__).resolve().parent.parent

TESTS = """
import torch
import torch.nn as nn

from gradaudit.testing import assert_trainable


def deep_tanh():
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(32, 32), nn.Tanh())])


def test_healthy_with_the_helper():
    report = assert_trainable(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8))
    assert report.verdict == "healthy"


def test_broken_with_the_fixture(assert_trainable):
    assert_trainable(deep_tanh(), torch.randn(8, 32))


def test_warning_gate(assert_trainable):
    torch.manual_seed(0)
    assert_trainable(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8), fail_on="warning",
                     probe=True, draws=1)
"""


def test_helper_and_fixture_under_pytest(pytester):
    pytester.makepyfile(test_models=TESTS)
    # the module as an explicit plugin, the entry point (when installed) blocked: one registration
    result = pytester.runpytest("-p", "no:gradaudit", "-p", "gradaudit.testing", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "test_broken_with_the_fixture" in out
    # the failure message is the text report: verdict, finding with its fix, per-layer table
    assert "VANISHING" in out and "GA101 vanishing-gradients" in out and "fix:" in out and "per layer" in out
    assert "assert_trainable(deep_tanh(), torch.randn(8, 32))" in out  # the test's own line is shown
    assert "def assert_trainable" not in out  # not the helper's


def test_failure_message_is_the_text_report():
    import torch.nn as nn

    from gradaudit.report.text import render
    from gradaudit.testing import assert_trainable

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(32, 32), nn.Tanh())])
    x = torch.randn(8, 32)
    with pytest.raises(AssertionError) as info:
        assert_trainable(model, x)
    assert str(info.value).endswith(render(gradaudit.audit(model, x)))
    with pytest.raises(gradaudit.api.ConfigError):
        assert_trainable(model, x, fail_on="fatal")


def test_entry_point_is_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"]["pytest11"] == {"gradaudit": "gradaudit.testing"}


def _installed_from_this_tree() -> metadata.Distribution | None:
    """The installed gradaudit distribution when it was installed from this tree."""
    try:
        dist = metadata.distribution("gradaudit")
    except metadata.PackageNotFoundError:
        return None
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        return dist if url.startswith("file://") and Path(url[len("file://"):]).resolve() == ROOT else None
    location = Path(str(dist.locate_file("gradaudit"))).resolve()
    return dist if location == ROOT / "gradaudit" else None


def test_installed_distribution_registers_the_plugin(pytester):
    dist = _installed_from_this_tree()
    if dist is None:
        pytest.skip("gradaudit is not installed from this tree (pip install -e . registers the entry point)")
    points = [ep for ep in dist.entry_points if ep.group == "pytest11"]
    assert [(ep.name, ep.value) for ep in points] == [("gradaudit", "gradaudit.testing")], (
        "the installed metadata is stale: reinstall with pip install -e ."
    )
    pytester.makepyfile(test_fixture="def test_it(assert_trainable):\n    assert callable(assert_trainable)\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")  # no -p gradaudit.testing
    result.assert_outcomes(passed=1)
