"""Leave the user's model exactly as found.

:func:`preserved` snapshots everything an audit could disturb and puts it back on the
way out, even when the audit raises: module ``training`` flags, parameter
``requires_grad``, ``.grad`` tensors (the same objects, with their values), buffers
(BatchNorm running statistics, ``num_batches_tracked``), forward/backward hook
dictionaries, and the torch (CPU and CUDA), numpy and Python RNG states.

Parameters themselves are not copied (that would double the memory of a large model);
nothing in gradaudit writes to them, and :func:`fingerprint` lets tests prove it bitwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import torch
import torch.nn as nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved(model: nn.Module | None) -> Iterator[None]:
    """Restore the model's mutable state and the global RNG states on exit."""
    rng = _rng_state()
    if model is None:
        try:
            yield
        finally:
            _set_rng_state(rng)
        return
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    params = list(model.named_parameters(remove_duplicate=False))
    requires = [(p, p.requires_grad) for _, p in params]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for _, p in params]
    buffers = [(m, name, b, None if b is None else b.detach().clone()) for m in modules for name, b in m._buffers.items()]
    hooks = [(m, attr, dict(m.__dict__[attr])) for m in modules for attr in _HOOK_DICTS if attr in m.__dict__]
    global_grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(global_grad)
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, grad, value in grads:
                if grad is not None and value is not None:
                    grad.copy_(value)
                p.grad = grad
            for m, name, b, value in buffers:
                if b is not None and value is not None:
                    b.copy_(value)
                m._buffers[name] = b
        for m, attr, saved in hooks:
            current = getattr(m, attr)
            current.clear()
            current.update(saved)
        _set_rng_state(rng)


def fingerprint(model: nn.Module) -> str:
    """A hash of everything :func:`preserved` promises to keep, parameters included."""
    h = hashlib.sha256()
    for name, p in model.named_parameters(remove_duplicate=False):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if p.numel() else b"")
        h.update(str((p.requires_grad, p.dtype, p.device, id(p.grad))).encode())
        if p.grad is not None:
            h.update(p.grad.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, b in model.named_buffers(remove_duplicate=False):
        h.update(name.encode())
        h.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if b.numel() else b"")
    for name, m in model.named_modules():
        h.update(f"{name}:{m.training}".encode())
        for attr in _HOOK_DICTS:
            if hasattr(m, attr):
                h.update(f"{attr}:{sorted(getattr(m, attr).keys())}".encode())
    return h.hexdigest()


def rng_fingerprint() -> str:
    """A hash of the torch, numpy and Python RNG states."""
    import numpy as np

    h = hashlib.sha256()
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    h.update(repr(np.random.get_state()).encode())
    return h.hexdigest()
