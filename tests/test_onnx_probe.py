"""The ONNX probe (finite differences through onnxruntime) against closed forms, and the
probe-stage findings and reports it feeds."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.probe import onnx as onnx_probe  # noqa: E402
from onnx_models import export, make_model, save, tensor  # noqa: E402
from probe_models import small_models  # noqa: E402

# they pass on the oldest supported torch too (no torchvision needed)
pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


def dense(tmp_path, n_in=16, n_out=40, batch=8, bias=0.0, act=None):
    """y = act(x W^T + b): the probe's quantities have closed forms (see the tests)."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["h" if act else "y"], transB=1)]
    if act:
        nodes.append(helper.make_node(act, ["h"], ["y"]))
    model = make_model(nodes, [("x", T.FLOAT, [batch, n_in])], [("y", T.FLOAT, [batch, n_out])],
                       [tensor("fc.weight", w), tensor("fc.bias", np.full(n_out, bias, np.float32))])
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(1))
    return save(model, tmp_path / "dense.onnx"), x, w


def test_linear_layer_closed_forms(tmp_path):
    """For y = W x + b read directly as the output, L = <y, g>: dL/dy = g, so E_g mean
    (dL/dy)^2 = 1 (and a forward difference of a linear map is exact: every direction
    gives exactly ||v||^2 = 1); dL/dW = g x^T and dL/db = sum_b g_b, so E_g ||dL/dtheta||^2
    = n_out (||X||_F^2 + batch) over n_out (n_in + 1) parameters."""
    path, x, w = dense(tmp_path)
    report = gradaudit.audit(str(path), (x,), probe=True, draws=1)
    (layer,) = report.layers
    y = x.double().numpy() @ w.astype(np.float64).T
    assert math.isclose(layer.measured.act_rms, float(np.sqrt(np.mean(y * y))), rel_tol=1e-6)
    assert math.isclose(layer.measured.grad_rms, 1.0, rel_tol=1e-6)
    n_out, n_in = w.shape
    want = math.sqrt(n_out * (float(x.double().pow(2).sum()) + x.shape[0]) / (n_out * (n_in + 1)))
    got = layer.extra["measured_weight_grad_rms"]
    unc = layer.extra["weight_grad_rms_rel_uncertainty"]
    assert 0 < unc <= onnx_probe.TARGET
    assert math.isclose(got, want, rel_tol=max(4 * unc, 0.02)), (got, want, unc)
    assert report.probe["estimator"]["precision"] == "float64"


def test_deterministic(tmp_path):
    """The schedule counts operations instead of timing: two runs measure the same."""
    path, x, _ = dense(tmp_path, act="Tanh")
    a, b = (gradaudit.audit(str(path), (x,), probe=True).to_json() for _ in range(2))
    assert a["layers"] == b["layers"] and a["probe"]["estimator"] == b["probe"]["estimator"]


def test_budget_limits_directions(tmp_path, monkeypatch):
    """With no budget left after the first pass, every estimate keeps K_MIN directions."""
    model, (x,) = small_models()["conv_bn_dropout"]
    path = export(model, (x,), tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_probe, "BUDGET", 0.0)
    report = gradaudit.audit(str(path), (x,), probe=True, draws=2)
    detail = report.probe["estimator"]["layers"]
    assert {d["grad_directions"] for d in detail.values()} == {onnx_probe.K_MIN}
    assert {d["weight_grad_directions"] for d in detail.values()} == {onnx_probe.K_MIN}
    assert report.probe["estimator"]["runs"] == 2 + 2 * onnx_probe.K_MIN * len(detail)


