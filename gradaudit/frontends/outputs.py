"""What the model returns, whichever frontend captured it.

L = sum over every floating output y of <y, g> (DESIGN.md): outputs may nest in tuples,
lists, dicts and ``ModelOutput`` objects, and every floating tensor among them counts.
Integer and bool outputs (token ids, an ``argmax``) carry no gradient and are left out
with a note; a forward that returns no floating tensor at all (``None``, only ids)
leaves nothing to differentiate: the note names ``forward``, and the audit is
incomplete, never healthy.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from gradaudit.ir import Graph, Location


def check_outputs(graph: Graph, model: Any) -> None:
    """Add a note per non-floating output, and one naming ``forward`` when no output is
    a floating tensor (the audit's coverage then says the loss reaches no parameter:
    an incomplete verdict, never a healthy one)."""
    floating = 0
    for name in graph.output_refs:
        node = graph[name]
        for meta in node.outputs:
            if meta is None:
                continue
            if meta.is_float:
                floating += 1
            else:
                graph.notes.append(f"output '{name}' ({meta.dtype}) is not floating: it is left out of L")
    if not floating:
        loc = forward_location(model)
        where = f" ({loc})" if loc else ""
        returned = "None" if not graph.output_refs else "no floating tensor"
        graph.notes.append(
            f"{type(model).__name__}.forward{where} returns {returned}: gradients need at least one floating "
            "tensor output"
        )


def flatten_outputs(out: Any) -> tuple[list, list[str]]:
    """Every tensor of a model's output, in order, and a description of each object left
    out (one that is neither a tensor, a number, None nor a known container).

    Containers: tuples, lists, namedtuples, dicts (``ModelOutput`` is an ``OrderedDict``)
    and dataclasses."""
    import dataclasses

    import torch

    tensors: list = []
    left_out: list[str] = []

    def walk(v: Any, path: str) -> None:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(item, f"{path}.{k}" if path else str(k))
        elif isinstance(v, (tuple, list)):
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]")
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name), f"{path}.{f.name}" if path else f.name)
        elif v is not None and not isinstance(v, (int, float, bool, str)):
            left_out.append(f"{path or 'value'} ({type(v).__name__})")

    walk(out, "")
    return tensors, left_out


def forward_location(model: Any) -> Location | None:
    """Where the model's ``forward`` is defined."""
    from gradaudit.frontends.fx import display_path

    fn = getattr(type(model), "forward", None)
    try:
        path = inspect.getsourcefile(fn)
        line = inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):
        return None
    if path is None:
        return None
    return Location(path=display_path(os.path.abspath(path)), line=line)


__all__ = ["check_outputs", "flatten_outputs", "forward_location"]
