"""Weights too big to copy (gradaudit/propagation/ops/chunked.py): the products formed
block by block equal those of the whole float64 matrix, and a whole analysis does not
change when every Linear layer takes that path."""

from __future__ import annotations

import os
import runpy

import pytest
import torch

from gradaudit.api import Settings, analyse, capture
from gradaudit.propagation.ops import chunked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("columns", [None, 3])
def test_products_equal_the_whole_matrix(monkeypatch, squared, transposed, columns):
    monkeypatch.setattr(chunked, "BLOCK", 100)  # blocks of 2 rows of 50: many blocks
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 50, generator=gen)
    lazy = chunked.Chunked(weight, squared)
    whole = weight.double() ** 2 if squared else weight.double()
    if transposed:
        lazy, whole = lazy.t(), whole.t()
    other = torch.randn(whole.shape[1], *(() if columns is None else (columns,)), generator=gen, dtype=torch.float64)
    assert lazy.shape == whole.shape and lazy.dtype == torch.float64
    torch.testing.assert_close(lazy @ other, whole @ other, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lazy.double(), whole, rtol=0, atol=0)


def test_column_moments(monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK", 64)
    weight = torch.randn(101, 16, generator=torch.Generator().manual_seed(1))
    mean, m2 = chunked.column_moments(weight)
    torch.testing.assert_close(mean, weight.double().mean(0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(m2, weight.double().pow(2).mean(0), rtol=1e-12, atol=1e-15)


def test_an_analysis_is_the_same_with_every_linear_layer_chunked(monkeypatch):
    ns = runpy.run_path(os.path.join(ROOT, "examples", "transformer_preln.py"))
    torch.manual_seed(0)
    model, inputs = ns["PreLNEncoder"](), ns["example_inputs"]
    graph = capture(model, inputs)
    plain = analyse(graph, inputs, None, Settings())
    monkeypatch.setattr(chunked, "CHUNKED_ABOVE", 1)
    monkeypatch.setattr(chunked, "BLOCK", 1000)
    lazy = analyse(graph, inputs, None, Settings())
    layers = plain.layers()
    assert any(n.op == "linear" for n in layers)
    for node in layers:
        a, b = plain.stat(node.name), lazy.stat(node.name)
        assert a.act_rms == pytest.approx(b.act_rms, rel=1e-9), node.name
        assert a.grad_rms == pytest.approx(b.grad_rms, rel=1e-9), node.name


@pytest.mark.parametrize("shape", [(37, 50), (3, 4, 5, 6), (11,)])
def test_moments_of_all_entries(monkeypatch, shape):
    monkeypatch.setattr(chunked, "BLOCK", 64)
    value = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3 + 1
    mean, m2 = chunked.moments(value)
    assert mean == pytest.approx(float(value.double().mean()), rel=1e-12)
    assert m2 == pytest.approx(float(value.double().pow(2).mean()), rel=1e-12)
    value.view(-1)[-1] = float("inf")
    assert chunked.moments(value) is None
    value.view(-1)[-1] = float("nan")
    assert chunked.moments(value) is None


class _Tied(torch.nn.Module):
    """Three layers that read one weight (as the stand-in's decoder layers do)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        for w in self.weight:
            x = torch.relu(torch.nn.functional.linear(x, w))
        return x


def test_a_weight_read_by_several_layers_is_read_once(monkeypatch):
    """Layers sharing one weight tensor cost one pass over it, with the statistics that
    separate copies of the same values get."""
    base = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    shared, separate = _Tied([base] * 3), _Tied([base.clone() for _ in range(3)])
    shared.weight, separate.weight = torch.nn.ParameterList(shared.weight), torch.nn.ParameterList(separate.weight)
    inputs = torch.randn(4, 8)
    calls = []
    real = chunked.moments
    monkeypatch.setattr(chunked, "moments", lambda v: calls.append(v.data_ptr()) or real(v))
    results = []
    for model in (shared, separate):
        calls.clear()
        graph = capture(model, inputs)
        results.append(analyse(graph, inputs, None, Settings()))
        distinct = {p.data_ptr() for p in model.parameters()}
        assert sorted(set(calls)) == sorted(distinct) and len(calls) == len(distinct)
    a, b = results
    assert len(a.layers()) == len(b.layers()) == 3
    for x, y in zip(a.layers(), b.layers()):
        assert a.stat(x.name).act_rms == b.stat(y.name).act_rms
        assert a.stat(x.name).grad_rms == b.stat(y.name).grad_rms


def test_products_in_one_pass(monkeypatch):
    """W @ v and W^2 @ C from one pass over the blocks equal the whole matrix's products;
    the two views of one weight pair up, other combinations do not."""
    monkeypatch.setattr(chunked, "BLOCK", 100)
    monkeypatch.setattr(chunked, "CHUNKED_ABOVE", 1)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(37, 50, generator=gen)
    w, w2 = chunked.weights(weight.clone().requires_grad_(True))
    assert chunked.pair(w, w2) and not chunked.pair(w2, w) and not chunked.pair(w.t(), w2.t())
    assert not chunked.pair(w, chunked.Chunked(weight.clone(), True))
    v = torch.randn(50, generator=gen, dtype=torch.float64)
    cols = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    plain, squared = chunked.products(w.weight, v, cols)
    torch.testing.assert_close(plain, weight.double() @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(squared, weight.double().pow(2) @ cols, rtol=1e-12, atol=1e-12)
