"""Load a real batch for the probe: ``--inputs batch.pt`` or ``batch.safetensors``.

``.pt`` / ``.pth`` files are read with ``torch.load(weights_only=True)``, which only
unpickles tensors and plain containers (no arbitrary code). A file may hold one tensor,
a tuple/list of tensors (positional inputs) or a dict whose values are the inputs in
order. ``.safetensors`` files (needs the ``safetensors`` package, the ``probe`` extra)
hold named tensors; they are taken in the file's key order, or in the order of keys
named ``0``, ``1``, ... when all keys are integers.
"""

from __future__ import annotations

import os
import re
from typing import Any

from gradaudit.errors import ConfigError, require


def load_batch(path: str) -> tuple:
    """The positional inputs stored in ``path``; :class:`ConfigError` on any problem."""
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"--inputs: no such file: {path}")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        load_file = require("safetensors.torch", "probe", "--inputs: reading .safetensors").load_file
        try:
            named = load_file(path)
        except Exception as exc:
            raise ConfigError(f"--inputs: cannot read {path}: {first_line(exc)}") from exc
        keys = list(named)
        if keys and all(k.isdigit() for k in keys):
            keys.sort(key=int)
        return tuple(named[k] for k in keys)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--inputs: {_unreadable(path, exc)}") from exc
    return as_inputs(obj, path)


def _unreadable(path: str, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one sentence of ours
    (torch's own message is several paragraphs about how to unpickle it anyway)."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} holds pickled Python objects{what}, which gradaudit never unpickles; save the batch "
                f"as plain tensors (torch.save((x,), 'batch.pt')) or as .safetensors")
    return f"{path} is not a tensor file written by torch.save ({type(exc).__name__}: {first_line(exc)})"


def as_inputs(obj: Any, what: str = "the batch") -> tuple:
    """One tensor, a sequence of tensors, or a dict of tensors -> a tuple of inputs."""
    import torch

    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(x, torch.Tensor) for x in obj):
        return tuple(obj)
    raise ConfigError(
        f"--inputs: {what} must hold a tensor, or a tuple, list or dict of tensors (got {type(obj).__name__})"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
