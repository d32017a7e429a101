"""Run gradaudit's own tensor work on one intra-op thread.

The static pass is thousands of small tensor ops (quadrature nodes x channels, one
channel matrix per layer; the largest reads one weight tensor). At that size torch's
intra-op thread pool costs more than it gives: every parallel op wakes the pool and
waits at a barrier, and on a machine whose cores are busy with other work the waits
dominate (the ResNet-18 static pass took 2.2 s of CPU on two threads of a loaded machine
and 0.12 s on one). :func:`serial` sets one thread for the duration and restores the
user's setting on the way out, even when the body raises.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def serial() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
