"""The probe with the user's own loss: its numbers against plain autograd on the same
batches, the batch contract (what the model runs on), the clipping threshold of GA606,
the command line (``loss_fn`` / ``example_batch`` in the model file, ``--inputs`` files
with targets), and the model and RNG states left as found."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradaudit
from gradaudit.errors import ConfigError
from gradaudit.probe.gradients import SEED
from gradaudit.rules.gradient_norm_scale import _nice
from gradaudit.state import fingerprint, rng_fingerprint

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


def _mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _stream(seed: int):
    """A callable giving a fresh (x, y) batch per call, from its own generator."""
    gen = torch.Generator().manual_seed(seed)

    def batch():
        return torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)

    return batch


def _ce(out, batch):
    return F.cross_entropy(out, batch[-1])


def _oracle(model, batches, modules=("0", "3")):
    """Per batch: loss, global gradient norm, largest |gradient entry| and, per module,
    the RMS of d loss / d(output) — from model(x), loss.backward-free autograd.grad and
    forward hooks; draw d seeds torch with SEED + d, as the probe does (dropout masks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_modules())
    out = []
    model.train()
    for d, (x, y) in enumerate(batches):
        outputs = {}
        hooks = [named[m].register_forward_hook(lambda mod, i, o, m=m: outputs.__setitem__(m, o)) for m in modules]
        torch.manual_seed(SEED + d)
        logits = model(x)
        for h in hooks:
            h.remove()
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, params + [outputs[m] for m in modules])
        pgrads, ograds = grads[: len(params)], grads[len(params):]
        out.append({
            "loss": float(loss.detach()),
            "norm": math.sqrt(sum(float(g.double().pow(2).sum()) for g in pgrads)),
            "absmax": max(float(g.abs().max()) for g in pgrads),
            "layers": {m: float(g.double().pow(2).mean()) for m, g in zip(modules, ograds)},
        })
    return out


def test_numbers_equal_plain_autograd_on_the_same_batches():
    model = _mlp(dropout=0.25)
    report = gradaudit.audit(model, loss_fn=_ce, batch=_stream(5), draws=3)
    want = _oracle(model, _replay(5, 3))
    block = report.probe["loss"]
    assert block["batches"] == 3 and len(block["grad_norms"]) == 3
    for got_norm, got_loss, got_max, w in zip(block["grad_norms"], block["values"], block["grad_absmax"], want):
        assert got_norm == pytest.approx(w["norm"], rel=1e-4)
        assert got_loss == pytest.approx(w["loss"], rel=1e-4)
        assert got_max == pytest.approx(w["absmax"], rel=1e-4)
    by_module = {layer.module: layer for layer in report.layers}
    for m in ("0", "3"):
        rms = math.sqrt(sum(w["layers"][m] for w in want) / len(want))
        assert by_module[m].extra["loss_grad_rms"] == pytest.approx(rms, rel=1e-4)


def _replay(seed: int, n: int):
    """The batches ``_stream(seed)`` gives on its first ``n`` calls."""
    gen = _stream(seed)
    return [gen() for _ in range(n)]


def test_clip_threshold_follows_the_measured_distribution():
    model = _mlp()
    report = gradaudit.audit(model, loss_fn=_ce, batch=_stream(7), draws=4)
    want = _oracle(model, _replay(7, 4))
    norms = [w["norm"] for w in want]
    mean = sum(norms) / len(norms)
    max_norm = min(10 * mean, max(2 * mean, max(norms)))
    clip_value = max_norm / mean * sum(w["absmax"] for w in want) / len(want)
    (f,) = [f for f in report.findings if f.rule == "GA606"]
    assert f.data["relative"] is False and f.data["loss"] == "_ce"
    assert f.data["max_norm"] == pytest.approx(max_norm, rel=1e-4)
    assert f.data["clip_value"] == pytest.approx(clip_value, rel=1e-4)
    assert 0.5 * mean <= f.data["max_norm"] <= 10 * mean
    assert f.fix == f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={_nice(max_norm)})"
    assert f"clipvalue={_nice(clip_value)}" in f.message and f"global_clipnorm={_nice(max_norm)}" in f.message


