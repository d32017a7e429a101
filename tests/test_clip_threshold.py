"""GA606's clipping threshold, measured with the user's loss before training, against the
global gradient norm of real training: 20 SGD steps with the same cross-entropy, on a
character-level LSTM language model (this repository's README as the corpus) and on the
ResNet-18 example (a 10-class image task: class templates plus noise). Pascanu et al.
(2013) found thresholds from 0.5x to 10x the average norm to work; the threshold must lie
in that band around the average measured over the 20 steps."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradaudit

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.head(h)


def _lstm_lm():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])

    def stream(seed: int):
        gen = torch.Generator().manual_seed(seed)

        def batch():
            starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
            window = torch.stack([ids[s:s + 65] for s in starts])
            return window[:, :-1], window[:, 1:]

        return batch

    def loss_fn(out, batch):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[-1].reshape(-1))

    torch.manual_seed(0)
    return CharLSTM(len(vocab)), loss_fn, stream, 1.0  # SGD lr 1, as in Zaremba et al. (2014)


def _resnet18():
    spec = importlib.util.spec_from_file_location("resnet18_example", ROOT / "examples" / "resnet18.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    templates = torch.randn(10, 3, 32, 32)

    def stream(seed: int):
        gen = torch.Generator().manual_seed(seed)

        def batch():
            y = torch.randint(0, 10, (16,), generator=gen)
            return templates[y] + 2.0 * torch.randn(16, 3, 32, 32, generator=gen), y

        return batch

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch[-1])

    return module.model, loss_fn, stream, 0.01


def _train_norms(model, loss_fn, batch, lr: float, steps: int = 20) -> list[float]:
    """Global gradient norm of each of ``steps`` SGD (momentum 0.9) steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    norms = []
    for _ in range(steps):
        x, y = batch()
        loss = loss_fn(model(x), (x, y))
        opt.zero_grad()
        loss.backward()
        norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)))
        opt.step()
    return norms


@pytest.mark.parametrize("make", [_lstm_lm, _resnet18], ids=["lstm-lm", "resnet18"])
def test_max_norm_within_pascanu_band_of_training_norms(make):
    model, loss_fn, stream, lr = make()
    report = gradaudit.audit(model, loss_fn=loss_fn, batch=stream(1), draws=4)
    (finding,) = [f for f in report.findings if f.rule == "GA606"]
    max_norm = finding.data["max_norm"]
    norms = _train_norms(model, loss_fn, stream(2), lr)
    mean = sum(norms) / len(norms)
    assert 0.5 * mean <= max_norm <= 10 * mean, (max_norm, mean, norms)
