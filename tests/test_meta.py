"""Models on the meta device: audited through a CPU stand-in, never allocated themselves.

Oracles: the same model built for real on the CPU (its own init, same seed: bitwise the
same weights when no block repeats; per-layer predictions within sampling noise when
blocks share one draw), and the process's peak resident memory against the size the
parameters would have.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import gradaudit
from gradaudit.errors import ConfigError
from gradaudit.frontends.meta import PROBE_REFUSAL, is_meta, stand_in
from gradaudit.state import rng_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A pre-norm residual MLP block, written the way popular repositories write them."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, depth: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(16, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def distinct() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 24), nn.BatchNorm1d(24), nn.Linear(24, 4))


@pytest.mark.oldest
def test_stand_in_of_distinct_layers_is_the_model_built_for_real():
    """No block repeats: the stand-in draws in construction order from seed 0, so its
    weights are bitwise those of the model built on the CPU after manual_seed(0)."""
    torch.manual_seed(0)
    real = distinct()
    shadow = stand_in(on_meta(distinct))
    for (name, a), (_, b) in zip(real.state_dict().items(), shadow.state_dict().items()):
        assert a.device.type == "cpu" and torch.equal(a, b), name


@pytest.mark.oldest
def test_repeated_blocks_share_one_draw_and_stay_separate_parameters():
    shadow = stand_in(on_meta(lambda: Net(depth=5)), share_above=0)
    ups = [b.up.weight for b in shadow.blocks]
    assert len({w.data_ptr() for w in ups}) == 1  # one storage for the five identical blocks
    assert len({id(w) for w in ups}) == 5
    assert shadow.stem.weight.data_ptr() != shadow.head.weight.data_ptr()
    bound = 1 / math.sqrt(32)  # nn.Linear's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(ups[0].detach().abs().max()) <= bound and float(ups[0].detach().abs().max()) > 0.9 * bound
    biases = [b.up.bias for b in shadow.blocks]  # vectors: the draw in an order of its own
    assert len({b.data_ptr() for b in biases}) == 5 and torch.equal(biases[0].sort().values, biases[1].sort().values)
    own = stand_in(on_meta(lambda: Net(depth=5)))  # small blocks: a draw each, as built for real
    assert len({b.up.weight.data_ptr() for b in own.blocks}) == 5


@pytest.mark.oldest
def test_a_shared_draw_is_read_once_by_the_analysis(monkeypatch):
    """Every copy of a shared block, the first included, reads as one weight tensor: the
    propagation's per-tensor caches (moments, reused products) hold one entry per draw,
    so the weights of 80 identical decoder layers cost one pass, not two."""
    from gradaudit.api import Settings, analyse, capture
    from gradaudit.propagation.ops import chunked

    shadow = stand_in(on_meta(lambda: Net(depth=5)), share_above=0)
    ups = [b.up.weight for b in shadow.blocks]
    assert len({w._version for w in ups}) == 1
    made = []

    class Counted(chunked.Reuse):
        def __init__(self, weight):
            made.append(weight.data_ptr())
            super().__init__(weight)

    monkeypatch.setattr(chunked, "CHUNKED_ABOVE", 0)  # every weight kept whole, products reused
    monkeypatch.setattr(chunked, "Reuse", Counted)
    inputs = torch.randn(4, 16)
    analyse(capture(shadow, inputs), inputs, None, Settings())
    assert made.count(ups[0].data_ptr()) == 1
    assert len(made) == len(set(made)) == len({p.data_ptr() for p in shadow.parameters() if p.dim() == 2})


@pytest.mark.oldest
def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids))

    shadow = stand_in(on_meta(Tied))
    assert shadow.out.weight is shadow.emb.weight and not shadow.emb.weight.is_meta


def _layers(report):
    return {r.module: (r.predicted.act_rms, r.predicted.grad_rms) for r in report.layers}


@pytest.mark.oldest
def test_meta_predictions_match_the_model_materialised_for_real():
    """Per-layer predictions of the meta audit against the same model built on the CPU:
    within the spread of two independent draws of the same init (both are one draw)."""
    torch.manual_seed(3)
    x = torch.randn(4, 16)  # one batch: the propagation starts from its own statistics
    real = gradaudit.audit(Net(d=128, hidden=256), x)
    meta = gradaudit.audit(on_meta(lambda: Net(d=128, hidden=256)), x)
    got, want = _layers(meta), _layers(real)
    assert got.keys() == want.keys() and len(got) == 2 + 6 * 3
    for name in want:
        for g, w in zip(got[name], want[name]):
            assert g == pytest.approx(w, rel=0.1), name
    assert meta.verdict == real.verdict


class BiasFree(nn.Module):
    """Pre-norm, bias-free residual blocks (as Llama writes them): each branch's output
    has mean zero, so blocks sharing one draw add nothing coherent to the stream."""

    def __init__(self, d: int = 128, depth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(16, d, bias=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.RMSNorm(d), "up": nn.Linear(d, 2 * d, bias=False),
                           "down": nn.Linear(2 * d, d, bias=False)}) for _ in range(depth))
        self.head = nn.Linear(d, 10, bias=False)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b["down"](nn.functional.silu(b["up"](b["norm"](x))))
        return self.head(x)


@pytest.mark.oldest
def test_blocks_sharing_one_draw_predict_as_the_model_built_for_real():
    """The sharing path (forced with share_above=0) on bias-free pre-norm blocks: per-layer
    predictions within 10% of the model materialised for real."""
    torch.manual_seed(5)
    x = torch.randn(4, 16)
    want = _layers(gradaudit.audit(BiasFree(), x))
    shadow = stand_in(on_meta(BiasFree), share_above=0)
    assert len({b["up"].weight.data_ptr() for b in shadow.blocks}) == 1
    got = _layers(gradaudit.audit(shadow, x))
    assert got.keys() == want.keys()
    for name in want:
        for g, w in zip(got[name], want[name]):
            assert g == pytest.approx(w, rel=0.1), name


@pytest.mark.oldest
def test_the_model_stays_on_meta_and_the_rng_untouched():
    model = on_meta(lambda: Net(depth=3))
    params = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 16)
    before = rng_fingerprint()
    gradaudit.audit(model, x)
    assert rng_fingerprint() == before
    assert {n: (p, p.requires_grad) for n, p in model.named_parameters()} == params
    assert all(p.is_meta for p in model.parameters()) and is_meta(model)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.oldest
def test_meta_inputs_are_read_for_their_shapes():
    with torch.device("meta"):
        model, x = Net(depth=2), torch.randn(3, 16)
    report = gradaudit.audit(model, x)
    assert report.verdict == gradaudit.audit(Net(depth=2), torch.randn(3, 16)).verdict
    assert report.inputs[0]["shape"] == [3, 16]


@pytest.mark.oldest
@pytest.mark.parametrize("stage", [{"probe": True}, {"gradcheck": True}, {"loss_fn": lambda out, b: out.sum()}])
def test_probe_and_gradcheck_refuse_a_meta_model(stage):
    with pytest.raises(ConfigError, match="meta device") as exc:
        gradaudit.audit(on_meta(lambda: Net(depth=2)), torch.randn(2, 16), **stage)
    assert str(exc.value) == PROBE_REFUSAL and "\n" not in PROBE_REFUSAL
    assert "smaller config of the same family" in PROBE_REFUSAL


def test_cli_refuses_to_probe_a_meta_model_in_one_line(write, run):
    path = write("big.py", """
        import torch, torch.nn as nn
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        example_inputs = (torch.randn(2, 64),)
    """)
    probed = run("check", path, "--probe")
    assert probed.returncode == 2 and "Traceback" not in probed.stderr
    assert probed.stderr.splitlines() == [f"error: {path}: {PROBE_REFUSAL}"] and probed.stdout == ""
    static = run("check", path, "--format", "json")
    assert static.returncode in (0, 1) and json.loads(static.stdout)["summary"]["verdict"] != "incomplete"


@pytest.mark.oldest
def test_a_meta_model_is_never_run_for_real(monkeypatch):
    """The hook capture runs a real forward pass; a meta model never takes that path:
    when fx and export fail, the audit says so."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if float(x.sum()) > 0:  # data-dependent: fx and export cannot take it
                return self.fc(x)
            return -self.fc(x)

    from gradaudit.errors import CaptureError
    from gradaudit.frontends import hooks

    monkeypatch.setattr(hooks, "capture", lambda *a, **k: pytest.fail("the hook capture ran"))
    with pytest.raises(CaptureError, match="no capture of the model worked"):
        gradaudit.audit(on_meta(Branchy), torch.ones(2, 8))


