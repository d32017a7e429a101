"""The Lightning callback with the real ``lightning`` package: a few CPU training steps
on a tiny model (the logged keys, the HTML report in the log directory, training not
disturbed) and a deliberately broken model whose run stops before its first step."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch", reason="the lightning package is not installed (pip install lightning)")

from gradaudit.integrations.lightning import GradauditCallback  # noqa: E402

pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _healthy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _broken():
    """30 sigmoid layers with N(0, 1) weights: gradients vanish (GA101, an error)."""
    torch.manual_seed(0)
    layers = []
    for i in range(30):
        layer = nn.Linear(8 if i == 0 else 16, 16)
        nn.init.normal_(layer.weight, std=1.0)
        layers += [layer, nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def _loader(n=64):
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return DataLoader(data, batch_size=16, shuffle=True)


def _fit(module, callback, tmp_path, loader, steps=4):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(max_steps=steps, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, loader)
    return trainer, logger


def _logged(logger) -> dict[str, float]:
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("gradaudit/") and value not in ("", None):
                out[key] = float(value)
    return out


def _ce(out, batch):
    return F.cross_entropy(out, batch[1])


def test_healthy_run_logs_the_figures_and_trains_as_without_it(tmp_path):
    module = Classifier(_healthy())
    callback = GradauditCallback(loss_fn=_ce)
    trainer, logger = _fit(module, callback, tmp_path, _loader())
    assert trainer.global_step == 4 and callback.report.verdict == "healthy"
    logged = _logged(logger)
    for layer in ("net.0", "net.2"):
        for key in ("predicted_act_rms", "predicted_grad_rms", "measured_act_rms", "measured_grad_rms", "loss_grad_rms"):
            assert f"gradaudit/{key}/{layer}" in logged, (key, layer)
    report_layers = {layer.module: layer for layer in callback.report.layers}
    assert logged["gradaudit/predicted_grad_rms/net.0"] == pytest.approx(report_layers["net.0"].predicted.grad_rms,
                                                                         rel=1e-5)
    assert logged["gradaudit/ok"] == 1.0 and logged["gradaudit/findings/error"] == 0.0
    import yaml

    with open(f"{logger.log_dir}/hparams.yaml") as fh:
        assert yaml.safe_load(fh)["gradaudit/verdict"] == "healthy"
    html = callback.html_path
    assert html == f"{logger.log_dir}/gradaudit.html" and "<html" in open(html).read()
    # the audit left the run untouched: the same training without the callback ends bitwise equal
    plain = Classifier(_healthy())
    from lightning.pytorch.loggers import CSVLogger

    L.Trainer(max_steps=4, logger=CSVLogger(str(tmp_path), name="plain"), accelerator="cpu", devices=1,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(plain, _loader())
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_broken_model_stops_before_the_first_step(tmp_path):
    module = Classifier(_broken())
    before = [p.detach().clone() for p in module.parameters()]
    callback = GradauditCallback(loss_fn=_ce)
    with pytest.warns(UserWarning, match="stopping the run"):
        trainer, logger = _fit(module, callback, tmp_path, _loader(), steps=50)
    assert callback.report.verdict == "vanishing"
    assert "GA101" in {f.rule for f in callback.report.findings}
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    logged = _logged(logger)
    assert logged["gradaudit/ok"] == 0.0 and logged["gradaudit/findings/error"] >= 1
    assert math.isfinite(logged["gradaudit/gradient_spread_decades"])


def test_stop_on_none_only_reports(tmp_path):
    module = Classifier(_broken())
    callback = GradauditCallback(stop_on=None, probe=False, html=False)
    trainer, _ = _fit(module, callback, tmp_path, _loader(), steps=3)
    assert trainer.global_step == 3 and callback.report.verdict == "vanishing" and callback.html_path is None


def test_model_no_capture_takes_is_probed_and_training_goes_on(tmp_path, monkeypatch):
    """No capture takes the model: the probe still measures it, the verdict says the
    prediction is missing (incomplete), and training is not stopped."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    from gradaudit.errors import CaptureError
    from gradaudit.frontends import chain

    def fails(model, inputs):  # no capture takes the model
        raise CaptureError("cannot capture this model (for the test)")

    monkeypatch.setattr(chain, "FRONTENDS", (("fx", fails), ("export", fails), ("hooks", fails)))
    callback = GradauditCallback()
    trainer, _ = _fit(Classifier(Branchy()), callback, tmp_path, _loader(), steps=2)
    assert trainer.global_step == 2
    assert callback.report.verdict == "incomplete" and callback.report.frontend == "none"
    assert all(layer.measured is not None for layer in callback.report.layers)
