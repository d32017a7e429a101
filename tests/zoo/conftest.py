"""The zoo's guard: each model gets a memory budget, so one model that needs too much
fails its own test (an allocation error) instead of getting the whole run killed."""

from __future__ import annotations

import os

import pytest

#: Address space a zoo test may add to what the process already maps, and the most the
#: process may map while it runs (what a 2-core CI machine with ~16 GB can give).
BUDGET_BYTES = 8 << 30
CEILING_BYTES = 12 << 30
MINIMUM_BYTES = 2 << 30


def _mapped_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True)
def memory_budget():
    try:
        import resource
    except ImportError:  # not on this platform
        yield
        return
    mapped = _mapped_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if mapped is None:
        yield
        return
    limit = max(mapped + MINIMUM_BYTES, min(mapped + BUDGET_BYTES, CEILING_BYTES))
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
