"""Models on the meta device: a CPU stand-in that holds one copy of each distinct block.

A model built under ``with torch.device("meta")``, ``accelerate.init_empty_weights()`` or
a Hugging Face ``from_config`` on meta has shapes but no values. The static pass needs
the statistics of the weights the model *would* start training with, so
:func:`stand_in` builds a CPU stand-in:

1. the module tree is copied (meta tensors own no storage: the copy is free);
2. blocks are materialised on the CPU one at a time with the model's own
   initialisation, children before parents as Hugging Face's ``initialize_weights``
   (the weight step of ``post_init``) does: the nearest ``PreTrainedModel``'s
   ``_init_weights(module)``, else the module's ``reset_parameters()``
   (``_reset_parameters()`` for ``nn.MultiheadAttention``);
3. a block is keyed by its signature (class, ``extra_repr()``, own tensors' names,
   shapes and dtypes, initialiser, children's signatures): a large block whose
   signature repeats (the 80 decoder layers of a 70B model, 3.2 GB each) is materialised
   once and the others share its storage, with their own ``nn.Parameter`` objects; a
   block that occurs once is materialised child by child. Memory grows with the number
   of *distinct* large blocks, not with depth. Blocks under :data:`SHARE_ABOVE` bytes
   get a draw of their own each, as in the model built for real. Tied weights stay tied.

The draws come from a forked torch RNG seeded with 0: the same model gives the same
audit, and the caller's RNG state is untouched. The user's model is never modified:
it stays on meta.

Sharing one draw between identical blocks keeps each layer's statistics (every block's
weights are a draw from the same distribution either way) but not the independence
between blocks: what a shared weight adds to a residual stream's per-channel mean adds
coherently over the blocks. Biases and norm gains, the main source of such means, are
therefore given a random order per copy (:func:`_share`); a weight matrix times a
non-zero-mean input (ReLU features before a biased projection) still adds coherently,
which the small blocks, drawn independently, never meet, and bias-free pre-norm blocks
(Llama, Mistral: zero-mean branch outputs) do not produce. (An initialisation that
depends on a block's position rather than its structure, such as a std computed from a
layer index, would be shared wrongly; the library inits scale by the config's depth.)

A tensor on meta that no initialiser of the model fills (a custom parameter created in
``__init__`` by ``torch.randn``, a buffer computed there) has no recoverable values: that
is a :class:`~gradaudit.errors.ConfigError` naming it, never a guess. Every floating
tensor is marked with NaN (all of a small one, 4097 evenly spaced entries of a large one)
before the initialisers run, so one they leave alone is caught (:func:`_unset`).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from gradaudit.errors import ConfigError

#: The one line the probe and gradcheck answer a meta model with.
PROBE_REFUSAL = (
    "the model's weights are on the meta device (never allocated), so nothing can run it: "
    "audit it statically (without --probe / --gradcheck), probe a smaller config of the same "
    "family, or load real weights on a machine that fits them"
)


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` lives on the meta device."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def refuse_measurement(model: nn.Module) -> None:
    """:class:`ConfigError` (exit 2) when a measured stage is asked of a meta model."""
    if is_meta(model):
        raise ConfigError(PROBE_REFUSAL)


#: Blocks whose tensors take fewer bytes than this get a draw of their own per copy (as
#: the model built for real has); larger ones share one draw.
SHARE_ABOVE = 1 << 26


def stand_in(model: nn.Module, seed: int = 0, share_above: int = SHARE_ABOVE) -> nn.Module:
    """A CPU copy of meta ``model`` whose identical blocks of ``share_above`` bytes or
    more share one initialised draw (see the module docstring). Tensors already off meta
    stay the model's own, except in blocks an initialiser runs on: those are copied
    first (``BatchNorm.reset_parameters`` resets the running statistics)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if not t.is_meta}
    shadow = copy.deepcopy(model, memo)
    owners = _init_owners(shadow)
    sigs: dict[int, Any] = {}
    counts: dict[Any, int] = {}
    _signature(shadow, "", owners, sigs, counts)
    counts = {sig: n for sig, n in counts.items() if _nbytes(sig) >= share_above}
    cache: dict[Any, dict[str, tuple[str, torch.Tensor]]] = {}
    done: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its CPU replacement (ties)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        _place(shadow, "", owners, sigs, counts, cache, done, share_above)
    return shadow


