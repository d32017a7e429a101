"""The probe's measured numbers against an independent hooks + autograd measurement,
and predicted vs measured agreement on the repository's examples and small models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import gradaudit
import gradaudit.api
from gradaudit.errors import ConfigError
from gradaudit.probe.gradients import SEED
from probe_models import hook_measure, load_example, small_models
from shown import shows

pytestmark = pytest.mark.oldest

EXAMPLES = {
    "relu_he_30": None,
    "relu_xavier_30": None,
    "deep_sigmoid": None,
    "resnet18": (torch.Size([2, 3, 64, 64])),
}


def _example(name):
    mod = load_example(name)
    inputs = mod.example_inputs
    shape = EXAMPLES[name]
    if shape is not None:
        torch.manual_seed(1)
        inputs = (torch.randn(shape),)
    return mod.model, inputs


_CACHE: dict = {}


def _audit(name):
    """One probed audit per model (2 draws), shared by the tests below."""
    if name not in _CACHE:
        if name in EXAMPLES:
            model, inputs = _example(name)
        else:
            model, inputs = small_models()[name]
        report = gradaudit.audit(model, inputs, probe=True, draws=2)
        _CACHE[name] = (model, inputs, report)
    return _CACHE[name]


ALL = list(EXAMPLES) + list(small_models())


@pytest.mark.parametrize("name", ALL)
def test_measured_equals_independent_measurement(name):
    model, inputs, report = _audit(name)
    layers = [layer for layer in report.layers if layer.measured is not None]
    assert len(layers) == len(report.layers) > 0
    oracle = hook_measure(model, inputs, [layer.module for layer in layers], SEED, draws=2)
    for layer, (act, grad) in zip(layers, oracle):
        assert layer.measured.act_rms == pytest.approx(act, rel=0.01), layer.node
        assert layer.measured.grad_rms == pytest.approx(grad, rel=0.01), layer.node


@pytest.mark.parametrize("name", ALL)
def test_prediction_agrees_within_2x_on_90_percent_of_layers(name):
    _, _, report = _audit(name)
    rows = report.probe["agreement"]
    within = [r for r in rows if r["within_2x"]]
    assert len(within) / len(rows) >= 0.9, [
        (r["node"], r["act_log10_error"], r["grad_log10_error"]) for r in rows if not r["within_2x"]
    ]
    assert report.probe["agreement_summary"]["fraction_within_2x"] == pytest.approx(len(within) / len(rows))


def test_layer_output_that_is_a_view_changed_in_place():
    """nn.Linear on an input of more than two dimensions returns its product reshaped, a
    view; ReLU(inplace=True) after it rewrites the view's autograd history, and a hook on
    the view never fires (the layer's gradient was measured as nan). The probe's
    measurement equals autograd's on the same weights with an out-of-place ReLU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 4))
    inputs = (torch.randn(2, 5, 8),)
    report = gradaudit.audit(model, inputs, probe=True, draws=2)
    twin = torch.nn.Sequential(model[0], torch.nn.ReLU(), model[2])
    oracle = hook_measure(twin, inputs, [layer.module for layer in report.layers], SEED, draws=2)
    assert [layer.module for layer in report.layers] == ["0", "2"]
    for layer, (act, grad) in zip(report.layers, oracle):
        assert layer.measured.act_rms == pytest.approx(act, rel=0.01), layer.node
        assert layer.measured.grad_rms == pytest.approx(grad, rel=0.01), layer.node


@pytest.mark.parametrize("name", ["relu_he_30", "conv_bn_dropout"])
def test_weight_gradient_rms_and_ratio_match_autograd(name):
    model, inputs, report = _audit(name)
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {id(p): 0.0 for p in params}
    for d in range(2):
        torch.manual_seed(SEED + d)
        gen = torch.Generator().manual_seed(SEED + d)
        xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
        y = model(*xs)
        g = torch.randn(y.shape, generator=gen)
        for p, gp in zip(params, torch.autograd.grad(y, params, g)):
            sums[id(p)] += float(gp.double().pow(2).sum())
    modules = dict(model.named_modules())
    for layer in report.layers:
        ps = [p for p in modules[layer.module].parameters() if p.requires_grad]
        sq = sum(sums[id(p)] for p in ps) / 2
        n = sum(p.numel() for p in ps)
        w = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps))
        assert layer.extra["measured_weight_grad_rms"] == pytest.approx(math.sqrt(sq / n), rel=1e-3)
        assert layer.extra["measured_grad_weight_ratio"] == pytest.approx(math.sqrt(sq) / w, rel=1e-3)


def test_total_grad_norm_and_clip_line():
    model, inputs, report = _audit("relu_he_30")
    norms = []
    for d in range(2):
        torch.manual_seed(SEED + d)
        gen = torch.Generator().manual_seed(SEED + d)
        x = inputs[0].clone().requires_grad_(True)
        y = model(x)
        grads = torch.autograd.grad(y, list(model.parameters()), torch.randn(y.shape, generator=gen))
        norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
    mean = sum(norms) / 2
    assert report.probe["total_grad_norm"] == pytest.approx(mean, rel=1e-4)
    (clip,) = [f for f in report.findings if f.rule == "GA606"]
    assert clip.severity == "info"
    assert clip.data["relative"] is True and shows(clip.message, "measured global gradient norm {} of", mean)
    assert clip.data["total_grad_norm"] == pytest.approx(mean, rel=1e-4)
    assert clip.data["low"] == pytest.approx(0.5 * mean, rel=1e-4)
    assert clip.data["high"] == pytest.approx(10 * mean, rel=1e-4)