def test_one_spike_sets_the_threshold_up_to_ten_times_the_mean():
    from gradaudit.probe.loss import LossMeasure

    calm = LossMeasure("l", {}, grad_norms=[1.0, 1.0, 1.0, 5.0], grad_absmax=[0.1] * 4)
    assert calm.clip()["max_norm"] == pytest.approx(5.0)  # the largest step passes unclipped
    spike = LossMeasure("l", {}, grad_norms=[1.0] * 11 + [200.0], grad_absmax=[0.1] * 12)
    assert spike.clip()["max_norm"] == pytest.approx(10 * 211 / 12)  # capped at 10x the mean
    flat = LossMeasure("l", {}, grad_norms=[2.0, 2.0], grad_absmax=[0.3, 0.5])
    assert flat.clip()["max_norm"] == pytest.approx(4.0) and flat.clip()["clip_value"] == pytest.approx(0.8)
    assert LossMeasure("l", {}, grad_norms=[float("nan")], grad_absmax=[1.0]).clip() is None


def test_without_a_loss_ga606_is_relative_and_says_how_to_measure():
    report = gradaudit.audit(_mlp(), torch.randn(16, 8), probe=True)
    (f,) = [f for f in report.findings if f.rule == "GA606"]
    assert f.data["relative"] is True and "relative" in f.message and "loss_fn" in f.message
    assert "clip_grad_norm_" not in (f.fix or "") and "loss_fn" in f.fix
    assert report.probe["loss"] is None and "<y, g>" in report.probe["synthetic_loss"]


def test_the_report_says_which_loss_each_figure_used():
    from gradaudit.report.text import render

    report = gradaudit.audit(_mlp(), loss_fn=_ce, batch=_stream(1)(), draws=1)
    text = render(report)
    assert "loss grad" in text and "predicted and measured: L = sum over floating outputs" in text
    assert "d _ce(output, batch)/d(output)" in text
    html = report.to_html()
    assert "grad of your loss" in html and "_ce(output, batch)" in html
    data = report.to_json()
    assert data["probe"]["loss"]["name"] == "_ce"
    assert all("loss_grad_rms" in layer and layer["measured"] for layer in data["layers"])


# -- what the model runs on ----------------------------------------------------------------


class Recorder(nn.Module):
    """Records the batch size of every input it sees (the probe calls the module itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.seen: list[int] = []

    def forward(self, x):
        return self.fc(x)


def _sizes(model):
    seen = []
    handle = model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


def test_pair_batch_gives_the_inputs():
    model = Recorder()
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    seen, handle = _sizes(model)
    report = gradaudit.audit(model, loss_fn=_ce, batch=(x, y), draws=2)
    handle.remove()
    assert report.inputs == [{"shape": [5, 8], "dtype": "float32"}] and report.input_source == "the first batch"
    assert seen and set(seen) == {5}


def test_explicit_inputs_with_a_target_only_batch():
    model = Recorder()
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    report = gradaudit.audit(model, x, loss_fn=lambda out, target: F.cross_entropy(out, target), batch=y)
    logits = model(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters()))
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert report.probe["loss"]["grad_norms"][0] == pytest.approx(norm, rel=1e-4)


def test_dataloader_gives_one_batch_per_draw():
    from torch.utils.data import DataLoader, TensorDataset

    model = Recorder()
    data = TensorDataset(torch.randn(12, 8), torch.randint(0, 3, (12,)))
    seen, handle = _sizes(model)
    report = gradaudit.audit(model, loss_fn=_ce, batch=DataLoader(data, batch_size=4), draws=5)
    handle.remove()
    assert report.probe["loss"]["batches"] == 3  # the loader ran out after 3 batches
    assert len(report.probe["loss"]["grad_norms"]) == 3


def test_dict_batch_with_inputs_entry():
    model = Recorder()
    batch = {"inputs": torch.randn(3, 8), "labels": torch.randint(0, 3, (3,))}
    report = gradaudit.audit(model, loss_fn=lambda out, b: F.cross_entropy(out, b["labels"]), batch=batch)
    assert report.inputs[0]["shape"] == [3, 8]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch=(torch.randn(2, 8), torch.tensor([0, 1]))), "pass loss_fn too"),
        (dict(loss_fn=_ce), "loss_fn needs a batch"),
        (dict(loss_fn=_ce, batch=torch.randn(2, 8)), "single tensor cannot say"),
        (dict(loss_fn=_ce, batch={"x": torch.randn(2, 8)}), "needs an 'inputs' entry"),
        (dict(loss_fn=lambda out, b: out, batch=(torch.randn(2, 8), 0)), "not a floating scalar"),
        (dict(loss_fn=lambda out, b: 1.0, batch=(torch.randn(2, 8), 0)), "returned float, not a tensor"),
        (dict(loss_fn=lambda out, b: torch.tensor(1.0), batch=(torch.randn(2, 8), 0)), "does not depend"),
        (dict(loss_fn=lambda out, b: F.cross_entropy(out, b[5]), batch=(torch.randn(2, 8), 0)), "raised IndexError"),
        (dict(loss_fn=_ce, batch=iter(())), "gave none"),
        (dict(loss_fn="mse", batch=(torch.randn(2, 8), 0)), "must be callable"),
    ],
)
def test_bad_loss_or_batch_is_one_clear_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        gradaudit.audit(Recorder(), **kwargs)


# -- the model and the RNGs are left as found ------------------------------------------------


def test_model_and_rngs_left_as_found_with_rng_hungry_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model = _mlp(dropout=0.5)
    model.eval()
    data = TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    before_model = fingerprint(model)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    before_rng = rng_fingerprint()

    def global_rng_batch():  # draws from the global torch RNG
        return torch.randn(4, 8), torch.randint(0, 3, (4,))

    gradaudit.audit(model, loss_fn=_ce, batch=global_rng_batch, draws=2)
    gradaudit.audit(model, loss_fn=_ce, batch=DataLoader(data, batch_size=4, shuffle=True), draws=2)
    assert fingerprint(model) == before_model and not model.training
    assert rng_fingerprint() == before_rng


# -- the command line ------------------------------------------------------------------------

LM_FILE = """
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 40


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, 24, batch_first=True)
        self.head = nn.Linear(24, VOCAB)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


