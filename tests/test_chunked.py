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


def test_moments_of_an_empty_tensor_are_zero():
    assert chunked.moments(torch.empty(0, 7)) == (0.0, 0.0) == chunked.moments(torch.empty(0))


@pytest.mark.parametrize("view", ["transpose", "permute", "slice"])
def test_moments_of_a_view_read_it_in_memory_order(monkeypatch, view):
    """A permuted view of a weight (a mixture of experts reads its (E, out, in) parameter
    as (E, in, out)) is read in place, without a copy of it; a view that no
    permutation makes contiguous (a slice with gaps) still gets its right moments."""
    monkeypatch.setattr(chunked, "BLOCK", 64)
    base = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(4)) * 2 + 0.5
    value = {"transpose": base.transpose(1, 2), "permute": base.permute(2, 0, 1), "slice": base[:, ::2]}[view]
    ordered = chunked.in_memory_order(value)
    if view == "slice":
        assert ordered is value
    else:
        assert ordered.is_contiguous() and ordered.data_ptr() == base.data_ptr() and ordered.shape == base.shape
    mean, m2 = chunked.moments(value)
    assert mean == pytest.approx(float(value.double().mean()), rel=1e-12)
    assert m2 == pytest.approx(float(value.double().pow(2).mean()), rel=1e-12)


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


def _reuse_instance(monkeypatch, rows=300, cols=200, seed=5):
    monkeypatch.setattr(chunked, "BLOCK", 1000)  # several blocks of rows
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    return weight, chunked.Reuse(weight), gen


def test_reused_forward_products_are_within_the_bound_or_exact(monkeypatch):
    """W @ mu and W^2 @ [v, s] from earlier products: per channel within TOLERANCE of the
    exact products when the bound allows; a new input with a pattern of its own (random
    per-channel variances) fails the bound and gets the exact product."""
    weight, reuse, gen = _reuse_instance(monkeypatch)
    w = weight.double()
    cols = w.shape[1]
    base = [torch.rand(cols, generator=gen, dtype=torch.float64) for _ in range(2)]
    mus = [torch.randn(cols, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(2)]

    def exact(mu, columns):
        return w @ mu, (w * w) @ columns

    # two exact passes teach the span of {1, base[0], base[1]} and of the two means
    for b, mu in zip(base, mus):
        v = 1.0 + 0.1 * b
        columns = torch.stack([v, 0.3 * v], 1)
        assert reuse.forward(mu, columns) is None  # nothing known yet beyond 1
        reuse.learn_forward(mu, columns, *exact(mu, columns))
    assert reuse.exact == 2
    # an input in that span (plus a part below the bound): reused, within the tolerance
    v = 2.0 + 0.3 * base[0] - 0.2 * base[1] + 1e-7 * torch.rand(cols, generator=gen, dtype=torch.float64)
    mu = 0.5 * mus[0] + 2.0 * mus[1]
    columns = torch.stack([v, 0.5 * v], 1)
    found = reuse.forward(mu, columns)
    assert found is not None and reuse.reused == 1
    mean, sq = exact(mu, columns)
    assert ((found[1] - sq).abs() <= chunked.TOLERANCE * sq[:, :1]).all()
    assert ((found[0] - mean).abs() <= chunked.TOLERANCE * sq[:, 0].sqrt()).all()
    torch.testing.assert_close(found[1], sq, rtol=1e-5, atol=0)  # much closer than the bound in fact
    # a non-flat input with a pattern of its own: the bound fails, the caller runs the pass
    wild = torch.rand(cols, generator=gen, dtype=torch.float64) * 3.0
    assert reuse.forward(mu, torch.stack([wild, 0.5 * wild], 1)) is None
    # through the handler's path: the exact product, then kept
    plain = chunked.Chunked(weight, False, reuse=reuse)
    got = chunked.reused_products(plain, mu, torch.stack([wild, 0.5 * wild], 1))
    want = exact(mu, torch.stack([wild, 0.5 * wild], 1))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-15)
    assert reuse.exact == 3
    # ... and that input is now known: the same input again costs no pass
    again = chunked.reused_products(plain, mu, torch.stack([wild, 0.5 * wild], 1))
    assert reuse.exact == 3 and reuse.reused == 2
    assert ((again[1] - want[1]).abs() <= chunked.TOLERANCE * want[1][:, :1]).all()


