"""The zoo's housekeeping: each model's memory is returned before the next one is built,
so the tier's peak is that of its largest model, not a sum.

(No address-space limit: an allocation that fails inside torch's C++ code under
``RLIMIT_AS`` can end the process with a segmentation fault instead of a Python error.)
"""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def collect_garbage():
    yield
    gc.collect()
