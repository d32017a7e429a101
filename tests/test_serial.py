"""The static pass runs on one intra-op thread and gives the thread count back, and
channels that share one law share quadrature nodes without changing any prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradaudit.api import Settings, analyse, capture
from gradaudit.propagation import engine
from gradaudit.serial import serial


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_serial_restores_the_thread_count(threads):
    with serial():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError):
        with serial():
            1 / 0
    assert torch.get_num_threads() == 2


def test_fewer_collections_restores_the_thresholds():
    import gc

    from gradaudit.serial import GEN0_THRESHOLD, fewer_collections

    before = gc.get_threshold()
    gc.set_threshold(500, 7, 9)
    try:
        with fewer_collections():
            assert gc.get_threshold() == (GEN0_THRESHOLD, 7, 9)
        with pytest.raises(ZeroDivisionError):
            with serial():
                assert gc.get_threshold()[0] == GEN0_THRESHOLD
                1 / 0
        assert gc.get_threshold() == (500, 7, 9)
        import gradaudit

        gradaudit.audit(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(3, 4),))
        assert gc.get_threshold() == (500, 7, 9) and gc.isenabled()
    finally:
        gc.set_threshold(*before)


def test_audit_leaves_the_thread_count(threads):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    import gradaudit

    gradaudit.audit(model, (torch.randn(2, 3, 8, 8),))
    assert torch.get_num_threads() == 2


def _predictions(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    inputs = (x,)
    analysis = analyse(capture(model, inputs), inputs, None, Settings())
    out = {}
    for node in analysis.graph:
        s = analysis.stat(node.name)
        if s is not None and s.has_channels:
            out[node.name] = (s.ch_m2.clone(), None if s.ch_g2 is None else s.ch_g2.clone())
    return out


def _models():
    torch.manual_seed(0)
    # default BatchNorm affine: every channel has the same law after the norm
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.SiLU())
    # a per-channel PReLU after the ReLU: its channels differ although the inputs' laws agree
    prelu = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.PReLU(16), nn.Conv2d(16, 4, 3))
    with torch.no_grad():
        prelu[3].weight.uniform_(-2.0, 2.0)
    return {"bn-relu-silu": plain, "bn-relu-prelu": prelu}


@pytest.mark.parametrize("name", list(_models()))
def test_shared_laws_change_no_prediction(name, monkeypatch):
    """Every channel's second moment and gradient moment agree with the pass that
    evaluates each channel on its own nodes (DISTINCT_TOL = 0): laws merged when their
    standard deviations agree to 1e-4 of the RMS move a moment by under 1e-3."""
    model = _models()[name]
    x = torch.randn(2, 3, 8, 8)
    shared = _predictions(model, x)
    monkeypatch.setattr(engine, "DISTINCT_TOL", 0.0)
    alone = _predictions(model, x)
    assert shared.keys() == alone.keys() and shared
    for node, (m2, g2) in shared.items():
        torch.testing.assert_close(m2, alone[node][0], rtol=1e-3, atol=0.0, msg=lambda m: f"{node} act: {m}")
        if g2 is not None:
            torch.testing.assert_close(g2, alone[node][1], rtol=1e-3, atol=1e-30, msg=lambda m: f"{node} grad: {m}")


def test_wide_layers_share_coarser_laws_and_keep_their_averages(monkeypatch):
    """Past WIDE_CHANNELS channels laws merge at DISTINCT_TOL_WIDE of the RMS: each
    channel's moments stay within a few times that of its own-nodes pass (DISTINCT_TOL =
    0), and a layer's average, which the report reads, within 1e-5 (second order)."""
    torch.manual_seed(0)
    width = engine.WIDE_CHANNELS * 2
    model = nn.Sequential(nn.Linear(4096, width, bias=False), nn.SiLU(), nn.Linear(width, width, bias=False), nn.GELU(),
                          nn.Linear(width, 8))
    z = torch.randn(8, 4096)
    x = torch.cat([z, -z])  # zero-mean features: the first layer's channels differ in variance only
    shared = _predictions(model, x)
    monkeypatch.setattr(engine, "DISTINCT_TOL", 0.0)
    alone = _predictions(model, x)
    moved = 0.0
    for node, pair in shared.items():
        for got, want in zip(pair, alone[node]):
            if got is None:
                continue
            moved = max(moved, float(((got - want).abs() / want.abs()).max()))
            torch.testing.assert_close(got, want, rtol=3 * engine.DISTINCT_TOL_WIDE, atol=0.0,
                                       msg=lambda m: f"{node}: {m}")
            assert abs(float(got.mean() / want.mean()) - 1.0) < 1e-5, node
    assert moved > engine.DISTINCT_TOL  # the coarser cells were used
