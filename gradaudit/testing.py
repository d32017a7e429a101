"""gradaudit in a test suite: :func:`assert_trainable`, and a pytest plugin.

    from gradaudit.testing import assert_trainable

    def test_model_trains():
        assert_trainable(build_model(), torch.randn(8, 3, 32, 32))

The assertion fails with the text report as its message (verdict, findings with their
source lines and fixes, the per-layer table). Installed with gradaudit, the plugin (the
``pytest11`` entry point ``gradaudit``) provides the same function as the fixture
``assert_trainable``, so a test needs no import::

    def test_model_trains(assert_trainable):
        assert_trainable(model, inputs, fail_on="warning", probe=True)
"""

from __future__ import annotations

from typing import Any


def assert_trainable(model, example_inputs: Any = None, *, fail_on: str = "error", **options: Any):
    """Audit ``model`` (``options`` are :func:`gradaudit.audit`'s keyword options) and
    raise ``AssertionError`` with the text report unless it passes at ``fail_on`` (no
    finding at or above it, statistics on every layer). Returns the report otherwise."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this helper's
    from gradaudit import audit
    from gradaudit.report.model import check_fail_on
    from gradaudit.report.text import render

    check_fail_on(fail_on)
    report = audit(model, example_inputs, **options)
    if not report.ok(fail_on):
        raise AssertionError(f"gradaudit: the model is not trainable as initialised (fail_on={fail_on!r})\n\n"
                             + render(report))
    return report


try:
    import pytest
except ImportError:  # pragma: no cover - the helper works without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(name="assert_trainable")
    def _assert_trainable_fixture():
        """:func:`gradaudit.testing.assert_trainable` as a fixture."""
        return assert_trainable
