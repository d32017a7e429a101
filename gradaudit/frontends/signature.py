"""Example inputs as a call: positional and keyword arguments bound to ``forward``.

A model is called the way its code expects: ``model(x)``, ``model(x, (h0, c0))``,
``model(input_ids=..., attention_mask=...)``, ``model(x, scale=2.0)``. An
:class:`ExampleCall` holds such a call's ``args`` and ``kwargs``; :func:`bind` matches it
against ``forward``'s signature (defaults included), which says for every parameter
whether it carries tensors (an input of the graph) or not (a constant of the graph:
numbers, bools, ``None``, strings, configs are never dropped).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ExampleCall:
    """``fn(*args, **kwargs)`` with the example values."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> "ExampleCall":
        """A tensor, a tuple or list (positional), a dict (keyword), or an ExampleCall."""
        if isinstance(example_inputs, ExampleCall):
            return example_inputs
        if isinstance(example_inputs, dict):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, (tuple, list)):
            return cls(tuple(example_inputs), {})
        return cls((example_inputs,), {})

    def __call__(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def map(self, f: Callable[[torch.Tensor], Any]) -> "ExampleCall":
        """The same call with every tensor ``t`` (nested anywhere) replaced by ``f(t)``."""
        return ExampleCall(map_tensors(self.args, f), map_tensors(self.kwargs, f))

    def named(self) -> list[tuple[str, Any]]:
        """(name, value) of every argument: ``0``, ``1``... for positional ones."""
        return [(str(i), v) for i, v in enumerate(self.args)] + list(self.kwargs.items())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the call, in argument order (nested ones flattened)."""
        out: list = []
        map_tensors((self.args, self.kwargs), out.append)
        return out

    def __len__(self) -> int:
        return len(self.args) + len(self.kwargs)

    def describe(self) -> list[dict]:
        """One entry per argument for the report: shape and dtype, or the value."""
        return [_describe(name, v, keyword=not name.isdigit()) for name, v in self.named()]


def _describe(name: str, v: Any, keyword: bool) -> dict:
    if isinstance(v, torch.Tensor):
        out = {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
    elif has_tensor(v):
        out = {"value": map_tensors(v, lambda t: f"tensor{list(t.shape)}")}
        out["value"] = repr(out["value"])[:80]
    else:
        out = {"value": repr(v)[:80]}
    if keyword:
        out = {"name": name, **out}
    return out


def map_tensors(obj: Any, f: Callable[[torch.Tensor], Any]) -> Any:
    """Rebuild tuples, lists and dicts with every tensor replaced by ``f(tensor)``."""
    if isinstance(obj, torch.Tensor):
        return f(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, f) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, f) for v in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, f) for k, v in obj.items()}
    return obj


def has_tensor(obj: Any) -> bool:
    found: list = []
    map_tensors(obj, found.append)
    return bool(found)


@dataclass
class Bound:
    """One parameter of ``forward`` with its example value."""

    name: str
    value: Any
    given: bool  # passed by the caller (else its default)
    kind: Any  # inspect.Parameter kind
    #: The call's key for it: ``"0"``, ``"1"`` when passed by position, else the name.
    key: str = ""

    @property
    def is_input(self) -> bool:
        """Carries tensors: an input of the graph (else a constant)."""
        return has_tensor(self.value)


class BindError(TypeError):
    """The example inputs do not match ``forward``'s signature."""


def bind(model: torch.nn.Module, call: ExampleCall) -> list[Bound]:
    """Every parameter of ``model.forward`` with the value the example call gives it.

    ``*args`` / ``**kwargs`` parameters come out as one entry per value they receive.
    Raises :class:`BindError` when the call does not fit the signature.
    """
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise BindError(f"cannot read the signature of {type(model).__name__}.forward") from exc
    try:
        ba = sig.bind(*call.args, **call.kwargs)
    except TypeError as exc:
        raise BindError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    out: list[Bound] = []
    position = 0
    for name, p in sig.parameters.items():
        if p.kind == p.VAR_POSITIONAL:
            for v in ba.arguments.get(name, ()):
                out.append(Bound(f"{name}_{position}", v, True, p.kind, str(position)))
                position += 1
        elif p.kind == p.VAR_KEYWORD:
            for k, v in ba.arguments.get(name, {}).items():
                out.append(Bound(k, v, True, p.kind, k))
        elif name in ba.arguments:
            by_position = p.kind != p.KEYWORD_ONLY and position < len(call.args) and name not in call.kwargs
            out.append(Bound(name, ba.arguments[name], True, p.kind, str(position) if by_position else name))
            position += by_position
        elif p.default is not p.empty:
            out.append(Bound(name, p.default, False, p.kind, name))
    return out


__all__ = ["ExampleCall", "Bound", "BindError", "bind", "map_tensors", "has_tensor"]
