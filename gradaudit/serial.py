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

The passes over weights too big to copy (:mod:`gradaudit.propagation.ops.chunked`: a
70B model's 235M-weight Linear layers) are the exception: they are long, and split
into stripes of rows they run on the threads the caller had (:func:`each`; two
threads, 1.9x faster on this kind of pass). Every stripe runs on one thread, and what
stripes add up is added in stripe order, so the numbers do not depend on the number of
threads.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Allocations between collections of the youngest generation during an audit.
GEN0_THRESHOLD = 20_000


class _Threads(threading.local):
    """The outermost :func:`serial` of this thread: its depth, the caller's thread count
    (the workers of :func:`each`) and their pool, made on first use."""

    depth = 0
    workers = 1
    pool = None


_threads = _Threads()


@contextlib.contextmanager
def serial() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    outermost = _threads.depth == 0
    if outermost:
        _threads.workers = before
    _threads.depth += 1
    if before != 1:
        torch.set_num_threads(1)
    try:
        with fewer_collections():
            yield
    finally:
        _threads.depth -= 1
        if outermost:
            pool, _threads.pool, _threads.workers = _threads.pool, None, 1
            if pool is not None:
                pool.shutdown()
        if before != 1:
            torch.set_num_threads(before)


def workers() -> int:
    """Threads :func:`each` runs on: the torch thread count the outermost :func:`serial`
    found (the user's setting; 1 outside an audit)."""
    return _threads.workers


def each(work: Callable[[T], R], items: list[T]) -> list[R]:
    """``[work(item) for item in items]``, on up to :func:`workers` threads (torch's long
    ops release the interpreter's lock), results in the items' order. Each ``work``
    call runs on one thread with one intra-op thread: its result is the same bits
    whichever thread runs it."""
    if workers() <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    if _threads.pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _threads.pool = ThreadPoolExecutor(workers(), thread_name_prefix="gradaudit")
    return list(_threads.pool.map(work, items))


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