torch.manual_seed(0)
model = LM()
_gen = torch.Generator().manual_seed(1)


def example_batch():
    tokens = torch.randint(0, VOCAB, (4, 13), generator=_gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(output, batch):
    return F.cross_entropy(output.reshape(-1, VOCAB), batch[-1].reshape(-1))
"""


def test_cli_uses_loss_fn_and_example_batch_of_the_model_file(write, cli, tmp_path):
    path = write("lm.py", LM_FILE)
    res = cli("check", path, "--probe", "--draws", "3", "--format", "json", "-q")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["input_source"] == f"the first batch of example_batch in {path}"
    assert data["inputs"] == [{"shape": [4, 12], "dtype": "int64"}]
    loss = data["probe"]["loss"]
    assert loss["name"] == "loss_fn" and loss["batches"] == 3
    assert all(abs(v - math.log(40)) < 0.5 for v in loss["values"])  # cross-entropy at init: ~ log(vocab)
    (f,) = [f for f in data["findings"] if f["rule"] == "GA606"]
    assert f["data"]["relative"] is False
    static = cli("check", path, "--format", "json")  # without --probe, nothing is measured
    assert json.loads(static.stdout)["probe"] is None


def test_cli_inputs_file_with_inputs_and_target(write, cli, tmp_path):
    path = write("lm.py", LM_FILE)
    tokens = torch.randint(0, 40, (3, 9))
    one = tmp_path / "batch.pt"
    torch.save({"inputs": tokens[:, :-1], "target": tokens[:, 1:]}, one)
    res = cli("check", path, "--probe", "--inputs", one, "--format", "json", "-q")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["input_source"] == f"file:{one}" and data["inputs"][0]["shape"] == [3, 8]
    assert data["probe"]["loss"]["batches"] == 1 and len(data["probe"]["loss"]["grad_norms"]) == 2
    many = tmp_path / "batches.pt"
    torch.save([{"inputs": [t[:, :-1]], "target": t[:, 1:]} for t in torch.randint(0, 40, (3, 2, 7))], many)
    data = json.loads(cli("check", path, "--probe", "--draws", "3", "--inputs", many, "--format", "json", "-q").stdout)
    assert data["probe"]["loss"]["batches"] == 3 and data["inputs"][0]["shape"] == [2, 6]


def test_cli_inputs_file_without_target_is_a_clear_error(write, cli, tmp_path):
    path = write("lm.py", LM_FILE)
    only = tmp_path / "x.pt"
    torch.save(torch.randint(0, 40, (2, 8)), only)
    res = cli("check", path, "--probe", "--inputs", only)
    assert res.exit_code == 2
    assert "holds no 'target'" in res.stderr and "Traceback" not in res.stderr


def test_cli_example_batch_without_loss_fn_is_a_clear_error(write, cli):
    path = write("half.py", LM_FILE.replace("def loss_fn(", "def _loss("))
    res = cli("check", path, "--probe")
    assert res.exit_code == 2 and "define loss_fn too" in res.stderr


def test_readme_section_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Your own loss\n")
    section = text[start: text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[Your own loss block {i}]", "exec"), {"__name__": "readme"})
