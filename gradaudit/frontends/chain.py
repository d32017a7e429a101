"""Capture in layers: torch.fx, then torch.export, then the hook capture.

Each frontend is tried only when the cheaper ones failed, and the graph that comes out
says in its notes, one line each, why they failed (with the user's line):

1. :mod:`~gradaudit.frontends.fx` - symbolic trace; no model code runs; the cheapest.
2. :mod:`~gradaudit.frontends.export` - ``torch.export`` (non-strict) on fake tensors;
   resolves branches on shapes and flags; imports ``torch._dynamo`` (seconds), which is
   why it only runs when fx failed.
3. :mod:`~gradaudit.frontends.hooks` - one real forward pass, recorded; resolves any
   branch for the example call.

A :class:`~gradaudit.errors.ModelCallError` (inputs that do not fit ``forward``'s
signature) ends the chain at once: no other capture could do better.
"""

from __future__ import annotations

from typing import Any, Callable

from gradaudit.errors import CaptureError, ModelCallError
from gradaudit.ir import Graph


def _fx(model, inputs):
    from gradaudit.frontends import fx

    return fx.trace(model, inputs)


def _export(model, inputs):
    from gradaudit.frontends import export

    return export.capture(model, inputs)


def _hooks(model, inputs):
    from gradaudit.frontends import hooks

    return hooks.capture(model, inputs)


#: (name, capture function), cheapest first.
FRONTENDS: tuple[tuple[str, Callable], ...] = (("fx", _fx), ("export", _export), ("hooks", _hooks))


def capture(model: Any, inputs: Any, frontends: tuple[str, ...] | None = None) -> Graph:
    """The IR from the first frontend that captures ``model``; :class:`CaptureError`
    naming each frontend's reason when none does. ``frontends`` restricts the chain."""
    failures: list[tuple[str, CaptureError]] = []
    for name, fn in FRONTENDS:
        if frontends is not None and name not in frontends:
            continue
        try:
            graph = fn(model, inputs)
        except ModelCallError:
            raise
        except CaptureError as exc:
            failures.append((name, exc))
            continue
        from gradaudit.frontends.patterns import (fill_uninitialised, functional_layers, fuse_drop_path,
                                                  fuse_masked_attention)

        graph = functional_layers(fuse_drop_path(fuse_masked_attention(fill_uninitialised(graph))))
        graph.notes[:0] = [f"{name} failed: {exc}" for name, exc in failures]
        return graph
    if not failures:
        raise CaptureError(f"no frontend named in {frontends!r}")
    last = failures[-1][1]
    detail = "; ".join(f"{name}: {exc}" for name, exc in failures)
    err = CaptureError(f"no capture of the model worked ({detail})", location=last.location)
    err.failures = failures
    err.inputs_suspect = getattr(last, "inputs_suspect", False)
    raise err


__all__ = ["capture", "FRONTENDS"]