def test_reused_backward_products_are_within_the_bound_or_exact(monkeypatch):
    """(W^2)^T @ [g, s, x] through the transposed view: reused within TOLERANCE of the
    exact product (relative to the gradient power's) when the bound allows, exact when not."""
    weight, reuse, gen = _reuse_instance(monkeypatch, seed=6)
    a = weight.double() ** 2
    view = chunked.Chunked(weight, True, reuse=reuse).t()
    rows = weight.shape[0]
    base = torch.rand(rows, generator=gen, dtype=torch.float64)
    first = torch.stack([1.0 + 0.2 * base, 0.1 * base, 0.05 * (1.0 + base)], 1)
    torch.testing.assert_close(view @ first, a.t() @ first, rtol=1e-12, atol=1e-15)
    assert (reuse.exact, reuse.reused) == (1, 0)
    second = torch.stack([3.0 - 0.5 * base, 0.2 * base, torch.full((rows,), 0.1, dtype=torch.float64)], 1)
    got = view @ second
    assert (reuse.exact, reuse.reused) == (1, 1)
    want = a.t() @ second
    assert ((got - want).abs() <= chunked.TOLERANCE * want[:, :1]).all()
    vector = 2.0 + base  # one vector (no coherent parts) in the same span
    torch.testing.assert_close(view @ vector, a.t() @ vector, rtol=1e-6, atol=0)
    assert reuse.reused == 2
    wild = torch.rand(rows, generator=gen, dtype=torch.float64) ** 4  # a pattern of its own
    torch.testing.assert_close(view @ wild, a.t() @ wild, rtol=1e-12, atol=1e-15)
    assert reuse.exact == 2
    # the plain (not squared) views never reuse: they are exact
    plain = chunked.Chunked(weight, False, reuse=reuse)
    torch.testing.assert_close(plain.t() @ vector, weight.double().t() @ vector, rtol=1e-12, atol=1e-15)


def test_the_bound_holds_on_random_instances(monkeypatch):
    """Whatever the input, a reused product is within its stated bound of the exact one:
    many random inputs, partly in the learnt span, partly not."""
    weight, reuse, gen = _reuse_instance(monkeypatch, rows=120, cols=90, seed=7)
    w = weight.double()
    basis = torch.rand(90, 3, generator=gen, dtype=torch.float64)
    for b in basis.t():
        reuse.learn_forward(b * 0, b[:, None], w @ (b * 0), (w * w) @ b[:, None])
    reused = 0
    for k in range(200):
        noise = 10.0 ** -(k % 8) * torch.rand(90, generator=gen, dtype=torch.float64)
        v = basis @ torch.rand(3, generator=gen, dtype=torch.float64) + 1.0 + noise
        found = reuse.forward(torch.zeros(90, dtype=torch.float64), v[:, None])
        exact = (w * w) @ v
        if found is not None:
            reused += 1
            assert ((found[1][:, 0] - exact).abs() <= chunked.TOLERANCE * exact).all()
    assert 0 < reused < 200


class _SharedNormed(torch.nn.Module):
    """A pre-norm residual stack whose blocks all read one weight pair (as a meta model's
    stand-in's decoder layers do)."""

    def __init__(self, width=128, hidden=384, depth=16):
        super().__init__()
        gen = torch.Generator().manual_seed(8)
        self.up = torch.nn.Parameter(torch.randn(hidden, width, generator=gen) * width**-0.5)
        self.down = torch.nn.Parameter(torch.randn(width, hidden, generator=gen) * hidden**-0.5)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(width) for _ in range(depth))

    def forward(self, x):
        for norm in self.norms:
            x = x + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(norm(x), self.up)), self.down)
        return x


