"""How the static audit scales with depth: MLPs of 100, 1,000 and 10,000 layers and a
residual stack of 1,000 blocks.

Each size runs in a fresh process (so peak memory is its own): the model is built, then
``gradaudit.audit(model, x)`` (capture + propagation + rules + report) is timed; the
process reports the audit's wall time and the growth of its peak resident set over
what the built model already held. Medians over ``--repeats`` processes. The ratio
per 10x nodes is the time of one size over the time of the size ten times smaller;
linear scaling is 10x, the target is at most 12x.

    python benchmarks/bench_scaling.py [--repeats N] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

TARGET = 12.0
WIDTH = 32

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch, torch.nn as nn
    import gradaudit
    torch.set_num_threads(1)
    kind, n, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 2 * width)
            self.fc2 = nn.Linear(2 * width, width)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    if kind == "mlp":
        layers = []
        for _ in range(n):
            layers += [nn.Linear(width, width), nn.ReLU()]
        model = nn.Sequential(*layers)
    else:
        model = nn.Sequential(*(Residual() for _ in range(n)))
    x = torch.randn(8, width)
    gradaudit.audit(nn.Sequential(nn.Linear(width, width), nn.ReLU()), x)  # imports, quadrature tables
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = gradaudit.audit(model, x)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nodes = sum(1 for _ in report.layers)
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - before) / 1024, "layers": nodes,
                      "verdict": report.verdict}))
""")


def one(kind: str, n: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, str(n), str(WIDTH)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(kind: str, n: int, repeats: int) -> dict:
    runs = [one(kind, n) for _ in range(repeats)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
        "layers": runs[0]["layers"],
        "verdict": runs[0]["verdict"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--blocks", type=int, default=1000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"static audit (capture + propagation + rules + report), one thread, width {WIDTH}, "
          f"medians of {args.repeats} processes:")
    print(f"  {'model':<26} {'layers':>7} {'time':>9} {'peak RSS growth':>16} {'x per 10x nodes':>16}  verdict")
    previous = None
    for n in sizes:
        r = measure("mlp", n, args.repeats)
        if "error" in r:
            print(f"  MLP, {n} Linear+ReLU{'':<8} failed: {r['error']}")
            previous = None
            continue
        ratio = ""
        if previous is not None and n == 10 * previous[0]:
            x = r["seconds"] / previous[1]
            ratio = f"{x:.1f}x ({'met' if x <= TARGET else 'NOT met'})"
        print(f"  {f'MLP, {n} Linear+ReLU':<26} {r['layers']:>7} {r['seconds']:>8.2f}s {r['peak_mb']:>13.0f} MB "
              f"{ratio:>16}  {r['verdict']}")
        previous = (n, r["seconds"])
    small, big = max(1, args.blocks // 10), args.blocks
    rs = [measure("residual", b, args.repeats) for b in (small, big)]
    for b, r in zip((small, big), rs):
        if "error" in r:
            print(f"  residual, {b} blocks failed: {r['error']}")
            continue
        ratio = ""
        if b == big and "error" not in rs[0]:
            x = r["seconds"] / rs[0]["seconds"]
            ratio = f"{x:.1f}x ({'met' if x <= TARGET else 'NOT met'})"
        print(f"  {f'residual, {b} LN-MLP blocks':<26} {r['layers']:>7} {r['seconds']:>8.2f}s {r['peak_mb']:>13.0f} MB "
              f"{ratio:>16}  {r['verdict']}")
    print(f"target: time linear in the nodes, at most {TARGET:.0f}x per 10x nodes")


if __name__ == "__main__":
    main()
