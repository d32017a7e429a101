"""``[tool.gradaudit]``: discovery, values, targets, and every bad value named."""

from __future__ import annotations

import json
import os

import pytest

from gradaudit.config import Config, find_config, load_config
from gradaudit.errors import ConfigError

FULL = """
[tool.gradaudit]
select = ["GA1"]
ignore = ["ga102"]
fail-on = "warning"
deep = 12
crossing-decades = 2.5
per-module-ignores = { "encoder.*" = ["GA101"] }
targets = [
    { path = "models/net.py:build", input-shape = [[2, 3, 32, 32]] },
    { path = "models/bert.py", input-shape = [[2, 128]], input-dtype = "int64", input-range = [0, 30522] },
    "models/plain.py",
]

[tool.gradaudit.thresholds]
saturation-fraction = 0.25
"""


def test_full_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(FULL)
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.select == ["GA1"] and cfg.ignore == ["GA102"] and cfg.fail_on == "warning"
    assert cfg.settings == {"deep": 12, "crossing_decades": 2.5}
    assert cfg.thresholds == {"saturation_fraction": 0.25}
    assert cfg.per_module_ignores == {"encoder.*": ["GA101"]}
    net, bert, plain = cfg.targets
    assert (net.path, net.input_shapes) == (os.path.join("models", "net.py") + ":build", [(2, 3, 32, 32)])
    assert (bert.input_dtype, bert.input_range, bert.input_shapes) == ("int64", (0.0, 30522.0), [(2, 128)])
    assert plain.path == os.path.join("models", "plain.py") and plain.input_shapes is None


def test_walks_up_to_the_nearest_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.gradaudit]\nfail-on = 'info'\n")
    middle = tmp_path / "a"
    middle.mkdir()
    (middle / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # no [tool.gradaudit]: skipped
    deep = middle / "b" / "c"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_config() == str(tmp_path / "pyproject.toml")
    assert load_config().fail_on == "info"


def test_target_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.gradaudit]\ntargets = [{ path = 'm/net.py:build' }]\n")
    sub = tmp_path / "m"
    sub.mkdir()
    monkeypatch.chdir(sub)
    (target,) = load_config().targets
    assert target.path == "net.py:build"


def test_no_config_is_empty(tmp_path, monkeypatch):
    start = tmp_path / "x" / "y"
    start.mkdir(parents=True)
    ancestors = [start, *start.parents]
    has_table = [p for p in ancestors if (p / "pyproject.toml").is_file() and "[tool.gradaudit" in (p / "pyproject.toml").read_text()]
    cfg = load_config(start=str(start))
    if not has_table:
        assert cfg == Config()
    else:
        assert cfg.path == str(has_table[0] / "pyproject.toml")


def test_standalone_config_file(tmp_path):
    path = tmp_path / "gradaudit.toml"
    path.write_text("fail-on = 'warning'\nselect = 'GA101'\n")
    cfg = load_config(str(path))
    assert cfg.fail_on == "warning" and cfg.select == ["GA101"]


