"""Target loading: which object is the model, which inputs, and where they came from."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from gradaudit.errors import ConfigError, LoadError
from gradaudit.loading import infer_inputs, load_target, make_inputs, parse_range, parse_shape

pytestmark = pytest.mark.oldest

HEADER = "import torch\nimport torch.nn as nn\n"

# (file body, target suffix, expected in_features of the loaded Linear, expected input_source)
TARGETS = {
    "module-level model": ("model = nn.Linear(3, 4)\n", "", 3, "inferred from Linear (in_features=3)"),
    "build_model factory": ("def build_model():\n    return nn.Linear(5, 4)\n", "", 5, None),
    "make_model factory": ("def make_model():\n    return nn.Linear(6, 4)\n", "", 6, None),
    "get_model factory": ("def get_model():\n    return nn.Linear(7, 4)\n", "", 7, None),
    "create_model factory": ("def create_model():\n    return nn.Linear(8, 4)\n", "", 8, None),
    "single class": (
        "class Net(nn.Module):\n    def __init__(self, n=9):\n        super().__init__()\n"
        "        self.fc = nn.Linear(n, 2)\n    def forward(self, x):\n        return self.fc(x)\n",
        "",
        9,
        "inferred from Linear 'fc' (in_features=9)",
    ),
    "class with arg-needing helper": (
        "class Block(nn.Module):\n    def __init__(self, n):\n        super().__init__()\n        self.fc = nn.Linear(n, n)\n"
        "    def forward(self, x):\n        return self.fc(x)\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.b = Block(10)\n"
        "    def forward(self, x):\n        return self.b(x)\n",
        "",
        10,
        "inferred from Linear 'b.fc' (in_features=10)",
    ),
    "attr instance": ("a = nn.Linear(11, 2)\nb = nn.Linear(12, 2)\n", ":b", 12, None),
    "attr class": (
        "class Net(nn.Linear):\n    def __init__(self):\n        super().__init__(13, 2)\n"
        "class Other(nn.Linear):\n    def __init__(self):\n        super().__init__(1, 2)\n",
        ":Net",
        13,
        None,
    ),
    "attr factory": ("def small():\n    return nn.Linear(14, 2)\ndef build_model():\n    return nn.Linear(1, 1)\n",
                     ":small", 14, None),
    "factory tuple": ("def build_model():\n    return nn.Linear(15, 2), (torch.zeros(3, 15),)\n", "", 15,
                      "factory build_model()"),
    "model beats factory": ("model = nn.Linear(16, 2)\ndef build_model():\n    return nn.Linear(1, 1)\n", "", 16, None),
}


@pytest.mark.parametrize("case", sorted(TARGETS))
def test_target_forms(case, write):
    body, suffix, in_features, source = TARGETS[case]
    path = write("net.py", HEADER + body)
    loaded = load_target(str(path) + suffix)
    linears = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == in_features
    # the inputs fit the model: a real forward pass runs
    loaded.model(*loaded.inputs)
    if source is not None:
        assert loaded.input_source == source


def test_package_module_attr(write, monkeypatch, tmp_path):
    write("pkg_gradaudit_t/__init__.py", "")
    write("pkg_gradaudit_t/nets.py", HEADER + "def tiny():\n    return nn.Linear(21, 3)\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_target("pkg_gradaudit_t.nets:tiny")
    assert loaded.model.in_features == 21
    assert loaded.inputs[0].shape == (2, 21)


# which source of example inputs wins: --input-shape > example_inputs > factory tuple > inferred
INPUT_ORDER = [
    ("shape beats all", "example_inputs = (torch.zeros(4, 30),)\n", [(5, 30)], (5, 30), "--input-shape"),
    ("example_inputs tuple", "example_inputs = (torch.zeros(4, 30),)\n", None, (4, 30), "example_inputs in"),
    ("example_inputs tensor", "example_inputs = torch.zeros(6, 30)\n", None, (6, 30), "example_inputs in"),
    ("example_inputs callable", "def example_inputs():\n    return (torch.zeros(7, 30),)\n", None, (7, 30),
     "example_inputs in"),
    ("factory tuple", "", None, (3, 30), "factory build_model()"),
]


@pytest.mark.parametrize("name,extra,shapes,expected,source", INPUT_ORDER, ids=[c[0] for c in INPUT_ORDER])
def test_input_precedence(name, extra, shapes, expected, source, write):
    body = HEADER + "def build_model():\n    return nn.Linear(30, 2), (torch.zeros(3, 30),)\n" + extra
    loaded = load_target(str(write("m.py", body)), input_shapes=shapes)
    assert tuple(loaded.inputs[0].shape) == expected
    assert loaded.input_source.startswith(source)


def _seq(*layers):
    return nn.Sequential(*layers)


class _Attn(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _Rnn(nn.Module):
    def __init__(self, cls, batch_first):
        super().__init__()
        self.rnn = cls(12, 5, batch_first=batch_first)

    def forward(self, x):
        return self.rnn(x)[0]


# model -> (expected input shape, expected dtype, the layer type named in the source)
INFER = {
    "linear": (lambda: _seq(nn.Linear(784, 10)), (2, 784), torch.float32, "Linear"),
    "flatten-then-linear": (lambda: _seq(nn.Flatten(), nn.Linear(20, 3)), (2, 20), torch.float32, "Linear"),
    "conv1d": (lambda: _seq(nn.Conv1d(4, 8, 3)), (2, 4, 32), torch.float32, "Conv1d"),
    "conv2d": (lambda: _seq(nn.Conv2d(3, 8, 3), nn.ReLU()), (2, 3, 32, 32), torch.float32, "Conv2d"),
    "conv3d": (lambda: _seq(nn.Conv3d(2, 4, 3)), (2, 2, 32, 32, 32), torch.float32, "Conv3d"),
    "convtranspose2d": (lambda: _seq(nn.ConvTranspose2d(6, 3, 2)), (2, 6, 32, 32), torch.float32, "ConvTranspose2d"),
    "embedding": (lambda: _seq(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(64, 2)), (2, 8), torch.int64, "Embedding"),
    "lstm-batch-first": (lambda: _Rnn(nn.LSTM, True), (2, 8, 12), torch.float32, "LSTM"),
    "lstm-seq-first": (lambda: _Rnn(nn.LSTM, False), (8, 2, 12), torch.float32, "LSTM"),
    "gru": (lambda: _Rnn(nn.GRU, True), (2, 8, 12), torch.float32, "GRU"),
    "rnn": (lambda: _Rnn(nn.RNN, False), (8, 2, 12), torch.float32, "RNN"),
    "mha-batch-first": (lambda: _Attn(True), (2, 8, 16), torch.float32, "MultiheadAttention"),
    "mha-seq-first": (lambda: _Attn(False), (8, 2, 16), torch.float32, "MultiheadAttention"),
    "batchnorm1d": (lambda: _seq(nn.BatchNorm1d(7), nn.Linear(7, 2)), (2, 7), torch.float32, "BatchNorm1d"),
    "layernorm": (lambda: _seq(nn.LayerNorm(24), nn.Linear(24, 2)), (2, 24), torch.float32, "LayerNorm"),
    "transformer-layer": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False),
        (2, 8, 32),
        torch.float32,
        "TransformerEncoderLayer",
    ),
}


@pytest.mark.parametrize("case", sorted(INFER))
def test_infer_inputs(case):
    build, shape, dtype, kind = INFER[case]
    model = build()
    before = torch.get_rng_state()
    (x,), source = infer_inputs(model)
    assert torch.equal(before, torch.get_rng_state())  # a private generator: global RNG untouched
    assert tuple(x.shape) == shape and x.dtype == dtype
    assert source.startswith(f"inferred from {kind} ")
    model(x)  # the oracle: the real model accepts the inferred input
    if dtype == torch.int64:
        assert 0 <= int(x.min()) and int(x.max()) < 100


def test_infer_inputs_untraceable_model_falls_back_to_registration_order():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(9, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    (x,), source = infer_inputs(Branchy())
    assert x.shape == (2, 9) and "'fc'" in source


@pytest.mark.parametrize(
    "model",
    [_seq(nn.ReLU()), _seq(nn.LazyLinear(3))],
    ids=["no-consumer", "lazy"],
)
def test_infer_inputs_asks_for_input_shape(model):
    with pytest.raises(LoadError, match="--input-shape"):
        infer_inputs(model)


def test_infer_inputs_several_inputs_need_shapes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, a, b):
            return self.fc(a) + b

    with pytest.raises(LoadError, match="takes 2 inputs"):
        infer_inputs(Two())


def test_integer_inputs_draw_ids_in_range():
    (x,), stats = make_inputs([(4, 1000)], "int64", (5, 17))
    assert x.dtype == torch.int64 and int(x.min()) == 5 and int(x.max()) == 16
    assert stats == {}


def test_integer_inputs_default_to_embedding_size():
    (x,), _ = make_inputs([(4, 500)], "int64", None, _seq(nn.Embedding(30, 4)))
    assert int(x.max()) == 29 and int(x.min()) == 0


def test_float_range_gives_uniform_stats():
    (x,), stats = make_inputs([(200, 1000)], "float32", (-1.0, 3.0))
    mean, std = stats[0]
    assert mean == pytest.approx(1.0) and std == pytest.approx(4 / 12**0.5)
    # the closed form agrees with the drawn tensor (2e5 samples: standard error ~0.0026)
    assert float(x.mean()) == pytest.approx(mean, abs=0.02)
    assert float(x.std()) == pytest.approx(std, rel=0.01)
    assert -1.0 <= float(x.min()) and float(x.max()) < 3.0


def test_make_inputs_leaves_global_rng_alone():
    before = torch.get_rng_state()
    make_inputs([(3, 4)], None, None)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    "text,shape",
    [("2,3,224,224", (2, 3, 224, 224)), ("2x3", (2, 3)), ("(4, 5)", (4, 5)), ("7", (7,))],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "2,x", "2,-3", "0,4", "2.5,3", "a"])
def test_parse_shape_rejects(text):
    with pytest.raises(ConfigError, match="bad input shape"):
        parse_shape(text)


@pytest.mark.parametrize("text,rng", [("0,30522", (0.0, 30522.0)), ("-1.5, 2", (-1.5, 2.0))])
def test_parse_range(text, rng):
    assert parse_range(text) == rng


@pytest.mark.parametrize("text", ["1", "3,1", "1,1", "a,b", "1,2,3"])
def test_parse_range_rejects(text):
    with pytest.raises(ConfigError, match="bad input range"):
        parse_range(text)


@pytest.mark.parametrize("name", ["json.py", "torch.py", "gradaudit.py"])
def test_file_named_like_a_package_does_not_shadow_it(name, write):
    loaded = load_target(str(write(name, HEADER + "model = nn.Linear(4, 2)\n")))
    import json

    assert loaded.model.in_features == 4
    assert hasattr(json, "dumps") and hasattr(torch, "randn")
    assert sys.modules["torch"] is torch


def test_sibling_import_and_main_guard(write):
    write("blocks_gradaudit_t.py", HEADER + "def block():\n    return nn.Linear(6, 6)\n")
    path = write(
        "net.py",
        HEADER + "from blocks_gradaudit_t import block\nmodel = nn.Sequential(block(), nn.ReLU())\n"
        "if __name__ == '__main__':\n    raise SystemExit('the main block must not run')\n",
    )
    loaded = load_target(str(path))
    assert loaded.model[0].in_features == 6


def test_onnx_target_that_is_not_onnx_is_a_clear_error(write):
    pytest.importorskip("onnx")
    path = write("m.onnx", "not really onnx")
    with pytest.raises(LoadError, match="m.onnx: not an ONNX model"):
        load_target(str(path))



def test_named_shapes_make_keyword_inputs():
    shapes = [parse_shape("input_ids=2,8"), parse_shape("attention_mask=2x8"), parse_shape("token_type_ids=2,8")]
    assert shapes[0] == (2, 8) and shapes[0].name == "input_ids" and parse_shape("2,8").name is None
    model = nn.Embedding(30, 4)
    call, _ = make_inputs(shapes, "input_ids=int64,attention_mask=int64,token_type_ids=int64", None, model)
    assert call.args == () and list(call.kwargs) == ["input_ids", "attention_mask", "token_type_ids"]
    ids, mask, types = call.kwargs.values()
    assert ids.dtype == torch.int64 and int(ids.max()) < 30
    assert bool((mask == 1).all()) and bool((types == 0).all())


def test_dtype_for_an_input_that_has_no_shape_is_an_error():
    with pytest.raises(ConfigError, match="mask=...: no --input-shape"):
        make_inputs([parse_shape("x=2,8")], "mask=int64", None, None)


def test_keyword_inputs_from_the_command_line(write, cli):
    write(
        "net.py",
        HEADER
        + "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(50, 16)\n"
        "        self.fc = nn.Linear(16, 50)\n"
        "    def forward(self, input_ids=None, attention_mask=None):\n"
        "        return self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1))\n",
    )
    result = cli("check", "net.py", "--input-shape", "input_ids=2,8", "--input-shape", "attention_mask=2,8",
                 "--input-dtype", "input_ids=int64", "--format", "json", "-q", cwd=write("x", "").parent)
    import json

    report = json.loads(result.output)
    assert result.exit_code in (0, 1), result.output
    assert [x["name"] for x in report["inputs"]] == ["input_ids", "attention_mask"]
    assert report["inputs"][0]["dtype"] == "int64" and report["inputs"][1]["dtype"] == "float32"
    assert report["summary"]["coverage"]["complete"]
