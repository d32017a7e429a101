"""How long a whole ``gradaudit check`` takes on a model that needs torch.export.

``tests/zoo/models/gpt.py`` asserts on its sequence length and builds tensors from
traced sizes, so torch.fx gives up and the audit captures it with ``torch.export``.
Compared, whole processes, interleaved, medians:

- ``gradaudit check tests/zoo/models/gpt.py --format json -o /dev/null``;
- a baseline ``python -c`` that imports torch, builds the same model (runs the same
  file) and calls ``torch.export.export(model, example_inputs, strict=False)``.

Target: gradaudit within 2x of the baseline.

    python benchmarks/bench_export.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_static import compile_package, timed  # noqa: E402

MODEL = os.path.join("tests", "zoo", "models", "gpt.py")
TARGET_RATIO = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    check = [sys.executable, "-m", "gradaudit", "check", MODEL, "--format", "json", "-o", os.devnull]
    baseline = [
        sys.executable,
        "-c",
        f"import runpy, torch; ns = runpy.run_path({MODEL!r}); "
        "torch.export.export(ns['model'], ns['example_inputs'], strict=False)",
    ]
    compile_package()  # as installed (bench_static.compile_package)
    timed(baseline)  # warm the file cache once
    ours, base = [], []
    status = 0
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        wall, cpu, status = timed(check)
        ours.append((wall, cpu))
        base.append(timed(baseline)[:2])
    ours_s, base_s = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in base)
    ours_cpu, base_cpu = statistics.median(c for _, c in ours), statistics.median(c for _, c in base)
    ratio, cpu_ratio = ours_s / base_s, ours_cpu / base_cpu
    print(f"{MODEL} (captured by torch.export), medians of {args.repeats} runs (wall clock; CPU time beside it):")
    print(f"  gradaudit check (exit {status})                         {ours_s:6.2f} s wall  {ours_cpu:6.2f} s cpu")
    print(f"  baseline: import torch + build + torch.export.export  {base_s:6.2f} s wall  {base_cpu:6.2f} s cpu")
    print(f"  ratio {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu   target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
