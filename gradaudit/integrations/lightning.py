"""Lightning: audit the model on the first training batch, before any step.

    from gradaudit.integrations.lightning import GradauditCallback

    trainer = L.Trainer(callbacks=[GradauditCallback(loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]))])

At ``on_train_start`` the callback takes the first batch of the training dataloader (a
fresh iterator, with the RNG states restored afterwards, so the run's own shuffling is
unchanged), moves it to the device as Lightning does (``strategy.batch_to_device``, which
runs the module's batch-transfer hooks) and audits the LightningModule on it: the static
prediction, the probe and, with ``loss_fn(output, batch)``, the gradient norms of that
loss. Without a dataloader to read it audits the first batch of ``on_train_batch_start``
instead. The model's inputs are ``inputs_fn(batch)`` (default: ``x`` of ``(x, y)``, see
:mod:`gradaudit.probe.loss`).

It then logs, to every logger of the trainer, the per-layer predicted and measured
figures (``gradaudit/predicted_grad_rms/<layer>``, ``gradaudit/measured_grad_rms/<layer>``,
``gradaudit/loss_grad_rms/<layer>``, ...), the finding counts and ``gradaudit/ok``, and the
verdict as the hyperparameter ``gradaudit/verdict``; writes ``gradaudit.html`` into the
trainer's log directory; and, with a finding at or above ``stop_on`` (default ``error``;
None never stops), prints the text report and sets ``trainer.should_stop``: a run
audited at ``on_train_start`` stops before its first step. ``callback.report`` is the
:class:`~gradaudit.report.model.AuditReport`.

An audit that cannot run (a model torch.fx cannot trace) is a warning, never a stopped
run. Lightning is imported with this module (``lightning``, else ``pytorch_lightning``);
gradaudit itself does not depend on it.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
    except ImportError as exc:
        raise ImportError("gradaudit.integrations.lightning needs Lightning: pip install lightning") from exc

from gradaudit.errors import GradauditError
from gradaudit.integrations import first_batch
from gradaudit.probe.loss import inputs_of


class GradauditCallback(first_batch.FirstBatchAudit, Callback):
    """Audit on the first training batch, log the figures, write the HTML report, stop
    on an error finding (see the module documentation; the options are
    :class:`~gradaudit.integrations.first_batch.FirstBatchAudit`'s)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._done = False

    def on_train_start(self, trainer, pl_module) -> None:
        batch = self._first_batch(trainer, pl_module)
        if batch is not None:
            self._audit(trainer, pl_module, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._done:
            self._audit(trainer, pl_module, batch)

    # ---------------------------------------------------------------------------------
    def _first_batch(self, trainer, pl_module) -> Any:
        from gradaudit.state import preserved

        loader = trainer.train_dataloader
        if loader is None:
            return None
        try:
            with preserved(pl_module):  # a shuffling sampler draws from the RNG: put it back
                batch = next(iter(loader))
        except (StopIteration, TypeError):
            return None
        return trainer.strategy.batch_to_device(batch)

    def _audit(self, trainer, pl_module, batch) -> None:
        self._done = True
        try:
            self.audit(pl_module, (self.inputs_fn or inputs_of)(batch), batch)
        except GradauditError as exc:
            rank_zero_warn(f"gradaudit could not audit the model: {exc}")
            return
        report = self.report
        if trainer.is_global_zero:
            figures = first_batch.metrics(report)
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)
                logger.log_hyperparams({f"{first_batch.PREFIX}/verdict": report.verdict})
        folder = trainer.log_dir if self.html else None  # every rank: log_dir broadcasts
        if trainer.is_global_zero:
            self.html_path = first_batch.write_html(report, folder)
            rank_zero_info(first_batch.summary(report, self.html_path))
        if first_batch.stops(report, self.stop_on):
            from gradaudit.report.text import render

            rank_zero_warn(f"gradaudit: stopping the run (findings at or above {self.stop_on!r})\n{render(report)}")
            trainer.should_stop = True