def real_inputs(example_inputs: Any) -> Any:
    """``example_inputs`` with every meta tensor replaced by a CPU one of its shape and
    dtype: zeros for integer tensors (valid token ids), N(0, 1) draws (own generator)
    for floating ones. The static pass reads only their shapes and dtypes."""
    from gradaudit.frontends.signature import ExampleCall, map_tensors

    def real(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype)
        return torch.zeros(t.shape, dtype=t.dtype)

    if isinstance(example_inputs, ExampleCall):
        return ExampleCall(map_tensors(example_inputs.args, real), map_tensors(example_inputs.kwargs, real))
    return map_tensors(example_inputs, real)


def _init_owners(model: nn.Module) -> dict[str, nn.Module]:
    """For every module (by qualified name), the nearest enclosing Hugging Face
    ``PreTrainedModel`` (itself included): the one whose ``_init_weights`` initialises
    it in ``post_init``."""
    owners: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str, owner: nn.Module | None) -> None:
        if callable(getattr(module, "_init_weights", None)) and hasattr(module, "config"):
            owner = module
        if owner is not None:
            owners[prefix] = owner
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, _join(prefix, child_name), owner)

    walk(model, "", None)
    return owners


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (name or prefix)


def _initialiser(module: nn.Module, owner: nn.Module | None) -> Callable[[nn.Module], None] | None:
    """The model's own initialisation of ``module``: its Hugging Face owner's
    ``_init_weights``, else ``reset_parameters`` (``_reset_parameters`` for
    ``nn.MultiheadAttention``); None when it has neither."""
    if owner is not None:
        return owner._init_weights
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(type(module), attr, None)
        if callable(fn):
            return fn
    return None


def _own(module: nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    params = [(n, t, "param") for n, t in module._parameters.items() if t is not None]
    buffers = [(n, t, "buffer") for n, t in module._buffers.items() if t is not None]
    return params + buffers


def _set(module: nn.Module, n: str, kind: str, value: torch.Tensor) -> None:
    (module._parameters if kind == "param" else module._buffers)[n] = value


def _signature(module: nn.Module, name: str, owners: dict, sigs: dict, counts: dict) -> Any:
    """What makes two blocks initialise alike: class, ``extra_repr()``, own tensors'
    names, shapes, dtypes and meta-ness, initialiser, and the children's signatures."""
    children = tuple(
        (n, _signature(c, _join(name, n), owners, sigs, counts)) for n, c in module._modules.items() if c is not None
    )
    own = tuple((n, tuple(t.shape), t.dtype, t.is_meta, kind) for n, t, kind in _own(module))
    sig = (type(module), module.extra_repr(), own, id(owners.get(name)), children)
    sigs[id(module)] = sig
    counts[sig] = counts.get(sig, 0) + 1
    return sig


def _nbytes(sig: Any) -> int:
    """The bytes of the meta tensors of the block with signature ``sig``."""
    _, _, own, _, children = sig
    size = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype, meta, _ in own if meta)
    return size + sum(_nbytes(child) for _, child in children)


def _place(module: nn.Module, name: str, owners: dict, sigs: dict, counts: dict, cache: dict, done: dict,
           share_above: int) -> None:
    """Give ``module``'s subtree CPU tensors: shared with an identical block already
    materialised; else materialised here as one block (when it repeats, is small or has
    no children); else child by child, then its own initialiser over the whole block
    (large blocks that occur once, such as the model itself, hardly ever rewrite their
    children)."""
    if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        return
    sig = sigs[id(module)]
    if sig in cache:
        _share(module, cache[sig], done)
        return
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    shared = counts.get(sig, 1) > 1
    if shared or not children or _nbytes(sig) < share_above:
        tensors = _materialise(module, name, owners, done)
        if shared:
            cache[sig] = tensors
            # the first copy too gets Parameters over the draw's storage, as the others do
            # below: one version counter for all of them, so the propagation's caches of
            # products and moments of a weight (keyed by storage and version) hold one
            # entry per draw, not a second one for the block the initialiser wrote into
            _share(module, tensors, done)
        return
    for n, c in children:
        _place(c, _join(name, n), owners, sigs, counts, cache, done, share_above)
    _materialise(module, name, owners, done, recurse=False)