def test_resnet18_probe_and_gradcheck_is_healthy():
    model, inputs = _example("resnet18")
    report = gradaudit.audit(model, inputs, probe=True, gradcheck=True, draws=1)
    assert report.verdict == "healthy", [(f.rule, f.message) for f in report.findings]
    assert not [f for f in report.findings if f.category == "gradcheck"]
    (whole,) = [g for g in report.gradcheck if g["kind"] == "whole-model directional"]
    assert whole["grade"] in ("correct", "acceptable")


def test_report_json_carries_measured_block():
    _, _, report = _audit("tied_tuple_output")
    data = report.to_json()
    assert data["probe"]["draws"] == 2 and data["probe"]["device"] == "cpu"
    assert data["environment"]["device"] == "cpu" and data["environment"]["dtype"] == "float32"
    for layer in data["layers"]:
        weight = layer["depth"] is not None
        assert set(layer["measured"]) == ({"act_rms", "grad_rms", "layer_grad"} if weight else {"act_rms", "grad_rms"})
        assert "grad_log10_error" in layer and "measured_weight_grad_rms" in layer


def test_without_probe_nothing_is_measured():
    model, inputs = small_models()["frozen_layernorm"]
    report = gradaudit.audit(model, inputs)
    assert report.probe is None and all(layer.measured is None for layer in report.layers)
    assert not [f for f in report.findings if f.rule.startswith(("GA6", "GA7"))]


@pytest.mark.parametrize(
    "options",
    [
        {"draws": 0, "probe": True},
        {"draws": "two", "probe": True},
        {"dtype": "fp8", "probe": True},
        {"device": "tpu", "probe": True},
        {"settings": gradaudit.api.Settings(extra={"dead_fraction": "high"}), "probe": True},
    ],
)
def test_bad_options_are_config_errors(options):
    model, inputs = small_models()["frozen_layernorm"]
    with pytest.raises(ConfigError):
        gradaudit.audit(model, inputs, **options)


def test_unknown_option_is_pythons_type_error():
    model, inputs = small_models()["frozen_layernorm"]
    with pytest.raises(TypeError, match="probe_draws"):
        gradaudit.audit(model, inputs, probe_draws=3)


def test_inputs_path_pt_replaces_example_inputs(tmp_path):
    model, _ = small_models()["frozen_layernorm"]
    batch = torch.randn(7, 12) * 3 + 1
    path = tmp_path / "batch.pt"
    torch.save({"x": batch}, path)
    report = gradaudit.audit(model, torch.randn(2, 12), probe=True, inputs_path=str(path), draws=1)
    assert report.input_source == f"file:{path}"
    assert report.inputs[0]["shape"] == [7, 12]
    (first,) = [layer for layer in report.layers if layer.module == "a"]
    with torch.no_grad():
        expected = float(model.a(batch).double().pow(2).mean().sqrt())
    assert first.measured.act_rms == pytest.approx(expected, rel=1e-4)


def test_inputs_path_safetensors(tmp_path):
    import safetensors.torch as safetensors
    model, _ = small_models()["frozen_layernorm"]
    batch = torch.randn(5, 12)
    path = tmp_path / "batch.safetensors"
    safetensors.save_file({"0": batch}, str(path))
    report = gradaudit.audit(model, None, probe=True, inputs_path=str(path), draws=1)
    assert report.inputs[0]["shape"] == [5, 12]


@pytest.mark.parametrize("content", [b"not a tensor file", None])
def test_inputs_path_errors_are_config_errors(tmp_path, content):
    model, inputs = small_models()["frozen_layernorm"]
    path = tmp_path / "batch.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError):
        gradaudit.audit(model, inputs, probe=True, inputs_path=str(path))


def test_cli_probe_flags(write, cli):
    path = write(
        "net.py",
        """
        import torch, torch.nn as nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        example_inputs = (torch.randn(4, 8),)
        """,
    )
    result = cli("check", path, "--probe", "--draws", "1", "--device", "cpu", "--gradcheck", "--format", "json")
    import json

    data = json.loads(result.stdout)
    assert data["probe"]["draws"] == 1
    assert all(layer["measured"] for layer in data["layers"])
    assert data["gradcheck"][-1]["kind"] == "whole-model directional"


class _MaskedFrames(nn.Module):
    """Wav2Vec2's feature projection and time masking: a Linear on (batch, frames,
    features), a dropout of p = 0 (which returns its input), then masked frames written
    into that same tensor in place. ``aliased=False`` computes the same values on a copy.
    The data-dependent branch keeps fx out: the probe runs the model's own forward."""

    def __init__(self, aliased: bool) -> None:
        super().__init__()
        self.aliased = aliased
        self.proj = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.0)
        self.fill = nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.drop(self.proj(x)) if self.aliased else self.proj(x).clone()
        if x.sum() > -1e9:
            h[:, ::3] = self.fill
        return self.head(torch.tanh(h))


def test_a_layer_output_written_in_place_is_measured():
    """The probe's gradient of 'proj' equals the gradient of the same values computed on
    a copy (measured by module hooks and autograd): a hook on the view the Linear
    returns would never fire once the model writes into it."""
    torch.manual_seed(0)
    model = _MaskedFrames(aliased=True)
    twin = _MaskedFrames(aliased=False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 12, 8)
    report = gradaudit.audit(model, (x,), probe=True, draws=2)
    assert report.frontend != "fx"
    measured = {layer.module: layer.measured for layer in report.layers}
    (act, grad), _ = hook_measure(twin, (x,), ["proj", "head"], SEED, draws=2)
    assert measured["proj"].act_rms == pytest.approx(act, rel=0.01)
    assert measured["proj"].grad_rms == pytest.approx(grad, rel=0.01)
    assert 0 < measured["proj"].grad_rms
