"""Run gradaudit's own tensor work on one intra-op thread, with fewer cyclic collections.

The static pass is thousands of small tensor ops (quadrature nodes x channels, one
channel matrix per layer; the largest reads one weight tensor). At that size torch's
intra-op thread pool costs more than it gives: every parallel op wakes the pool and
waits at a barrier, and on a machine whose cores are busy with other work the waits
dominate (the ResNet-18 static pass took 2.2 s of CPU on two threads of a loaded machine
and 0.12 s on one). :func:`serial` sets one thread for the duration and restores the
user's setting on the way out, even when the body raises.

It also makes Python's cyclic garbage collector run less often
(:func:`fewer_collections`, which the whole audit runs under too). The walk keeps every
node's statistics alive until it ends, and each full collection traverses all of them
and the model: with the default thresholds a 1,000-layer MLP's audit took 12-14x the
100-layer one's time instead of 10x. Collections still happen (cyclic garbage does not
pile up: memory stays linear in depth); the user's thresholds come back on the way
out.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

#: Allocations between collections of the youngest generation during an audit.
GEN0_THRESHOLD = 20_000


@contextlib.contextmanager
def serial() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        with fewer_collections():
            yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's cyclic garbage collector runs its youngest generation every
    :data:`GEN0_THRESHOLD` allocations instead of every 700 (the older generations
    follow, at their usual ratios), for the duration; the user's thresholds after."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], GEN0_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
