"""gradaudit as a pre-commit hook, for real: a temporary git repository, a
``.pre-commit-config.yaml`` with a ``repo: local`` / ``language: system`` hook running
the installed ``gradaudit check --skip-missing``, and ``git commit`` through pre-commit's
git hook. The deep sigmoid model blocks the commit with its finding printed; a healthy
model, and a Python file without any model, pass. Also: the published
``.pre-commit-hooks.yaml`` is a valid manifest, and ``[tool.gradaudit] targets``
restrict which files count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

CONFIG = """\
repos:
  - repo: local
    hooks:
      - id: gradaudit
        name: gradaudit
        entry: gradaudit check --skip-missing
        language: system
        types: [python]
        require_serial: true
"""

HEALTHY = """\
import torch
import torch.nn as nn

model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
example_inputs = (torch.randn(4, 16),)
"""


def _env(tmp: Path) -> dict:
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PRE_COMMIT"))}
    env.update(HOME=str(tmp / "home"), PRE_COMMIT_HOME=str(tmp / "cache"), PATH=bindir + os.pathsep + env.get("PATH", ""),
               GIT_CONFIG_NOSYSTEM="1", GRADAUDIT_NO_PROGRESS="1", NO_COLOR="1")
    return env


def _run(args, repo, env, timeout=300):
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def make_repo(tmp_path, config: str = CONFIG):
    """A git repository under ``tmp_path`` with ``config`` as its pre-commit config, the
    hook not yet installed: ``(work tree, environment)``."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed", pytrace=False)
    (tmp_path / "home").mkdir()
    work = tmp_path / "repo"
    work.mkdir()
    env = _env(tmp_path)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                 ["git", "config", "user.name", "t"], ["git", "config", "commit.gpgsign", "false"]):
        assert _run(args, work, env).returncode == 0
    (work / ".pre-commit-config.yaml").write_text(config)
    return work, env


@pytest.fixture
def repo(tmp_path):
    work, env = make_repo(tmp_path)
    proc = _run([sys.executable, "-m", "pre_commit", "install"], work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _run(["git", "add", ".pre-commit-config.yaml"], work, env)
    proc = _run(["git", "commit", "-q", "-m", "config"], work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work, env


def _commit(work, env, name, text):
    (work / name).write_text(text)
    assert _run(["git", "add", name], work, env).returncode == 0
    return _run(["git", "commit", "-m", f"add {name}"], work, env)


def _head_files(work, env) -> set[str]:
    return set(_run(["git", "ls-tree", "--name-only", "HEAD"], work, env).stdout.split())


def test_bad_model_blocks_the_commit(repo):
    work, env = repo
    proc = _commit(work, env, "net.py", (EXAMPLES / "deep_sigmoid.py").read_text())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "GA101" in out and "vanishing-gradients" in out and "net.py" in out
    assert "net.py" not in _head_files(work, env)


def test_healthy_model_and_plain_file_pass(repo):
    work, env = repo
    (work / "util.py").write_text("def add(a, b):\n    return a + b\n")
    _run(["git", "add", "util.py"], work, env)
    proc = _commit(work, env, "net.py", HEALTHY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gradaudit" in proc.stdout + proc.stderr  # the hook did run, on both files
    assert {"net.py", "util.py"} <= _head_files(work, env)


def test_noqa_on_the_definition_line_lets_it_through(repo):
    work, env = repo
    src = (EXAMPLES / "deep_sigmoid.py").read_text()
    line = "layer = nn.Linear(WIDTH, WIDTH)"
    assert src.count(line) == 1
    proc = _commit(work, env, "net.py", src.replace(line, line + "  # gradaudit: noqa[GA1]"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_configured_targets_restrict_which_files_count(repo):
    work, env = repo
    (work / "pyproject.toml").write_text('[tool.gradaudit]\ntargets = [{ path = "good.py" }]\n')
    (work / "good.py").write_text(HEALTHY)
    (work / "scratch.py").write_text((EXAMPLES / "deep_sigmoid.py").read_text())
    proc = _run([sys.executable, "-m", "pre_commit", "run", "--files", "good.py", "scratch.py"], work, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (work / "pyproject.toml").write_text('[tool.gradaudit]\ntargets = [{ path = "scratch.py" }]\n')
    proc = _run([sys.executable, "-m", "pre_commit", "run", "--files", "good.py", "scratch.py"], work, env)
    assert proc.returncode != 0 and "GA101" in proc.stdout + proc.stderr


def test_published_manifest_is_valid():
    proc = subprocess.run([sys.executable, "-m", "pre_commit", "validate-manifest", str(ROOT / ".pre-commit-hooks.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import yaml

    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "gradaudit" and hook["entry"] == "gradaudit check --skip-missing"
    assert hook["require_serial"] is True and hook["pass_filenames"] is True and hook["types"] == ["python"]
