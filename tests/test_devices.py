"""--device cpu|cuda|auto for the probe and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.errors import ConfigError
from gradaudit.probe.device import resolve_device
from gradaudit.state import fingerprint, rng_fingerprint
from probe_models import hook_measure

pytestmark = pytest.mark.oldest

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_auto_picks_cuda_exactly_when_available():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "cuda:x"])
def test_unknown_devices_are_config_errors(bad):
    with pytest.raises(ConfigError):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        gradaudit.audit(_model(), (torch.randn(4, 8),), probe=True, device="cuda")


def test_cpu_probe_records_device():
    report = gradaudit.audit(_model(), (torch.randn(4, 8),), probe=True, device="cpu", draws=1)
    assert report.environment["device"] == "cpu" and report.probe["device"] == "cpu"


@cuda
def test_cuda_probe_matches_cpu_measurement_and_restores_model():
    model = _model()
    x = torch.randn(32, 8)
    before = fingerprint(model)
    rng = rng_fingerprint()
    report = gradaudit.audit(model, (x,), probe=True, device="cuda", draws=2)
    assert report.environment["device"] == "cuda"
    assert fingerprint(model) == before and rng_fingerprint() == rng
    assert next(model.parameters()).device.type == "cpu"
    layers = [layer for layer in report.layers if layer.measured is not None]
    oracle = hook_measure(model.cuda(), (x.cuda(),), [layer.module for layer in layers], 20130617, draws=2)
    model.cpu()
    for layer, (act, grad) in zip(layers, oracle):
        assert layer.measured.act_rms == pytest.approx(act, rel=0.01)
        assert layer.measured.grad_rms == pytest.approx(grad, rel=0.01)


@cuda
def test_cuda_gradcheck_and_fp16_run():
    model = _model()
    report = gradaudit.audit(model, (torch.randn(8, 8),), probe=True, gradcheck=True, device="cuda", dtype="fp16")
    assert report.gradcheck[-1]["grade"] in ("correct", "acceptable")
    assert report.probe["dtype"] == "fp16"