def test_an_analysis_with_shared_weights_is_the_same_with_reused_products(monkeypatch):
    """A deep stack of blocks sharing one weight pair: with every linear layer chunked,
    products are reused (or fixed up channel by channel) for many layers, and every
    layer's activation and gradient RMS stay within the tolerance of the analysis that
    makes every pass."""
    from gradaudit.propagation import engine

    model = _SharedNormed()
    inputs = torch.randn(4, 10, 128, generator=torch.Generator().manual_seed(9))
    graph = capture(model, inputs)
    monkeypatch.setattr(chunked, "CHUNKED_ABOVE", 1)
    monkeypatch.setattr(chunked, "BLOCK", 1000)
    made = []
    init = engine.Engine.__init__
    monkeypatch.setattr(engine.Engine, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    fast = analyse(graph, inputs, None, Settings())
    reuses = list(made[-1]._reuse.values())
    monkeypatch.setattr(engine.Engine, "reuse", lambda self, weight: None)
    slow = analyse(graph, inputs, None, Settings())
    assert len(reuses) == 2 and all(r.reused >= 10 for r in reuses), [(r.exact, r.reused) for r in reuses]
    layers = slow.layers()
    assert sum(n.op == "linear" for n in layers) == 32
    for node in layers:
        a, b = slow.stat(node.name), fast.stat(node.name)
        assert b.act_rms == pytest.approx(a.act_rms, rel=chunked.TOLERANCE), node.name
        assert b.grad_rms == pytest.approx(a.grad_rms, rel=chunked.TOLERANCE), node.name


def test_a_weights_first_products_and_its_sums_come_from_one_pass(monkeypatch):
    """The first product of a big weight reads it once for the products and the sums the
    later products are bounded with: the same numbers, bitwise, as a pass for each."""
    weight, reuse, gen = _reuse_instance(monkeypatch)
    mu = torch.randn(weight.shape[1], generator=gen, dtype=torch.float64)
    columns = torch.rand(weight.shape[1], 2, generator=gen, dtype=torch.float64)
    separate = chunked.Reuse(weight)
    want_sums = separate.sums()
    want = chunked.products(weight, mu, columns)
    passes = []
    real = chunked.each_stripe
    monkeypatch.setattr(chunked, "each_stripe", lambda w, *a: passes.append(w) or real(w, *a))
    got = chunked.reused_products(chunked.Chunked(weight, False, reuse=reuse), mu, columns)
    assert len(passes) == 1 and reuse.exact == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want_sums.keys() == reuse.sums().keys() and len(passes) == 1
    for key, value in want_sums.items():
        assert torch.equal(reuse.sums()[key], value), key


def _passes(weight, gen):
    """Every kind of pass over a chunked weight, on one instance."""
    vector = torch.randn(weight.shape[1], generator=gen, dtype=torch.float64)
    columns = torch.rand(weight.shape[1], 2, generator=gen, dtype=torch.float64)
    grads = torch.rand(weight.shape[0], 3, generator=gen, dtype=torch.float64)
    reuse = chunked.Reuse(weight)
    first = reuse.first(vector, columns)
    return [*first, *reuse.sums().values(), *chunked.products(weight, vector, columns),
            chunked.Chunked(weight, True).t() @ grads, chunked.Chunked(weight, False).t() @ grads[:, 0],
            *chunked.column_moments(weight), torch.tensor(chunked.moments(weight))]


@pytest.mark.parametrize("workers", [2, 3])
def test_passes_give_the_same_bits_on_any_number_of_threads(monkeypatch, workers):
    """A pass runs its stripes of rows on the caller's threads (gradaudit.serial.each);
    the row products and the sums over rows are the same bits as on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from gradaudit import serial

    monkeypatch.setattr(chunked, "BLOCK", 200)  # 4 rows of 50 per block: 25 blocks in 16 stripes
    weight = torch.randn(97, 50, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with serial.serial():
            one = _passes(weight, torch.Generator().manual_seed(3))
        torch.set_num_threads(workers)
        pools = []
        monkeypatch.setattr("concurrent.futures.ThreadPoolExecutor",
                            lambda n, **kw: pools.append(n) or ThreadPoolExecutor(n, **kw))
        with serial.serial():
            assert serial.workers() == workers and torch.get_num_threads() == 1
            many = _passes(weight, torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(before)
    assert len(one) == len(many) == 15
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    assert pools == [workers] and serial.workers() == 1  # one pool of the caller's threads, gone after
    # and they are the products: against the whole float64 matrix
    w = weight.double()
    torch.testing.assert_close(many[0], w @ torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