def test_batch_norm_runs_on_batch_statistics(tmp_path):
    """A BatchNormalization stored in inference mode (running mean 0, variance 1 would
    leave x ~ N(3, 5^2) as it is, RMS ~5.8): the probe normalises each batch as training
    does, so with weight 1 and bias 0 the output has unit RMS."""
    c = 4
    nodes = [helper.make_node("BatchNormalization", ["x", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["y"])]
    model = make_model(nodes, [("x", T.FLOAT, [8, c, 5, 5])], [("y", T.FLOAT, [8, c, 5, 5])],
                       [tensor("bn.weight", np.ones(c, np.float32)), tensor("bn.bias", np.zeros(c, np.float32)),
                        tensor("bn.mean", np.zeros(c, np.float32)), tensor("bn.var", np.ones(c, np.float32))], opset=15)
    x = torch.randn(8, c, 5, 5, generator=torch.Generator().manual_seed(0)) * 5 + 3
    report = gradaudit.audit(str(save(model, tmp_path / "bn.onnx")), (x,), probe=True, draws=1)
    (bn,) = report.layers
    assert math.isclose(bn.measured.act_rms, math.sqrt(25 / (25 + 1e-5)), rel_tol=0.02)
    assert math.isclose(bn.measured.act_rms, bn.predicted.act_rms, rel_tol=0.02)


def test_training_export_batch_norm_output_is_normalised(tmp_path):
    model, (x,) = small_models()["conv_bn_dropout"]
    path = export(model, (x * 5 + 3,), tmp_path / "m.onnx")
    report = gradaudit.audit(str(path), (x * 5 + 3,), probe=True, draws=1)
    bn = next(layer for layer in report.layers if layer.op == "batch_norm")
    weight, bias = model.bn.weight.detach().double(), model.bn.bias.detach().double()
    # per channel: mean bias_c, variance weight_c^2 * v/(v + eps) -> E[y^2] = mean(w^2 + b^2)
    assert math.isclose(bn.measured.act_rms, float((weight**2 + bias**2).mean().sqrt()), rel_tol=1e-3)


def test_dead_units(tmp_path):
    path, x, _ = dense(tmp_path, bias=-50.0, act="Relu", batch=64)
    report = gradaudit.audit(str(path), (x,), probe=True)
    (dead,) = [f for f in report.findings if f.rule == "GA602"]
    assert "(40 of 40)" in dead.message


def test_saturated_units(tmp_path):
    path, x, _ = dense(tmp_path, bias=20.0, act="Sigmoid")
    report = gradaudit.audit(str(path), (x,), probe=True)
    assert [f.rule for f in report.findings if f.rule == "GA603"] == ["GA603"]


def test_non_finite_values_name_the_node(tmp_path):
    """log of a negative number: the first non-finite output is the Log node's."""
    nodes = [helper.make_node("Gemm", ["x", "fc.weight"], ["h"], transB=1),
             helper.make_node("Log", ["h"], ["l"], name="the_log"),
             helper.make_node("Gemm", ["l", "out.weight"], ["y"], transB=1)]
    model = make_model(nodes, [("x", T.FLOAT, [4, 3])], [("y", T.FLOAT, [4, 2])],
                       [tensor("fc.weight", -np.ones((5, 3), np.float32)), tensor("out.weight", np.ones((2, 5), np.float32))])
    x = torch.rand(4, 3) + 0.5
    report = gradaudit.audit(str(save(model, tmp_path / "m.onnx")), (x,), probe=True)
    (f,) = [f for f in report.findings if f.rule == "GA601"]
    assert f.node == "the_log" and "nan" in f.message
    assert report.probe["nonfinite"]["inputs"][0]["max"] < 0


@pytest.mark.parametrize("args, match", [
    (("--probe", "--dtype", "fp16"), "the ONNX probe runs the graph as stored"),
    (("--gradcheck",), "an ONNX graph has none"),
])
def test_options_the_onnx_probe_refuses(cli, tmp_path, args, match):
    path, _, _ = dense(tmp_path)
    result = cli("check", str(path), *args)
    assert result.exit_code == 2 and match in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("probe", [False, True], ids=["static", "probe"])
def test_html_report_has_the_torch_reports_sections(cli, tmp_path, probe):
    model, (x,) = small_models()["conv_bn_dropout"]
    path = export(model, (x,), tmp_path / "m.onnx")
    torch_html = gradaudit.audit(model, (x,), probe=probe)
    onnx_html = gradaudit.audit(str(path), (x,), probe=probe)
    from gradaudit.report import get_renderer

    html = get_renderer("html")
    sections = [re.findall(r'<section[^>]*id="([\w-]+)"', html.render(r)) for r in (torch_html, onnx_html)]
    assert sections[0] == sections[1] and "layers" in sections[0] and "depth" in sections[0]
    result = cli("check", str(path), "--format", "html", *(["--probe"] if probe else []))
    assert result.exit_code in (0, 1) and re.findall(r'<section[^>]*id="([\w-]+)"', result.stdout) == sections[1]
    assert ("measured" in result.stdout.lower()) == probe


def test_float64_probe_retypes_the_dynamo_exporters_value_info(tmp_path):
    """The dynamo exporter types its weights in value_info; the float64 probe retypes
    them with everything else (else onnxruntime refuses a LayerNormalization fed float64
    activations and float32 weights)."""
    from onnx_models import autograd_norms, by_call, dynamo_available, within

    if not dynamo_available():
        pytest.skip("needs onnxscript")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    x = (torch.randn(8, 16),)
    path = export(model, x, tmp_path / "dy.onnx", dynamo=True)
    assert any(v.name == "1.weight" for v in onnx.load(str(path)).graph.value_info)
    report = gradaudit.audit(str(path), x, probe=True, draws=2)
    oracle = autograd_norms(model, x, draws=256)
    for key, layer in by_call(report.layers).items():
        assert within(layer.measured.grad_rms, math.sqrt(oracle["grad"][key]), 0.2), key
