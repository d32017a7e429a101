"""Hugging Face ``Trainer``: audit the model on the first training batch at
``on_train_begin``, before any step.

    from gradaudit.integrations.transformers import GradauditTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradauditTrainerCallback()])

The callback takes the first batch of the trainer's training dataloader (a fresh
iterator, with the RNG states restored afterwards, so the run's own shuffling is
unchanged; the dataloader already places it on the model's device). A batch is a dict,
as the Trainer passes it to ``model(**batch)``: its entries become the model's positional
inputs in the order of ``model.forward``'s parameters (``inputs_fn(batch)`` overrides
this). The loss the probe differentiates is the one the model computes from the batch's
labels, ``output["loss"]`` (``output.loss``, or ``output[0]``), as the Trainer trains it;
``loss_fn(output, batch)`` replaces it.

Then it records the per-layer predicted and measured figures, the gradients of the loss,
the finding counts, ``gradaudit/ok`` and ``gradaudit/verdict`` as one entry of the
trainer's log history (``trainer.state.log_history``, saved in ``trainer_state.json``),
writes ``gradaudit.html`` into ``args.logging_dir`` (transformers 4) or ``args.output_dir`` and, with a
finding at or above ``stop_on`` (default ``error``; None never stops), stops the run
before its first step: ``trainer.train()`` raises :class:`gradaudit.FindingsError`,
whose message is the text report. ``callback.report`` is the report.

Models torch.fx cannot trace (many ``transformers`` architectures: their ``forward``
takes ``**kwargs``) are reported as a warning and training goes on. ``transformers`` is
imported with this module only; gradaudit does not depend on it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("gradaudit.integrations.transformers needs transformers: pip install transformers") from exc

from gradaudit.errors import ConfigError, GradauditError
from gradaudit.integrations import first_batch

log = logging.getLogger("gradaudit")


def model_loss(output: Any, batch: Any):
    """The loss a ``transformers`` model computed from the batch's labels."""
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    if getattr(output, "loss", None) is not None:
        return output.loss
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise ConfigError("the model returned no loss: give the batch its labels, or pass loss_fn(output, batch)")


def forward_inputs(model, batch: Any) -> tuple:
    """A dict batch as the positional inputs of ``model.forward`` (skipped parameters
    before the last given one take their defaults); a tuple batch as ``(x, y)``."""
    if not isinstance(batch, dict):
        from gradaudit.probe.loss import inputs_of

        return inputs_of(batch)
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = [k for k in batch if k not in names]
    if unknown:
        raise ConfigError(f"batch entries {', '.join(unknown)} are not parameters of {type(model).__name__}.forward "
                          "(pass inputs_fn)")
    last = max(names.index(k) for k in batch)
    return tuple(batch[p.name] if p.name in batch else p.default for p in params[: last + 1])


class GradauditTrainerCallback(first_batch.FirstBatchAudit, TrainerCallback):
    """Audit on the first training batch, record the figures, write the HTML report,
    stop on an error finding (see the module documentation; the options are
    :class:`~gradaudit.integrations.first_batch.FirstBatchAudit`'s, with the model's own loss
    as the default ``loss_fn``)."""

    def __init__(self, *, loss_fn: Callable[[Any, Any], Any] | None = model_loss, **kwargs: Any) -> None:
        super().__init__(loss_fn=loss_fn, **kwargs)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from gradaudit.state import preserved

        if model is None or train_dataloader is None:
            return control
        try:
            with preserved(model):  # a shuffling sampler draws from the RNG: put it back
                batch = next(iter(train_dataloader))
        except StopIteration:
            return control
        try:
            inputs = self.inputs_fn(batch) if self.inputs_fn is not None else forward_inputs(model, batch)
            self.audit(model, inputs, batch)
        except GradauditError as exc:
            log.warning("gradaudit could not audit the model: %s", exc)
            return control
        report = self.report
        if state.is_world_process_zero:
            state.log_history.append({**first_batch.metrics(report), f"{first_batch.PREFIX}/verdict": report.verdict,
                                      "step": state.global_step})
            if self.html:
                self.html_path = first_batch.write_html(report, getattr(args, "logging_dir", None) or args.output_dir)
            (log.info if report.ok() else log.warning)(first_batch.summary(report, self.html_path))
        if first_batch.stops(report, self.stop_on):
            report.raise_for_findings(self.stop_on)
        return control