@pytest.mark.oldest
def test_a_meta_parameter_without_an_initialiser_is_an_error_naming_it():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8) * 0.1)  # set in __init__: lost on meta

        def forward(self, x):
            return x * self.gamma

    model = on_meta(lambda: nn.Sequential(nn.Linear(8, 8), Scale()))
    with pytest.raises(ConfigError, match=r"'1.gamma' \(Scale\).*meta device"):
        gradaudit.audit(model, torch.randn(2, 8))


class _BigUnset(nn.Module):
    """A 512 x 512 weight (past the size whose every entry is checked) set in __init__,
    or by an initialiser that writes one row of it."""

    def __init__(self, one_row: bool):
        super().__init__()
        self.one_row = one_row
        self.weight = nn.Parameter(torch.randn(512, 512) * 0.01)

    def reset_parameters(self):
        if self.one_row:
            with torch.no_grad():
                self.weight[0].zero_()

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("one_row", [False, True])
def test_a_large_meta_weight_no_initialiser_writes_is_an_error(one_row):
    model = on_meta(lambda: _BigUnset(one_row))
    with pytest.raises(ConfigError, match=r"'weight' \(_BigUnset\).*meta device"):
        gradaudit.audit(model, torch.randn(2, 512))


def test_accelerate_empty_weights_leave_the_real_buffers_alone():
    """``init_empty_weights`` puts parameters on meta and keeps buffers real: the
    stand-in's initialisers (BatchNorm resets its running statistics) write copies."""
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = distinct()
    model[3].running_mean.fill_(0.5)
    report = gradaudit.audit(model, torch.randn(4, 16))
    assert report.verdict != "incomplete"
    assert torch.equal(model[3].running_mean, torch.full((24,), 0.5)) and model[0].weight.is_meta


