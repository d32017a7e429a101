"""Progress bars: drawn on a terminal's stderr, nothing at all otherwise."""

from __future__ import annotations

import io

import pytest

from gradaudit.progress import enabled, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal():
    stream = io.StringIO()
    with progress(3, "probing", stream=stream) as step:
        for _ in range(3):
            step()
    assert stream.getvalue() == ""


def test_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("GRADAUDIT_NO_PROGRESS", raising=False)
    stream = _Tty()
    with progress(2, "probing", stream=stream) as step:
        step(1, "conv1")
        step()
    assert "probing" in stream.getvalue()


@pytest.mark.parametrize("value,on", [("1", False), ("", True)])
def test_environment_switch(monkeypatch, value, on):
    monkeypatch.setenv("GRADAUDIT_NO_PROGRESS", value)
    assert enabled(_Tty()) is on