BAD = {
    "unknown key": ("colour = 'red'", "unknown key 'colour'"),
    "fail-on value": ("fail-on = 'sometimes'", "fail-on must be one of error, warning, info"),
    "select type": ("select = 3", "select must be a list of rule codes"),
    "ignore item": ("ignore = ['GA101', 4]", "ignore must be a list of rule codes"),
    "deep type": ("deep = 'ten'", "deep must be an integer"),
    "deep float": ("deep = 2.5", "deep must be an integer"),
    "deep negative": ("deep = -1", "deep must be positive"),
    "crossing-decades type": ("crossing-decades = true", "crossing-decades must be a number"),
    "per-module-ignores type": ("per-module-ignores = ['a']", "per-module-ignores must be a table"),
    "per-module-ignores codes": ("per-module-ignores = { 'a.*' = 5 }", 'per-module-ignores."a.*" must be a list'),
    "thresholds value": ("thresholds = { x = 'big' }", "thresholds.x must be a number"),
    "targets type": ("targets = 'net.py'", "targets must be a list"),
    "target key": ("targets = [{ path = 'n.py', shape = [1] }]", "unknown key 'shape' in targets[0]"),
    "target path": ("targets = [{ input-shape = [[1, 2]] }]", "targets[0].path must be a non-empty string"),
    "target shape": ("targets = [{ path = 'n.py', input-shape = [[2, -1]] }]", "targets[0].input-shape must be"),
    "target dtype": ("targets = [{ path = 'n.py', input-shape = [[2]], input-dtype = 'qubit' }]", "unknown dtype"),
    "target range": ("targets = [{ path = 'n.py', input-shape = [[2]], input-range = [5, 1] }]",
                     "targets[0].input-range must be [low, high]"),
    "target dtype without shape": ("targets = [{ path = 'n.py', input-dtype = 'int64' }]", "need input-shape"),
    "invalid toml": ("fail-on = ", "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_name_key_and_file(case, tmp_path, monkeypatch):
    line, message = BAD[case]
    (tmp_path / "pyproject.toml").write_text(f"[tool.gradaudit]\n{line}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value).startswith("pyproject.toml: ")
    assert message in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"))


# -- the command line with a config ------------------------------------------------------------

MODEL = """
import torch.nn as nn

def build(depth=16):  # Xavier before ReLU: the gradient falls 10x every ~6.6 layers
    layers = []
    for _ in range(depth):
        layer = nn.Linear(64, 64)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers)
"""


def _project(write, extra=""):
    write("models/net.py", MODEL)
    write("pyproject.toml", "[tool.gradaudit]\ntargets = [{ path = 'models/net.py:build', input-shape = [[4, 64]] }]\n"
          + extra)


def test_bare_check_audits_configured_targets(cli, write, tmp_path):
    _project(write)
    result = cli("check", "--format", "json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert report["target"] == os.path.join("models", "net.py") + ":build"
    assert report["inputs"] == [{"shape": [4, 64], "dtype": "float32"}]
    assert report["input_source"] == "--input-shape"
    assert len([layer for layer in report["layers"] if layer["op"] == "linear"]) == 16


def test_cli_target_uses_the_configured_inputs(cli, write, tmp_path):
    _project(write)
    result = cli("check", "models/net.py:build", "--format", "json", cwd=tmp_path)
    assert json.loads(result.stdout)["inputs"] == [{"shape": [4, 64], "dtype": "float32"}]
    result = cli("check", "models/net.py:build", "--input-shape", "3,64", "--format", "json", cwd=tmp_path)
    assert json.loads(result.stdout)["inputs"] == [{"shape": [3, 64], "dtype": "float32"}]


@pytest.mark.parametrize("config_fail_on,flag", [("info", None), ("error", "info"), ("info", "error")])
def test_fail_on_from_config_and_flag_override(config_fail_on, flag, cli, write, tmp_path):
    _project(write, f"fail-on = '{config_fail_on}'\n")
    args = ["check", "--format", "json"] + (["--fail-on", flag] if flag else [])
    result = cli(*args, cwd=tmp_path)
    report = json.loads(result.stdout)
    order = {"error": 0, "warning": 1, "info": 2}
    limit = order[flag or config_fail_on]
    assert report["findings"], "the Xavier-ReLU stack should produce at least one finding"
    expected = 1 if any(order[f["severity"]] <= limit for f in report["findings"]) else 0
    assert result.exit_code == expected


@pytest.mark.parametrize(
    "config,flags,present",
    [
        ("", [], True),
        ("ignore = ['GA101']\n", [], False),
        ("select = ['GA101']\n", [], True),
        ("select = ['GA101']\n", ["--ignore", "GA101"], False),
        ("ignore = ['GA101']\n", ["--select", "GA101"], False),
    ],
)
def test_select_and_ignore_from_config_and_flags(config, flags, present, cli, write, tmp_path):
    _project(write, config)
    report = json.loads(cli("check", "--format", "json", *flags, cwd=tmp_path).stdout)
    assert any(f["rule"] == "GA101" for f in report["findings"]) == present


def test_unknown_code_in_config_names_file_and_key(cli, write, tmp_path):
    _project(write, "select = ['XY1']\n")
    result = cli("check", cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: pyproject.toml: select: unknown rule code 'XY1'")


def test_unknown_threshold_names_file_and_key(cli, write, tmp_path):
    _project(write, "[tool.gradaudit.thresholds]\nresidual-dept = 30\n")
    result = cli("check", cwd=tmp_path)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: pyproject.toml: unknown threshold 'residual-dept'")
    assert "residual-depth" in result.stderr


@pytest.mark.parametrize("depth,present", [(None, True), (40, False), (31, True)])
def test_threshold_reaches_the_rules(depth, present, cli, write, tmp_path):
    """GA303 fires on a chain of at least ``residual-depth`` weight layers; the deep sigmoid has 31."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "deep_sigmoid.py")
    table = f"[tool.gradaudit.thresholds]\nresidual-depth = {depth}\n" if depth else "fail-on = 'error'\n"
    write("pyproject.toml", "[tool.gradaudit]\n" + table)
    report = json.loads(cli("check", example, "--format", "json", cwd=tmp_path).stdout)
    assert any(f["rule"] == "GA303" for f in report["findings"]) == present
