"""The zoo's housekeeping: each model's memory is returned before the next one is built,
so the tier's peak is that of its largest model, not a sum.

After each test the garbage collector runs and, on glibc, ``malloc_trim(0)`` hands the
freed heap back to the system (torch's CPU tensors come from malloc; without it a large
model's freed memory stays mapped and the next models add to it). No address-space
limit: an allocation that fails inside torch's C++ code under ``RLIMIT_AS`` can end the
process with a segmentation fault instead of a Python error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


@pytest.fixture(autouse=True)
def return_memory():
    yield
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
