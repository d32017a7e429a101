"""Shared fixtures: the repository's examples, a model-file writer, CLI runners, one
intra-op thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors, where threads cost more than they
    save on 2 busy cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write(tmp_path):
    """write("net.py", source) -> path of a dedented file under tmp_path."""

    def _write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip())
        return path

    return _write


@pytest.fixture
def cli(monkeypatch):
    """cli(*args, cwd=None) -> click Result of an in-process ``gradaudit`` run (stderr apart)."""
    from click.testing import CliRunner

    from gradaudit.cli import main

    def _run(*args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.delenv("NO_COLOR", raising=False)
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return _run


@pytest.fixture
def run():
    """run(*args, cwd=None, env=None) -> CompletedProcess of a real ``python -m gradaudit``."""
    return run_process


def run_process(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gradaudit", *map(str, args)],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
