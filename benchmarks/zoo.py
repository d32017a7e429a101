"""How well the static prediction agrees with the measurement on the model zoo.

Runs the zoo tier's models (``tests/zoo``: every torchvision classification model, the
timm architectures, the Hugging Face small configs and the tutorial-style files), each
at its library's default init, through the same audit as the tests
(``gradaudit.audit(model, inputs, probe=True, draws=2)``), and prints one line per model
(frontend, verdict, median and p90 of |log10(predicted / measured)| over its layer
statistics, the fraction within 2x, seconds), then per family and overall: how many
models meet the target (at least 90% of their layer statistics within 2x), the overall
fraction within 2x and the overall median / p90.

    python benchmarks/zoo.py [--family torchvision|timm|huggingface|tutorial ...] [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import sys
import time

ZOO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "zoo")
sys.path.insert(0, ZOO)

#: family -> (module of tests/zoo, its attribute listing the model names)
FAMILIES = {
    "torchvision": ("test_torchvision", "MODELS"),
    "timm": ("test_timm", "MODELS"),
    "huggingface": ("test_huggingface", "MODELS"),
    "tutorial": ("test_tutorial_models", "FILES"),
}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("-k", default="", help="only models whose name contains this")
    args = parser.parse_args()
    import pytest
    import torch

    from harness import LOG2, WITHIN_2X, audit_zoo

    torch.set_num_threads(1)
    rows = []
    for family in args.family or list(FAMILIES):
        module, attr = FAMILIES[family]
        try:
            mod = importlib.import_module(module)
        except pytest.skip.Exception as why:  # the family's library is not installed
            print(f"{family}: skipped ({why})")
            continue
        for name in sorted(getattr(mod, attr)):
            if args.k not in name:
                continue
            started = time.perf_counter()
            try:
                result = audit_zoo(f"{family}/{name}", *mod.case(name))
            except Exception as exc:  # a failing model is a row of the table, not the end of it
                print(f"zoo {family}/{name}: {type(exc).__name__}: {exc} ({time.perf_counter() - started:.1f}s)")
                rows.append((family, None))
                continue
            rows.append((family, result))
            gc.collect()
    print()
    print(f"{'family':12s} {'models':>6s} {'meet':>5s} {'within2x':>9s} {'median':>7s} {'p90':>7s}")
    for family in [*dict.fromkeys(f for f, _ in rows), "all"]:
        results = [r for f, r in rows if family in (f, "all")]
        done = [r for r in results if r is not None]
        errs = [e for r in done for e in r.errors_log10]
        meet = sum(1 for r in done if r.within >= WITHIN_2X)
        within = sum(1 for e in errs if e <= LOG2) / len(errs) if errs else 0.0
        print(f"{family:12s} {len(results):6d} {meet:5d} {within:9.1%} {_quantile(errs, 0.5):7.3f} "
              f"{_quantile(errs, 0.9):7.3f}")
    print(f"target: every model with at least {WITHIN_2X:.0%} of its layer statistics within 2x")


if __name__ == "__main__":
    main()
