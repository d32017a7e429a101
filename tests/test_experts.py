"""A mixture of experts as transformers writes it (Mixtral: expert weights stacked in
3-d parameters, one grouped matmul per projection): every expert parameter is a weight
layer of the audit, and the predicted statistics agree with real autograd (module
outputs measured by forward hooks, parameter gradients by ``backward``)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measure_modules  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.api import Settings, analyse, capture  # noqa: E402
from gradaudit.propagation.depth import shared_positions  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixtral(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=1000, num_local_experts=8, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg), {"input_ids": torch.randint(0, 1000, (2, 64))}


def _within(pred: float, meas: float, factor: float) -> bool:
    return pred > 0 and meas > 0 and abs(math.log10(pred / meas)) <= math.log10(factor)


def test_every_expert_parameter_is_a_weight_layer():
    """Both stacked expert weights of every block get statistics (they hold most of the
    model's parameters: without them the coverage check would pass a model it never
    looked into)."""
    model, inputs = _mixtral()
    report = gradaudit.audit(model, inputs)
    assert report.complete, report.coverage.sentence()
    graph = capture(model, inputs)
    analysis = analyse(graph, inputs, None, Settings())
    read = {q for n in analysis.weight_layers() for q in n.params if q.startswith("from:")}
    experts = {f"from:{q}" for q, p in model.named_parameters() if p.dim() == 3}
    assert len(experts) == 4 and experts <= read, sorted(experts - read)


def test_experts_agree_with_autograd():
    """The experts module's output and the gradient reaching it within 1.25x, and each
    stacked expert weight's gradient within 1.3x of sqrt(rows per expert) x RMS(input) x
    RMS(dL/d(output)) (rows spread evenly over the experts, the routing the propagation
    assumes), measured over 4 draws of the tokens and of the cotangent."""
    model, inputs = _mixtral()
    graph = capture(model, inputs)
    analysis = analyse(graph, inputs, None, Settings())
    measured = measure_modules(model, inputs, draws=4)
    grouped = [n for n in analysis.weight_layers() if n.op == "grouped_mm"]
    assert len(grouped) == 4
    rows = []
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.experts"
        out = [n for n in graph.nodes if n.module == name and n.op != "param"][-1]
        s, (act, grad) = analysis.stat(out.name), measured[(name, 0)]
        rows.append((name, s.act_rms, act, s.grad_rms, grad))
        assert _within(s.act_rms, act, 1.25) and _within(s.grad_rms, grad, 1.25), rows[-1]
    # the parameters' gradients, by real autograd over the same draws' sizes
    squares: dict[str, float] = {}
    for d in range(4):
        model.zero_grad()
        ids = torch.randint(0, 1000, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(d))
        logits = model(input_ids=ids).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(50 + d))).sum().backward()
        for q, p in model.named_parameters():
            if p.dim() == 3:
                squares[q] = squares.get(q, 0.0) + float(p.grad.double().pow(2).mean()) / 4
    model.zero_grad()
    for node in grouped:
        (source,) = [q[len("from:"):] for q in node.params if q.startswith("from:")]
        x = analysis.stat(node.args[0].name)
        predicted = math.sqrt(shared_positions(node)) * x.act_rms * analysis.stat(node.name).grad_rms
        rows.append((source, predicted, math.sqrt(squares[source])))
        assert _within(predicted, math.sqrt(squares[source]), 1.3), rows[-1]
    print("\n".join(map(str, rows)))


def test_an_op_whose_estimate_needs_the_routing_is_a_gap(monkeypatch):
    """Without a handler, the grouped product would be run alone on sampled inputs, its
    offsets (computed from the routing at run time) as zeros: every row lands nowhere
    and the output is all zero. That is no estimate: the audit says which op and why,
    and does not call the model healthy."""
    from gradaudit.propagation.ops.base import HANDLERS

    for op in ("grouped_mm", "grouped_mm_fallback", "_grouped_mm"):
        monkeypatch.delitem(HANDLERS, op)
    model, inputs = _mixtral()
    report = gradaudit.audit(model, inputs)
    assert not report.complete and report.verdict == "incomplete"
    gap = report.coverage.gaps[0]
    assert gap.op == "grouped_mm" and "integer inputs the model computes" in gap.reason, gap.reason
    assert any("experts" in layer for layer in gap.layers)


class _Renormalised(torch.nn.Module):
    """A router's top-2 weights renormalised to sum to 1, as Mixtral's router does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.front = torch.nn.Linear(16, 8)
        with torch.no_grad():
            self.front.weight.mul_(4.0)

    def forward(self, x):
        v = torch.softmax(self.front(x), -1).topk(2, -1)[0]
        return v / v.sum(-1, keepdim=True)


def test_a_sampled_op_reads_an_input_made_from_another_as_made():
    """``v / v.sum(-1, keepdim=True)`` has no handler: it is run on samples. Its second
    input is a function of its first; sampled apart, the backward loses what the two
    paths cancel (the gradient along v) and the gradient reaching v came out 2.7x the
    measured one. Computed from v's sample, it is within 20%."""
    from measure import measure_moments

    from gradaudit.frontends.fx import trace
    from gradaudit.propagation.engine import propagate

    model, x = _Renormalised(), torch.randn(256, 16)
    graph = trace(model, (x,))
    analysis = propagate(graph)
    measured = measure_moments(model, (x,), draws=8)
    (div,) = [n for n in graph if n.op == "div"]
    source = div.args[0].name  # the top-k values
    assert div.name in {e.node for e in analysis.estimates}
    predicted, real = analysis.stat(source).grad_rms, measured[source][1]
    assert _within(predicted, real, 1.2), (predicted, real)
