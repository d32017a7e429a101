"""The user's own loss: ``loss_fn(output, batch) -> scalar`` on real batches.

The prediction, and the probe's predicted-vs-measured comparison, use DESIGN.md's
synthetic loss L = sum <y, g>, g ~ N(0, 1): it is the same for every model, so layers
compare across models, but its gradient is in no unit anybody trains with. With a
``loss_fn`` and a batch, the probe also differentiates the user's loss, so the per-layer
gradient RMS, the global gradient norm and the clipping threshold (GA606) are in the
units of the user's training.

What a batch is, and what the model runs on:

* ``batch`` is what ``loss_fn`` gets as its second argument, exactly as given (moved to the
  probe's device): usually the targets, or the whole ``(inputs, targets)`` pair.
* one batch and explicit ``example_inputs``: the model runs on ``example_inputs``;
* otherwise the model's positional inputs come from the batch: a pair ``(x, y)`` or a
  tuple ``(x1, ..., xn, y)`` (what ``x, y = batch`` unpacks) gives ``x`` (``x1, ..., xn``);
  a dict with an ``"inputs"`` entry gives that entry (a tensor or a sequence of tensors);
* several batches: a zero-argument callable is called once per draw (each call a fresh
  batch), any other iterable (a ``DataLoader``, a generator, a list read from a file)
  gives one batch per draw; each batch supplies the model's inputs as above.

The batch file of ``--inputs batch.pt`` (read with ``torch.load(weights_only=True)``) holds
``{"inputs": x_or_list_of_tensors, "target": y}`` for one batch, or a list of such dicts
for several; its batch is ``(*inputs, target)``, so ``loss_fn(output, batch)`` finds the
target at ``batch[-1]``.

The clipping threshold (Pascanu, Mikolov & Bengio, "On the difficulty of training
recurrent neural networks", ICML 2013, section 3.2: thresholds from half to ten times the
average gradient norm converge). From the global norms n_1..n_k measured over k draws
(batches), with mean m:

    max_norm  = min(10 m, max(2 m, max_k n_k))

so ordinary steps, including the largest one measured, pass unclipped while a step ten
times the average is clipped. The element-wise equivalent (Keras ``clipvalue``, torch
``clip_grad_value_``) scales the largest gradient entry of an ordinary step, a_k = max|g|
in draw k, by the same headroom:

    clip_value = (max_norm / m) * mean_k a_k.

Keras's ``global_clipnorm=max_norm`` is the same operation as ``clip_grad_norm_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gradaudit.errors import ConfigError
from gradaudit.probe.inputs import first_line
from gradaudit.probe.result import LayerMeasure, clean


def describe(loss_fn: Callable) -> str:
    """A readable name of the loss function (``loss_fn``, ``cross_entropy``, ``MSELoss()``)."""
    name = getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None)
    if name is None:
        return f"{type(loss_fn).__name__}()"
    if "<locals>" in name:  # a function defined inside another: its own name reads best
        name = name.rsplit(".", 1)[-1]
    return "loss_fn" if name.endswith("<lambda>") else name


def batches(batch: Any, draws: int) -> Iterator[Any]:
    """The batch of each draw: the same one ``draws`` times, a callable called per draw,
    or up to ``draws`` batches of an iterable (fewer when it runs out)."""
    if _is_single(batch):
        for _ in range(draws):
            yield batch
        return
    if callable(batch):
        for d in range(draws):
            try:
                yield batch()
            except Exception as exc:
                raise ConfigError(f"batch: calling it for draw {d + 1} raised {type(exc).__name__}: {first_line(exc)}") from exc
        return
    it = iter(batch)
    for _ in range(draws):
        try:
            yield next(it)
        except StopIteration:
            return


def several(batch: Any) -> bool:
    """Whether ``batch`` gives a batch per draw (a callable or an iterable of batches)."""
    return not _is_single(batch)


def _is_single(batch: Any) -> bool:
    import torch

    if isinstance(batch, (torch.Tensor, tuple, list, dict)) or batch is None:
        return True
    return not (callable(batch) or hasattr(batch, "__iter__"))


def inputs_of(batch: Any) -> tuple:
    """The model's positional inputs carried by ``batch`` (see the module docstring)."""
    import torch

    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ConfigError(
                f"batch: a dict batch needs an 'inputs' entry for the model (keys: {', '.join(map(str, batch))}); "
                "or pass example_inputs"
            )
        inputs = batch["inputs"]
        return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return tuple(batch[:-1])
        if len(batch) == 1:
            return (batch[0],)
    if isinstance(batch, torch.Tensor):
        raise ConfigError(
            "batch: a single tensor cannot say what the model runs on; pass example_inputs, or a batch (inputs, target)"
        )
    raise ConfigError(f"batch: expected (inputs, target), a dict with 'inputs', or a tensor (got {type(batch).__name__})")


def to_device(batch: Any, device: str) -> Any:
    """``batch`` with every tensor inside moved to ``device`` (detached)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.detach().to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def scalar_loss(loss_fn: Callable, outputs: Any, batch: Any):
    """``loss_fn(outputs, batch)``, checked: a floating scalar tensor that depends on the
    model; :class:`ConfigError` naming the problem otherwise."""
    import torch

    name = describe(loss_fn)
    try:
        value = loss_fn(outputs, batch)
    except Exception as exc:
        raise ConfigError(f"loss_fn {name}(output, batch) raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"loss_fn {name} returned {type(value).__name__}, not a tensor")
    if value.numel() != 1 or not value.is_floating_point():
        raise ConfigError(
            f"loss_fn {name} returned a {str(value.dtype).replace('torch.', '')} tensor of shape "
            f"{tuple(value.shape)}, not a floating scalar (reduce it, e.g. .mean())"
        )
    if not value.requires_grad:
        raise ConfigError(f"loss_fn {name} returned a loss that does not depend on the model's output")
    return value.reshape(())


@dataclass
class LossMeasure:
    """The probe's measurements with the user's loss, one entry per draw (batch)."""

    name: str
    layers: dict[str, LayerMeasure]
    values: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    #: Largest |entry| of any parameter gradient, per draw.
    grad_absmax: list[float] = field(default_factory=list)
    batches: int = 0
    several: bool = False

    @property
    def mean_grad_norm(self) -> float:
        finite = [g for g in self.grad_norms if math.isfinite(g)]
        return sum(finite) / len(finite) if finite else float("nan")

    def clip(self) -> dict[str, float] | None:
        """The clipping thresholds of the module docstring (None without a finite norm)."""
        finite = [(n, a) for n, a in zip(self.grad_norms, self.grad_absmax) if math.isfinite(n) and math.isfinite(a)]
        if not finite:
            return None
        m = sum(n for n, _ in finite) / len(finite)
        if m <= 0:
            return None
        largest = max(n for n, _ in finite)
        max_norm = min(10 * m, max(2 * m, largest))
        absmax = sum(a for _, a in finite) / len(finite)
        return {
            "mean_grad_norm": m,
            "min_grad_norm": min(n for n, _ in finite),
            "max_grad_norm": largest,
            "max_norm": max_norm,
            "clip_value": max_norm / m * absmax,
            "low": 0.5 * m,
            "high": 10 * m,
        }

    def to_json(self) -> dict:
        return clean(
            {
                "name": self.name,
                "batches": self.batches,
                "values": self.values,
                "grad_norms": self.grad_norms,
                "grad_absmax": self.grad_absmax,
                "mean_grad_norm": self.mean_grad_norm,
                "clip": self.clip(),
            }
        )
