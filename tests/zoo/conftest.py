"""The zoo's housekeeping: each model's memory is returned before the next one is built,
so the tier's peak is that of its largest model, not a sum; and every model's line
(:data:`harness.RESULTS`) is printed in the terminal summary, with or without ``-s``,
with how many meet the accuracy target.

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
import os
import sys

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


def pytest_terminal_summary(terminalreporter):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import RESULTS, WITHIN_2X

    if RESULTS:
        terminalreporter.section(f"model zoo: {len(RESULTS)} models")
        for result in RESULTS:
            terminalreporter.write_line(result.line())
        met = sum(r.within >= WITHIN_2X for r in RESULTS)
        stats = sum(len(r.errors_log10) for r in RESULTS)
        close = sum(r.within * len(r.errors_log10) for r in RESULTS)
        terminalreporter.write_line(
            f"zoo totals: {met} of {len(RESULTS)} models with at least {WITHIN_2X:.0%} of their layer statistics "
            f"within 2x; {close / max(stats, 1):.1%} of all {stats} layer statistics within 2x"
        )
