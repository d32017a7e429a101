"""The Hugging Face callback with a real ``transformers.Trainer`` on a tiny model built
from a small config (no downloads: HF_HUB_OFFLINE=1): a few CPU steps with the figures
in the log history and the HTML report written, and a deliberately broken model whose
run stops before its first step with the text report."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")

import gradaudit  # noqa: E402
from gradaudit.errors import ConfigError  # noqa: E402
from gradaudit.integrations.transformers import GradauditTrainerCallback, forward_inputs  # noqa: E402

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


class TinyConfig(transformers.PretrainedConfig):
    model_type = "gradaudit-tiny"

    def __init__(self, vocab_size=50, hidden_size=16, depth=2, num_labels=3, sigmoid_normal=False, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.sigmoid_normal = sigmoid_normal


class TinyClassifier(transformers.PreTrainedModel):
    """Embedding, mean pool, ``depth`` hidden layers, a classifier; the loss from ``labels``.
    ``sigmoid_normal``: sigmoid layers with N(0, 1) weights (gradients vanish)."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size) for _ in range(config.depth))
        self.act = nn.Sigmoid() if config.sigmoid_normal else nn.ReLU()
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        if config.sigmoid_normal:
            for layer in self.layers:
                nn.init.normal_(layer.weight, std=1.0)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids).mean(dim=1)
        for layer in self.layers:
            h = self.act(layer(h))
        logits = self.head(h)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _data(n=32):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, 6), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _trainer(model, tmp_path, callback, steps):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                          disable_tqdm=True, save_strategy="no", learning_rate=1e-2, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=[callback])


def test_a_few_steps_with_the_figures_in_the_log_history(tmp_path):
    import copy

    torch.manual_seed(0)
    model = TinyClassifier(TinyConfig())
    initial = copy.deepcopy(model)
    seen = []

    def inputs_fn(batch):  # the default, recording the batch
        seen.append(batch)
        return forward_inputs(model, batch)

    callback = GradauditTrainerCallback(inputs_fn=inputs_fn)
    trainer = _trainer(model, tmp_path, callback, steps=3)
    trainer.train()
    assert trainer.state.global_step == 3
    report = callback.report
    assert report.ok("error") and report.probe["loss"] is not None  # the model's own loss
    (entry,) = [e for e in trainer.state.log_history if "gradaudit/verdict" in e]
    assert entry["gradaudit/verdict"] == report.verdict and entry["gradaudit/ok"] == 1.0 and entry["step"] == 0
    for layer in ("layers.0", "layers.1", "head"):
        for key in ("predicted_grad_rms", "measured_grad_rms", "loss_grad_rms", "predicted_act_rms"):
            assert f"gradaudit/{key}/{layer}" in entry
    folder = getattr(trainer.args, "logging_dir", None) or trainer.args.output_dir
    assert callback.html_path == os.path.join(folder, "gradaudit.html")
    assert "<html" in open(callback.html_path, encoding="utf-8").read()
    # the loss the probe differentiated is the one the model computes on that batch
    (batch,) = seen
    initial.train()
    loss = initial(**batch)["loss"]
    assert report.probe["loss"]["values"][0] == pytest.approx(float(loss), rel=1e-4)


def test_broken_model_stops_before_the_first_step(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(TinyConfig(depth=30, sigmoid_normal=True))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(model, tmp_path, GradauditTrainerCallback(), steps=20)
    with pytest.raises(gradaudit.FindingsError) as info:
        trainer.train()
    assert "VANISHING" in str(info.value) and "GA101" in str(info.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_forward_inputs_follow_the_signature():
    model = TinyClassifier(TinyConfig())
    ids, labels = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    assert forward_inputs(model, {"labels": labels, "input_ids": ids}) == (ids, None, labels)
    assert forward_inputs(model, {"input_ids": ids}) == (ids,)
    with pytest.raises(ConfigError, match="token_type_ids"):
        forward_inputs(model, {"input_ids": ids, "token_type_ids": ids})


def test_a_model_no_capture_takes_is_probed_and_training_goes_on(tmp_path, caplog, monkeypatch):
    """No capture takes the model: the probe still measures it, the verdict says the
    prediction is missing (incomplete), and training goes on."""
    from gradaudit.errors import CaptureError
    from gradaudit.frontends import chain

    def fails(model, inputs):  # no capture takes the model
        raise CaptureError("cannot capture this model (for the test)")

    monkeypatch.setattr(chain, "FRONTENDS", (("fx", fails), ("export", fails), ("hooks", fails)))
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 50, (16, 6))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    callback = GradauditTrainerCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    with caplog.at_level("WARNING", logger="gradaudit"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert callback.report.verdict == "incomplete" and callback.report.frontend == "none"
    assert all(layer.measured is not None for layer in callback.report.layers)
