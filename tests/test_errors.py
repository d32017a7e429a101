"""Bad input gets one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

HEADER = "import torch\nimport torch.nn as nn\n"


def _missing_file(write):
    return ["check", "nothere.py"], ["nothere.py: no such file"]


def _syntax_error(write):
    write("net.py", HEADER + "def build_model(:\n    pass\n")
    return ["check", "net.py"], ["net.py:3", "syntax error"]


def _import_error(write):
    write("net.py", HEADER + "import gradaudit_no_such_package_xyz\nmodel = nn.Linear(2, 2)\n")
    return ["check", "net.py"], ["net.py:3", "ModuleNotFoundError", "gradaudit_no_such_package_xyz"]


def _no_model(write):
    write("net.py", HEADER + "WIDTH = 3\n")
    return ["check", "net.py"], ["no model found"]


def _ambiguous(write):
    write(
        "net.py",
        HEADER + "class A(nn.Linear):\n    def __init__(self):\n        super().__init__(2, 2)\n"
        "class B(nn.Linear):\n    def __init__(self):\n        super().__init__(3, 3)\n",
    )
    return ["check", "net.py"], ["several nn.Module classes", "A, B", "net.py:B"]


def _factory_raising(write):
    write("net.py", HEADER + "def build_model():\n    raise ValueError('width must be even')\n")
    return ["check", "net.py"], ["net.py:4", "build_model() raised ValueError: width must be even"]


def _wrong_input_shape(write):
    write("net.py", HEADER + "model = nn.Sequential(nn.Linear(10, 5), nn.ReLU())\n")
    return ["check", "net.py", "--input-shape", "2,7"], ["the example inputs do not fit the model"]


def _forward_fails(write):
    """A forward that raises on its inputs: no capture can take it (fx's shapes, export's
    fake run and the hook capture's real run all meet the same error)."""
    write(
        "net.py",
        HEADER
        + "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.view(3, -1))\n"
        "example_inputs = (torch.randn(2, 4),)\n",
    )
    return ["check", "net.py"], ["no capture of the model worked", "net.py:8"]


def _unknown_rule(write):
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    return ["check", "net.py", "--select", "GA999"], ["unknown rule code", "GA999"]


def _unknown_rule_explain(write):
    return ["explain", "GA999"], ["unknown rule code", "GA999"]


def _bad_config_value(write):
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    write("pyproject.toml", "[tool.gradaudit]\nfail-on = 'sometimes'\n")
    return ["check", "net.py"], ["pyproject.toml", "fail-on", "sometimes"]


def _unknown_config_key(write):
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    write("pyproject.toml", "[tool.gradaudit]\nfail_on = 'warning'\n")
    return ["check", "net.py"], ["pyproject.toml", "unknown key 'fail_on'", "did you mean 'fail-on'"]


def _bad_input_shape(write):
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    return ["check", "net.py", "--input-shape", "2,x"], ["--input-shape", "bad input shape '2,x'"]


def _bad_input_dtype(write):
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    return ["check", "net.py", "--input-shape", "2,4", "--input-dtype", "complex7"], ["unknown input dtype 'complex7'"]


def _not_a_module(write):
    write("net.py", HEADER + "model = 42\n")
    return ["check", "net.py"], ["model is a int, not an nn.Module"]


def _factory_needs_args(write):
    write("net.py", HEADER + "def build_model(width):\n    return nn.Linear(width, width)\n")
    return ["check", "net.py"], ["build_model() needs arguments"]


def _onnx(write):
    write("m.onnx", "x")
    return ["check", "m.onnx"], ["m.onnx: not an ONNX model"]


def _binary_file(write):
    write("binary.py", "").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00")
    return ["check", "binary.py"], ["binary.py: not a Python source file", "null bytes"]


def _pickled_inputs(write):
    import torch
    import torch.nn as nn

    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    torch.save(nn.Linear(4, 4), write("model.pt", ""))
    return ["check", "net.py", "--probe", "--inputs", "model.pt"], [
        "--inputs: model.pt holds pickled Python objects (torch.nn.modules.linear.Linear), which gradaudit never "
        "unpickles; save the batch as plain tensors",
    ]


def _huge_input_shape(write):
    write("net.py", HEADER + "model = nn.Linear(100000, 4)\n")
    return ["check", "net.py", "--input-shape", "100000,100000"], [
        "--input-shape 100000,100000: the inputs would take", "GiB (float32), over the 1 GiB limit for example inputs",
    ]


def _no_target(write):
    return ["check"], ["no TARGET given"]


def _unknown_command(write):
    return ["chek", "net.py"], ["No such command 'chek'"]


CASES = {
    "missing file": _missing_file,
    "syntax error": _syntax_error,
    "import error": _import_error,
    "no model found": _no_model,
    "ambiguous models": _ambiguous,
    "factory raising": _factory_raising,
    "factory needs arguments": _factory_needs_args,
    "not a module": _not_a_module,
    "wrong input shape": _wrong_input_shape,
    "forward fails": _forward_fails,
    "unknown rule code": _unknown_rule,
    "unknown rule code in explain": _unknown_rule_explain,
    "bad config value": _bad_config_value,
    "unknown config key": _unknown_config_key,
    "bad --input-shape": _bad_input_shape,
    "bad --input-dtype": _bad_input_dtype,
    "onnx target": _onnx,
    "binary file as target": _binary_file,
    "pickled module as --inputs": _pickled_inputs,
    "huge --input-shape": _huge_input_shape,
    "no target": _no_target,
    "unknown command": _unknown_command,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, cli, write, tmp_path):
    args, expected = CASES[case](write)
    out = tmp_path / "out" / "report.json"
    out.parent.mkdir()
    if args[0] == "check":
        args = args + ["--format", "json", "-o", str(out)]
    result = cli(*args, cwd=tmp_path)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in lines[0]
    assert ":None" not in lines[0] and "two options" not in lines[0]  # no half sentence of another tool
    assert result.stdout == ""
    assert list(out.parent.iterdir()) == []  # -o created nothing, not even a temp file


@pytest.mark.parametrize("case", ["syntax error", "factory raising", "forward fails", "wrong input shape",
                                  "huge --input-shape"])
def test_bad_input_in_a_real_process(case, write, tmp_path, run):
    args, expected = CASES[case](write)
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert all(fragment in proc.stderr for fragment in expected)


def test_debug_shows_the_traceback(write, tmp_path, run):
    args, _ = _factory_raising(write)
    proc = run(*args, "--debug", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "width must be even" in proc.stderr


def test_internal_error_is_one_line_and_exit_3(cli, write, tmp_path, monkeypatch):
    import gradaudit.api

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gradaudit.api, "run", broken)
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    result = cli("check", "net.py", cwd=tmp_path)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == ["internal error: RuntimeError: boom (run with --debug for the traceback)"]


def test_huge_input_shape_allocates_nothing(monkeypatch):
    """The size is checked before any tensor of the inputs exists."""
    import torch

    from gradaudit.errors import ConfigError
    from gradaudit.loading import make_inputs

    def no(*args, **kwargs):
        raise AssertionError("allocated")

    for name in ("randn", "rand", "randint", "empty", "zeros"):
        monkeypatch.setattr(torch, name, no)
    with pytest.raises(ConfigError, match="over the 1 GiB limit"):
        make_inputs([(100000, 100000)], None, None)
    with pytest.raises(ConfigError, match=r"\(int64\)"):
        make_inputs([(2, 2**26), (2, 2**26)], "int64", (0, 10))  # 2 GiB of ids


def test_input_size_limit_is_exact():
    import torch

    from gradaudit.errors import ConfigError
    from gradaudit.loading import MAX_INPUT_BYTES, check_input_size

    check_input_size([(2, MAX_INPUT_BYTES // 8)], torch.float32)  # exactly the limit
    check_input_size([(2, MAX_INPUT_BYTES // 4)], torch.float16)
    with pytest.raises(ConfigError):
        check_input_size([(2, MAX_INPUT_BYTES // 8), (1,)], torch.float32)  # one element over


@pytest.mark.parametrize("dest", ["missing/report.json", "/nonexistent/dir/r.json"])
def test_unwritable_output_fails_before_the_audit(cli, write, tmp_path, monkeypatch, dest):
    import gradaudit.api
    import gradaudit.loading

    def not_reached(*args, **kwargs):
        raise AssertionError("the audit ran")

    monkeypatch.setattr(gradaudit.loading, "load_target", not_reached)
    monkeypatch.setattr(gradaudit.api, "audit", not_reached)
    write("net.py", HEADER + "model = nn.Linear(4, 4)\n")
    result = cli("check", "net.py", "--format", "json", "-o", dest, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: -o {dest}: the folder {Path(dest).parent.absolute()} does not exist"]
    assert result.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]