def _materialise(module: nn.Module, name: str, owners: dict, done: dict, recurse: bool = True) -> dict:
    """Allocate the meta tensors of ``module`` (of its whole subtree when ``recurse``) on
    the CPU, marked with NaN (:func:`_marked`), then run each module's initialiser,
    children first (a block may rescale its children, as GPT-2's does its residual
    projections). Returns the tensors by name relative to ``module``, for :func:`_share`."""
    mods = _post_order(module) if recurse else [("", module)]
    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    for rel, m in mods:
        for n, t, kind in _own(m):
            if not t.is_meta:  # the user's own tensor: the initialisers below write a copy
                if id(t) not in done:
                    done[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if kind == "param" else t.clone()
                _set(m, n, kind, done[id(t)])
                continue
            new = done.get(id(t))
            if new is None:
                if t.is_floating_point():
                    empty = _marked(torch.empty(t.shape, dtype=t.dtype))
                else:
                    empty = torch.zeros(t.shape, dtype=t.dtype)
                new = nn.Parameter(empty, requires_grad=t.requires_grad) if kind == "param" else empty
                done[id(t)] = new
            _set(m, n, kind, new)
            tensors[_join(rel, n)] = (kind, new)
    for rel, m in mods:
        init = _initialiser(m, owners.get(_join(name, rel)))
        if init is None:
            continue
        init(m)
    for key, (kind, t) in tensors.items():
        if t.is_floating_point() and _unset(t):
            owner = module.get_submodule(key.rpartition(".")[0])
            raise ConfigError(
                f"'{_join(name, key)}' ({type(owner).__name__}) is on the meta device and no initialiser "
                "of the model sets it (no reset_parameters() or library init): its values cannot be known; "
                "build the model on the CPU"
            )
    return tensors


def _marks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of the entries of ``t`` that tell whether an initialiser wrote it: the whole
    of a small tensor; 4096 evenly spaced entries and the last of a large one (an
    initialiser writes all of a tensor or, rarely, a row of it)."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= 1 << 16:
        return (flat,)
    return flat[:: flat.numel() // 4096], flat[-1:]


def _marked(t: torch.Tensor) -> torch.Tensor:
    """``t`` (fresh, uninitialised memory) with NaN on the entries :func:`_unset` reads.
    Only those: filling all of a 70B model's big blocks first cost a pass over their
    memory (0.6 s per GB here) that the initialiser's own pass makes anyway."""
    with torch.no_grad():
        for view in _marks(t):
            view.fill_(float("nan"))
    return t


def _unset(t: torch.Tensor) -> bool:
    """Whether NaN (the mark no initialiser wrote over, :func:`_marked`) is left in ``t``."""
    return any(bool(torch.isnan(view).any()) for view in _marks(t))


def _post_order(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(relative name, module)`` for the subtree, each child before its parent and
    siblings in construction order (the order ``initialize_weights`` runs in)."""
    out: list[tuple[str, nn.Module]] = []
    for n, c in module._modules.items():
        if c is not None:
            out.extend(_post_order(c, _join(prefix, n)))
    out.append((prefix, module))
    return out


def _share(module: nn.Module, tensors: dict, done: dict) -> None:
    """Point ``module``'s subtree at an identical block's tensors: new ``Parameter``
    objects over the same storage (ties inside the subtree kept).

    Vector parameters (biases, norm gains) are the exception: each copy gets the block's
    values in a random order of its own. Shared biases would add coherently along a
    residual stream (n blocks give n^2 times the squared mean of independent draws),
    which no model built for real does; a permutation of an i.i.d. draw is a draw from
    the same distribution, and a constant vector (norm gains at 1) is unchanged. Vectors
    cost little memory; the weight matrices, which do, stay shared."""
    for key, (kind, value) in tensors.items():
        *path, n = key.split(".")
        m = module.get_submodule(".".join(path)) if path else module
        old = (m._parameters if kind == "param" else m._buffers)[n]
        new = done.get(id(old))
        if new is None:
            if kind == "param" and value.dim() == 1 and value.numel() > 1:
                value = value.data[torch.randperm(value.numel())]  # a bias of its own (see above)
            new = nn.Parameter(value.data, requires_grad=old.requires_grad) if kind == "param" else value
            done[id(old)] = new
        _set(m, n, kind, new)


__all__ = ["is_meta", "stand_in", "real_inputs", "refuse_measurement", "PROBE_REFUSAL"]
