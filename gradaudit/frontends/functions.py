"""Custom ``torch.autograd.Function`` s: one op of the graph, whose backward is the user's.

torch.fx and torch.export both trace *through* ``MyFunction.apply(x)``: they record the
ops of its ``forward`` and drop its ``backward``. When that backward is not the
forward's derivative the traced graph carries the wrong gradient:

- a gradient reversal layer (Ganin & Lempitsky 2015) returns ``-lambda * g``;
- a straight-through estimator (Bengio, Leonard & Courville 2013) rounds or binarises
  in the forward (derivative 0 almost everywhere) and passes ``g`` through;
- a gradient scaler, a custom clipping, a hand-written kernel's backward.

A graph that inlines such a forward predicts (and a probe that replays it measures) a
gradient the model never computes: a 1000x gradient scale reads as healthy, a
straight-through estimator as a gradient that stops.

While a model is captured, :func:`opaque` wraps the ``forward`` of every Function
defined outside torch (:func:`user_defined`; every ``apply`` runs it, however the model
binds ``apply``): the fx tracer records the call as one ``call_function`` node on
:func:`target`, the hook capture as one recorded call. The op (:data:`OP`) has no
handler: the propagation estimates it on sampled inputs by real autograd
(:mod:`gradaudit.propagation.montecarlo`), which runs the Function's own backward, and
the probe's replay of the traced graph calls it as the model does. torch's own Functions
(``torch.utils.checkpoint``'s) stay traced through: their backward is the forward's
derivative, and their inside holds the model's layers.

torch.export traces through them whatever their forward does: the export frontend
refuses a model that calls one (:func:`recorded`), so the chain goes on to the hook
capture.

A gradient hook registered in the forward, ``x.register_hook(fn)``, rewrites the
gradient of ``x`` just as a Function's backward would: torch.fx cannot trace it (a
function argument) and torch.export drops it (:func:`hooks_recorded` makes the export
frontend refuse such a model), so the hook capture records it as the op
:func:`gradient_hook` that every later use of ``x`` reads.

The Monte Carlo estimate of either kind of op sends a unit-scale N(0, 1) gradient
through it: exact for a backward linear in the gradient (scaling, reversal, masking, a
straight-through estimator), an approximation for one that clips the gradient at a
fixed size, whose gain depends on the gradient's real scale (the probe measures it).
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Callable, Iterator

import torch

#: The IR op of a custom Function's call.
OP = "autograd_function"

_TARGETS: dict[type, Callable] = {}
_MISSING = object()


def user_defined(cls: type) -> bool:
    """Whether ``cls`` (a ``torch.autograd.Function`` subclass) comes from outside torch
    (and outside gradaudit: :class:`_GradientHook` is the audit's own)."""
    module = getattr(cls, "__module__", "") or ""
    return not any(module == root or module.startswith(root + ".") for root in ("torch", "gradaudit"))


def target(cls: type) -> Callable:
    """The function a graph node calls for ``cls.apply`` (one per class): named
    :data:`OP`, with the class under ``.function`` for reports."""
    fn = _TARGETS.get(cls)
    if fn is None:

        def fn(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)

        fn.__name__ = OP
        fn.__qualname__ = f"{cls.__qualname__}.apply"
        fn.function = cls  # type: ignore[attr-defined]
        _TARGETS[cls] = fn
    return fn


def function_name(fn: Any) -> str | None:
    """The custom Function class a node's callable applies (its qualified name), or None."""
    cls = getattr(fn, "function", None)
    return getattr(cls, "__qualname__", None) if isinstance(cls, type) else None


def _subclasses(root: type) -> list[type]:
    """Every subclass of ``root`` defined so far, parents before children."""
    found, todo = [], [root]
    while todo:
        for sub in todo.pop(0).__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _takes_ctx(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``ctx`` first: it does unless the class defines its
    own ``setup_context`` (torch >= 2.0's other style)."""
    from torch.autograd.function import Function

    return getattr(cls, "setup_context", None) is getattr(Function, "setup_context", None)


@contextlib.contextmanager
def opaque(callback: Callable[[type, Callable, tuple, dict], Any]) -> Iterator[None]:
    """While active, the ``forward`` of every :func:`user_defined` Function F returns
    ``callback(F, run, args, kwargs)``: ``args`` / ``kwargs`` are the ones given to
    ``F.apply`` and ``run()`` runs F's own forward. The forward is wrapped, not
    ``apply``: model code often binds ``grad_reverse = GradReverse.apply`` at import.
    Restored on exit, also after an error."""
    from torch.autograd.function import Function

    classes = [c for c in _subclasses(Function) if user_defined(c) and callable(getattr(c, "forward", None))]
    resolved = [(c, c.__dict__.get("forward", _MISSING), c.forward, _takes_ctx(c)) for c in classes]

    def wrap(cls: type, forward: Callable, takes_ctx: bool) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            user_args = args[1:] if takes_ctx else args
            return callback(cls, lambda: forward(*args, **kwargs), user_args, kwargs)

        return staticmethod(wrapper)

    try:
        for cls, _, forward, takes_ctx in resolved:
            cls.forward = wrap(cls, forward, takes_ctx)
        yield
    finally:
        for cls, own, _, _ in resolved:
            if own is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(cls, "forward")
            else:
                setattr(cls, "forward", own)


class _GradientHook(torch.autograd.Function):
    """``x`` unchanged; its gradient through ``hook`` (None from the hook: unchanged)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hook: Callable) -> torch.Tensor:
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        changed = ctx.hook(g)
        return (g if changed is None else changed), None


def gradient_hook(x: torch.Tensor, hook: Callable) -> torch.Tensor:
    """The value of a tensor the forward called ``x.register_hook(hook)`` on, as an op:
    ``x`` itself, whose gradient goes through ``hook`` (:data:`HOOK_OP`). The hook
    rewrites the whole gradient of ``x``, so every later use of ``x`` reads this op."""
    return _GradientHook.apply(x, hook)


#: The IR op of a gradient hook registered in the forward.
HOOK_OP = gradient_hook.__name__


class NoHandle:
    """What ``register_hook`` returns while a capture records the hook instead."""

    def remove(self) -> None:
        pass


@contextlib.contextmanager
def hooks_recorded(found: list[str]) -> Iterator[None]:
    """Appends to ``found`` a description of each ``Tensor.register_hook`` call while
    active (the user's line, when :func:`where` finds it); the hooks are registered as usual."""
    original = torch.Tensor.register_hook

    def register_hook(self: torch.Tensor, hook: Callable) -> Any:
        found.append(where())
        return original(self, hook)

    torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.register_hook = original  # type: ignore[method-assign]


def where() -> str:
    """``Tensor.register_hook`` at the user's line on the live stack."""
    from gradaudit.frontends.fx import user_location  # (fx imports this module)

    frames = [(f.filename, f.lineno or 0, f.line) for f in traceback.extract_stack()]
    loc = user_location(frames)
    return f"Tensor.register_hook at {loc}" if loc else "Tensor.register_hook"


@contextlib.contextmanager
def recorded(found: list[type]) -> Iterator[None]:
    """Appends to ``found`` each :func:`user_defined` Function applied while active."""

    def note(cls: type, run: Callable, args: tuple, kwargs: dict) -> Any:
        if cls not in found:
            found.append(cls)
        return run()

    with opaque(note):
        yield


__all__ = ["OP", "HOOK_OP", "user_defined", "target", "function_name", "opaque", "recorded", "gradient_hook",
           "hooks_recorded", "NoHandle"]
