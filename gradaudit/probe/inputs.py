"""Load a real batch for the probe: ``--inputs batch.pt`` or ``batch.safetensors``.

``.pt`` / ``.pth`` files are read with ``torch.load(weights_only=True)``, which only
unpickles tensors and plain containers (no arbitrary code). What a file may hold:

* the model's inputs alone: one tensor, a tuple/list of tensors (positional inputs) or
  a dict of tensors whose values are the inputs in order;
* inputs and targets, for the user's loss: ``{"inputs": x, "target": y}`` where ``x`` is
  a tensor or a list of tensors and ``y`` a tensor (or a list/dict of tensors); its batch,
  the second argument of ``loss_fn(output, batch)``, is ``(*inputs, target)``;
* several such batches: a list of those dicts (one batch per probe draw).

``.safetensors`` files (needs the ``safetensors`` package, the ``probe`` extra) hold
named tensors; they are taken in the file's key order, or in the order of keys named
``0``, ``1``, ... when all keys are integers; a key ``target`` is the target.

    torch.save({"inputs": tokens[:, :-1], "target": tokens[:, 1:]}, "batch.pt")
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from gradaudit.errors import ConfigError, require

#: Keys of a batch dict that hold the target.
TARGET_KEYS = ("target", "targets")


@dataclass
class BatchFile:
    """What ``--inputs FILE`` held: the model's inputs and, with targets, the batches."""

    inputs: tuple
    #: ``(*inputs, target)`` per batch, or None when the file holds no target.
    batches: list | None = None


def load_batch(path: str) -> BatchFile:
    """The inputs (and batches) stored in ``path``; :class:`ConfigError` on any problem."""
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
        target = next((named.pop(k) for k in TARGET_KEYS if k in named), None)
        keys = list(named)
        if keys and all(k.isdigit() for k in keys):
            keys.sort(key=int)
        inputs = tuple(named[k] for k in keys)
        if not inputs:
            raise ConfigError(f"--inputs: {path} holds no input tensor beside the target")
        return BatchFile(inputs, None if target is None else [(*inputs, target)])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--inputs: {_unreadable(path, exc)}") from exc
    return read_batches(obj, path)


def read_batches(obj: Any, what: str = "the batch") -> BatchFile:
    """A loaded file's object -> :class:`BatchFile` (the layouts of the module docstring)."""
    if isinstance(obj, dict) and "inputs" in obj:
        return _one_batch(obj, what)
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(b, dict) and "inputs" in b for b in obj):
        files = [_one_batch(b, f"{what}[{i}]") for i, b in enumerate(obj)]
        if any(f.batches is None for f in files):
            raise ConfigError(f"--inputs: {what}: every batch of the list needs a 'target'")
        return BatchFile(files[0].inputs, [f.batches[0] for f in files])
    return BatchFile(as_inputs(obj, what))


def _one_batch(obj: dict, what: str) -> BatchFile:
    import torch

    raw = obj["inputs"]
    inputs = as_inputs(raw if isinstance(raw, torch.Tensor) else list(raw), f"{what}['inputs']")
    unknown = set(obj) - {"inputs", *TARGET_KEYS}
    if unknown:
        raise ConfigError(
            f"--inputs: {what} has keys {', '.join(sorted(map(str, unknown)))}; a batch holds 'inputs' and 'target'"
        )
    target_key = next((k for k in TARGET_KEYS if k in obj), None)
    if target_key is None:
        return BatchFile(inputs)
    return BatchFile(inputs, [(*inputs, obj[target_key])])


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
