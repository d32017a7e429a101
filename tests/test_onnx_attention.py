"""Attention in ONNX files mapped onto the IR's fused attention nodes
(:mod:`gradaudit.frontends.onnx_attention`, :mod:`gradaudit.frontends.onnx_mha`).

Each form is a small model written as popular code writes attention, exported by both
torch exporters (the dynamo one where onnxscript is installed). For each:

- the fused node is in the captured graph, and no softmax is left;
- the captured graph, computed by its own callables, gives what onnxruntime computes
  for the file (a fusion that changed the function would show here);
- every layer's predicted act/grad RMS is within 10% of the torch.fx capture of the
  same model, which records the fused op for the same code.

Near misses (ONNX graphs built node by node) stay op by op.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.frontends import onnx as frontend, onnx_load  # noqa: E402
from onnx_models import (  # noqa: E402
    autograd_norms, by_call, dynamo_available, export, make_model, run_ir, run_ort, save, tensor, within,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "rules"))
pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

SEQ, WIDTH, HEADS = 8, 32, 4


class Block(nn.Module):
    """A Pre-LN attention block with separate q, k, v projections, the attention written
    one of the ways ``core`` names."""

    def __init__(self, core: str):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.core = core
        self.register_buffer("bias", torch.tril(torch.ones(SEQ, SEQ)).view(1, 1, SEQ, SEQ))

    def forward(self, x):
        b, t, c = x.shape
        h = self.ln(x)
        q, k, v = (p(h).view(b, t, HEADS, c // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = attend(self.core, q, k, v, self.bias[:, :, :t, :t])
        return x + self.o(y.transpose(1, 2).reshape(b, t, c))


def attend(core: str, q, k, v, tril):
    t, d = q.shape[-2], q.shape[-1]
    if core == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if core == "sdpa_scale":
        return F.scaled_dot_product_attention(q, k, v, scale=0.2)
    if core == "sdpa_causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if core == "sdpa_dropout":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    if core == "sdpa_bool_mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, t, dtype=torch.bool).tril())
    if core == "sdpa_additive_mask":
        mask = torch.zeros(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    att = q @ k.transpose(-2, -1)
    att = att * (1.0 / math.sqrt(d)) if core == "causal_mul" else att / math.sqrt(d)
    att = att.masked_fill(tril == 0, float("-inf"))  # nanoGPT
    return F.softmax(att, dim=-1) @ v


class Net(nn.Module):
    def __init__(self, core: str, blocks: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*(Block(core) for _ in range(blocks)))

    def forward(self, x):
        return self.blocks(x)


class SelfAttention(nn.Module):
    """Pre-LN blocks around ``nn.MultiheadAttention`` called as popular code calls it."""

    def __init__(self, batch_first=True, need_weights=False, bias=True, blocks=2):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleList(nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first, bias=bias)
                                  for _ in range(blocks))
        self.ln = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(blocks))
        self.need_weights = need_weights

    def forward(self, x):
        for attn, ln in zip(self.attn, self.ln):
            h = ln(x)
            x = x + attn(h, h, h, need_weights=self.need_weights)[0]
        return x


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, batch_first=True)  # dropout 0.1
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def x_seq():
    return (torch.randn(2, SEQ, WIDTH, generator=torch.Generator().manual_seed(0)),)


SDPA_FORMS = ["sdpa", "sdpa_scale", "sdpa_causal", "sdpa_dropout", "sdpa_bool_mask", "sdpa_additive_mask",
              "causal_mul", "causal_div"]
MHA_FORMS = {
    "mha": lambda: SelfAttention(),
    "mha_seq_first": lambda: SelfAttention(batch_first=False),
    "mha_need_weights": lambda: SelfAttention(need_weights=True),
    "mha_no_bias": lambda: SelfAttention(bias=False),
    "encoder_layer": _encoder,
}
EXPORTERS = [pytest.param(False, id="torchscript"),
             pytest.param(True, id="dynamo", marks=pytest.mark.skipif(not dynamo_available(), reason="needs onnxscript"))]


def _capture(path, x):
    return frontend.capture(onnx_load.load(str(path)), x)


def _agree_with_fx(model, x, path) -> float:
    """Asserts the ONNX and fx reports have the same layers, each within 10%; returns the
    worst relative difference."""
    fx, on = gradaudit.audit(model, x), gradaudit.audit(str(path), x)
    assert on.estimated_ops == [] and fx.estimated_ops == []
    fx_layers, onnx_layers = by_call(fx.layers), by_call(on.layers)
    assert [(k, v.op) for k, v in onnx_layers.items()] == [(k, v.op) for k, v in fx_layers.items()]
    worst = 0.0
    for key, layer in fx_layers.items():
        other = onnx_layers[key]
        for a, b in ((layer.predicted.act_rms, other.predicted.act_rms), (layer.predicted.grad_rms, other.predicted.grad_rms)):
            assert within(b, a, 0.10), (key, layer.predicted, other.predicted)
            worst = max(worst, abs(b - a) / abs(a))
    return worst


def _computes_what_onnxruntime_computes(graph, path, x) -> None:
    model = onnx.load(str(path))
    want = run_ort(model, {model.graph.input[0].name: x[0].numpy()})
    got = run_ir(graph, list(x))
    assert got and set(got) <= set(want)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("core", SDPA_FORMS)
def test_attention_forms_become_sdpa(core, dynamo, tmp_path):
    model, x = Net(core), x_seq()
    path = export(model, x, tmp_path / f"{core}.onnx", dynamo)
    graph = _capture(path, x)
    fused = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert len(fused) == 3 and not any(n.op == "softmax" for n in graph.nodes)
    kwargs = fused[0].kwargs
    assert kwargs["is_causal"] == (core not in ("sdpa", "sdpa_scale", "sdpa_dropout"))
    assert kwargs["dropout_p"] == pytest.approx(0.1 if core == "sdpa_dropout" else 0.0)
    assert kwargs.get("scale", 1 / math.sqrt(WIDTH // HEADS)) == pytest.approx(0.2 if core == "sdpa_scale" else
                                                                                1 / math.sqrt(WIDTH // HEADS))
    if core != "sdpa_dropout":
        _computes_what_onnxruntime_computes(graph, path, x)
    _agree_with_fx(model, x, path)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("form", sorted(MHA_FORMS))
def test_multihead_attention_becomes_one_layer(form, dynamo, tmp_path):
    """The module's whole export (in-projection, heads, core, out-projection) is one
    ``multihead_attention`` layer named as the module, as torch.fx records it."""
    model, x = MHA_FORMS[form](), x_seq()
    path = export(model, x, tmp_path / f"{form}.onnx", dynamo)
    graph = _capture(path, x)
    layers = [n for n in graph.nodes if n.op == "multihead_attention"]
    names = {"encoder_layer": ["layers.0.self_attn", "layers.1.self_attn"]}.get(form, ["attn.0", "attn.1"])
    assert [n.module for n in layers] == names
    assert not any(n.op in ("softmax", "scaled_dot_product_attention") for n in graph.nodes)
    if form != "encoder_layer":  # its dropouts draw at random
        _computes_what_onnxruntime_computes(graph, path, x)
    _agree_with_fx(model, x, path)


@pytest.mark.skipif(not dynamo_available(), reason="needs onnxscript")
def test_opset_23_attention_op(tmp_path):
    model, x = Net("sdpa_causal"), x_seq()
    path = export(model, x, tmp_path / "att23.onnx", True, opset=23)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Attention") == 3
    graph = _capture(path, x)
    fused = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert len(fused) == 3 and fused[0].kwargs["is_causal"] is True
    _computes_what_onnxruntime_computes(graph, path, x)
    _agree_with_fx(model, x, path)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fused_nodes_keep_the_files_names_and_lines(dynamo, tmp_path):
    """The fused node is named after the ONNX node computing the attention output and
    has its place: the user's line in the dynamo exporter's stack trace."""
    model, x = Net("sdpa"), x_seq()
    path = export(model, x, tmp_path / "m.onnx", dynamo)
    graph = _capture(path, x)
    by_output = {o: n for n in graph.folded.graph.node for o in n.output}
    line = next(k for k, text in enumerate(open(__file__), 1) if "y = attend(self.core" in text)
    fused = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    for node in fused:
        source = by_output[graph.tensor_of[node.name]]
        assert node.name == source.name and node.location == frontend.location_of(source)
        if dynamo:
            assert node.location.path.endswith("test_onnx_attention.py") and node.location.line == line
    assert len(fused) == 3


def test_hand_written_attention_without_a_mask_stays_op_by_op(tmp_path):
    """As torch.fx sees it (a causal mask or F.scaled_dot_product_attention are what
    the torch captures fuse): the same IR, the same prediction."""
    from rulemodels import HandAttention

    torch.manual_seed(1)
    model, x = HandAttention(64, scale=True), (torch.randn(2, 8, 64),)
    path = export(model, x, tmp_path / "hand.onnx")
    ops = [n.op for n in _capture(path, x).nodes]
    assert "softmax" in ops and "scaled_dot_product_attention" not in ops
    assert _agree_with_fx(model, x, path) == 0.0


@pytest.mark.skipif(not dynamo_available(), reason="needs onnxscript")
def test_probe_runs_on_the_files_own_nodes(tmp_path):
    """The ONNX probe differentiates the file as it is (its MatMul and Softmax nodes);
    its gradient norms agree with autograd on the torch model."""
    model, x = Net("sdpa_causal", blocks=2), x_seq()
    path = export(model, x, tmp_path / "m.onnx", True)
    report = gradaudit.audit(str(path), x, probe=True, draws=2)
    oracle = autograd_norms(model, x, draws=128)
    pairs = [(layer.measured.grad_rms, math.sqrt(oracle["grad"][key])) for key, layer in by_call(report.layers).items()]
    good = [p for p in pairs if within(p[0], p[1], 0.20)]
    assert len(pairs) == 10 and len(good) >= 0.9 * len(pairs), pairs


# --------------------------------------------------------------------------- near misses
def _attention_graph(tmp_path, *, softmax_axis=-1, extra=(), mask=None, fill=None, v_width=8, scale_after=None):
    """softmax(q k^T s [+ mask]) v on (2, 4, 8, 8) inputs, as the TorchScript exporter
    writes it (the scale split over q and k); the keywords make near misses."""
    shape = [2, 4, 8, 8]
    r = math.sqrt(1 / math.sqrt(8))
    consts = {"a": np.array(r, np.float32)}
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["q", "a"], ["qs"]), helper.make_node("Mul", ["kt", "a"], ["kts"]),
             helper.make_node("MatMul", ["qs", "kts"], ["s"])]
    logits = "s"
    if scale_after is not None:
        consts["c"] = np.array(scale_after, np.float32)
        nodes.append(helper.make_node("Mul", ["s", "c"], ["sc"]))
        logits = "sc"
    inputs = [("q", T.FLOAT, shape), ("k", T.FLOAT, shape), ("v", T.FLOAT, shape[:3] + [v_width])]
    if isinstance(mask, str):  # "input"
        inputs.append(("m", T.FLOAT, [2, 1, 1, 8]))
        nodes.append(helper.make_node("Add", [logits, "m"], ["sm"]))
        logits = "sm"
    elif mask is not None:
        consts["m"] = mask
        if fill is None:
            nodes.append(helper.make_node("Add", [logits, "m"], ["sm"]))
        else:
            consts["f"] = np.array(fill, np.float32)
            nodes.append(helper.make_node("Where", ["m", "f", logits], ["sm"]))
        logits = "sm"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=softmax_axis),
              helper.make_node("MatMul", ["p", "v"], ["y"])]
    outputs = [("y", T.FLOAT, shape[:3] + [v_width])]
    for name in extra:
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
        outputs.append((f"{name}_out", T.FLOAT, None))
    model = make_model(nodes, inputs, [o if o[2] else helper.make_value_info(o[0], onnx.TypeProto()) for o in outputs],
                       [tensor(k, v) for k, v in consts.items()])
    path = save(model, tmp_path / "att.onnx")
    gen = torch.Generator().manual_seed(0)
    feeds = tuple(torch.randn(*s, generator=gen) for _, _, s in inputs)
    return path, feeds


def _ops(path, x):
    return [n.op for n in _capture(path, x).nodes]


CAUSAL = np.triu(np.full((8, 8), -np.inf, np.float32), 1)


def test_the_base_graph_is_fused(tmp_path):
    path, x = _attention_graph(tmp_path)
    graph = _capture(path, x)
    (node,) = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert node.kwargs == {"attn_mask": None, "dropout_p": 0.0, "is_causal": False}
    path, x = _attention_graph(tmp_path, mask=CAUSAL, scale_after=2.0)
    graph = _capture(path, x)
    (node,) = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert node.kwargs["is_causal"] is True and node.kwargs["scale"] == pytest.approx(2 / math.sqrt(8))
    model = onnx.load(str(path))
    want = run_ort(model, {i.name: t.numpy() for i, t in zip(model.graph.input, x)})
    np.testing.assert_allclose(run_ir(graph, list(x))["y"].numpy(), want["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [
    pytest.param({"softmax_axis": -2}, id="softmax-over-queries"),
    pytest.param({"softmax_axis": 1}, id="softmax-over-heads"),
    pytest.param({"extra": ["s"]}, id="scores-also-read-elsewhere"),
    pytest.param({"extra": ["p"]}, id="probabilities-also-read-elsewhere"),
    pytest.param({"mask": "input"}, id="padding-mask-from-an-input"),
    pytest.param({"mask": np.tril(np.ones((8, 8), np.float32))}, id="additive-bias-not-a-mask"),
    pytest.param({"mask": np.triu(np.full((8, 8), -np.inf, np.float32), 2)}, id="mask-not-causal"),
    pytest.param({"mask": ~np.tril(np.ones((8, 8), bool)), "fill": -1.0}, id="masked-fill-with-a-finite-value"),
    pytest.param({"v_width": 6}, id="value-head-size-differs"),
])
def test_near_misses_stay_op_by_op(variant, tmp_path):
    path, x = _attention_graph(tmp_path, **variant)
    ops = _ops(path, x)
    assert "scaled_dot_product_attention" not in ops and "softmax" in ops, ops


def test_causal_where_mask_is_fused(tmp_path):
    """The near miss above with the -inf fill nanoGPT uses is the causal attention."""
    path, x = _attention_graph(tmp_path, mask=~np.tril(np.ones((8, 8), bool)), fill=-np.inf)
    graph = _capture(path, x)
    (node,) = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert node.kwargs["is_causal"] is True


def test_packed_batch_first_attention_is_not_multihead_attention(tmp_path):
    """One packed projection split in a batch-first model (GPT-2's c_attn) is hand-written
    code, not nn.MultiheadAttention: its core is fused, its projections stay layers."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c_attn, self.c_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    model, x = Packed(), x_seq()
    path = export(model, x, tmp_path / "packed.onnx")
    graph = _capture(path, x)
    assert [n.op for n in graph.nodes if n.kind == "call_module"] == ["linear", "linear"]
    assert [n.op for n in graph.nodes].count("scaled_dot_product_attention") == 1
    assert _agree_with_fx(model, x, path) == 0.0


class Masked(nn.Module):
    """nn.MultiheadAttention given a causal mask, and as cross-attention."""

    def __init__(self, cross: bool):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.cross = cross

    def forward(self, x, memory=None):
        if self.cross:
            return self.attn(x, memory, memory, need_weights=False)[0]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("cross", [False, True], ids=["causal-mask", "cross-attention"])
def test_multihead_attention_with_a_mask_or_two_inputs_fuses_its_core(cross, dynamo, tmp_path):
    """Not nn.MultiheadAttention's self-attention without a mask: its core becomes
    scaled_dot_product_attention (causal with the mask) and its projections stay linear
    layers (the dynamo exporter's split of the packed weight folded)."""
    model = Masked(cross)
    x = x_seq() + ((torch.randn(2, 6, WIDTH, generator=torch.Generator().manual_seed(1)),) if cross else ())
    path = export(model, x, tmp_path / "m.onnx", dynamo)
    graph = _capture(path, x)
    (core,) = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert core.kwargs["is_causal"] is not cross
    assert [n.op for n in graph.nodes if n.kind == "call_module"] == ["linear"] * (3 if cross else 2)
    assert not any(n.op in ("softmax", "multihead_attention") for n in graph.nodes)
    onnx_model = onnx.load(str(path))
    want = run_ort(onnx_model, {i.name: t.numpy() for i, t in zip(onnx_model.graph.input, x)})
    for name, value in run_ir(graph, list(x)).items():
        np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-4, atol=1e-5)


def test_a_pattern_that_cannot_be_mapped_is_a_capture_error_naming_the_node(tmp_path, monkeypatch):
    """Its nodes are already skipped, so it cannot fall back to onnxruntime: one clear
    error naming the node, never a traceback from a half-built graph."""
    from gradaudit.errors import CaptureError
    from gradaudit.frontends import onnx_attention
    from gradaudit.frontends.onnx_ops import Fallback

    def refuse(m, b, node):
        raise Fallback("no static shape for q")

    monkeypatch.setattr(onnx_attention, "emit", refuse)
    path, x = _attention_graph(tmp_path)
    node_name = onnx.load(str(path)).graph.node[-1].name or "MatMul"
    with pytest.raises(CaptureError, match=f"node '{node_name}'.*could not be mapped .no static shape for q."):
        _capture(path, x)