def test_hugging_face_init_runs_children_first():
    """GPT-2's block init rescales its residual projections after the layers' own init:
    std 0.02 / sqrt(2 n_layer) on ``c_proj``, 0.02 elsewhere."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=64, n_positions=32)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    shadow = stand_in(model)
    block = shadow.transformer.h[3]
    assert float(block.mlp.c_fc.weight.detach().std()) == pytest.approx(0.02, rel=0.02)
    assert float(block.mlp.c_proj.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.02)
    assert float(block.attn.c_proj.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.02)
    assert torch.equal(block.ln_1.weight, torch.ones(256))
    assert shadow.lm_head.weight is shadow.transformer.wte.weight
    assert all(p.is_meta for p in model.parameters())


_PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from gradaudit.frontends.meta import stand_in
    cfg = LlamaConfig(num_hidden_layers=int(sys.argv[1]), hidden_size=int(sys.argv[2]),
                      intermediate_size=int(sys.argv[3]), num_attention_heads=64, num_key_value_heads=8,
                      vocab_size=int(sys.argv[4]))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shadow = stand_in(model)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    shared = {p.data_ptr() for p in shadow.model.layers.parameters() if p.dim() == 2}
    print(json.dumps({"grew": (after - before) * 1024, "params": params, "storages": len(shared)}))
""")


def test_stand_in_of_a_deep_70b_shaped_stack_costs_one_block():
    """40 decoder layers of Llama-2-70B's attention shape (64 heads, 8 kv heads) at a
    quarter of its width and a tenth of its MLP: the stand-in's peak memory is one
    layer plus embeddings, not the 40 layers the parameters would fill."""
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", _PEAK, "40", "2048", "2867", "8000"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["storages"] == 7  # one layer's 7 projections, shared by all 40
    assert out["params"] > 3e9  # 3.4 GB of float32 parameters if allocated
    assert out["grew"] < out["params"] / 10


_AUDIT = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import gradaudit
    from gradaudit.frontends.signature import ExampleCall
    cfg = LlamaConfig(num_hidden_layers=int(sys.argv[1]), hidden_size=int(sys.argv[2]),
                      intermediate_size=int(sys.argv[3]), num_attention_heads=64, num_key_value_heads=8,
                      vocab_size=int(sys.argv[4]))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = gradaudit.audit(model, ExampleCall.of({"input_ids": torch.zeros(1, 32, dtype=torch.int64)}))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"grew": (after - before) * 1024, "params": params, "verdict": report.verdict,
                      "layers": sum(1 for layer in report.layers if layer.depth is not None),
                      "predicted": all(layer.predicted is not None for layer in report.layers if layer.depth is not None),
                      "on_meta": all(p.is_meta for p in model.parameters())}))
""")


def test_whole_static_audit_of_a_deep_70b_shaped_stack_stays_far_below_its_size():
    """The whole static audit (stand-in, capture, propagation, rules) of the stack above:
    40 decoder layers of Llama-2-70B's attention shape at a quarter of its width. Its
    peak memory is a fraction of the parameters' (the stand-in holds one layer, the
    propagation no float64 copy of a large weight: propagation/ops/chunked.py), and
    every weight layer gets statistics. The full 70B shape is in benchmarks/bench_meta.py."""
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", _AUDIT, "40", "2048", "2867", "8000"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["params"] > 4e9  # 4.5 GB of float32 parameters if allocated
    assert out["layers"] == 40 * 7 + 2 and out["predicted"]  # 7 projections a layer, embedding, head
    assert out["verdict"] != "incomplete"
    assert out["on_meta"]
    assert out["grew"] < out["params"] / 3, out
