"""Probe overhead: one probe draw over a plain forward + backward of the same model and batch.

For each example model, with its own example batch, this times (medians over repeats,
the two interleaved so machine load hits both alike):

* plain:  ``y = model(x)``; ``torch.autograd.grad(y, params + [x], g)`` with g ~ N(0, 1);
* probe:  one measurement draw of :class:`gradaudit.probe.runner.Runner` (what every
  draw after the first costs: layer statistics and gradient hooks), and the first draw
  (which also counts dead and saturated units and the batch correlation of layer inputs).

It prints both ratios; the target is at most 1.5x per draw. Nothing is asserted.

    python benchmarks/bench_probe.py [--repeats N] [--models resnet18,relu_he_30]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.5
MODELS = ("resnet18", "relu_he_30", "relu_xavier_30", "deep_sigmoid")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.model, mod.example_inputs


def bench(name: str, repeats: int) -> tuple[float, float, float]:
    import torch

    from gradaudit.api import Settings, analyse, capture
    from gradaudit.probe.gradients import SEED
    from gradaudit.probe.runner import Runner, graph_module
    from gradaudit.propagation.engine import ACTIVATIONS
    from gradaudit.state import preserved

    model, inputs = load(name)
    with preserved(model):
        graph = capture(model, inputs)
        analysis = analyse(graph, inputs, None, Settings())
        layers = {n.name: n.module for n in analysis.layers()}
        acts = {n.name: n.op for n in graph if n.op in ACTIVATIONS}
        runner = Runner(model, graph_module(model), graph, layers, acts, Settings())
        params = [p for p in model.parameters() if p.requires_grad]

        def plain() -> float:
            start = time.perf_counter()
            xs = [x.detach().clone().requires_grad_(True) for x in inputs]
            y = model(*xs)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(SEED))
            torch.autograd.grad(y, params + xs, g)
            return time.perf_counter() - start

        def draw(first: bool) -> float:
            start = time.perf_counter()
            runner.run(inputs, seed=SEED, device="cpu", units=first, cosine=first)
            return time.perf_counter() - start

        plain()
        draw(True)
        base, later, first = [], [], []
        for _ in range(repeats):
            base.append(plain())
            later.append(draw(False))
            first.append(draw(True))
    return statistics.median(base), statistics.median(later), statistics.median(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    print(f"{'model':<16} {'plain f+b':>11} {'probe draw':>11} {'ratio':>7} {'first draw':>11} {'ratio':>7}")
    for name in args.models.split(","):
        base, later, first = bench(name, args.repeats)
        print(
            f"{name:<16} {base * 1e3:>9.1f}ms {later * 1e3:>9.1f}ms {later / base:>6.2f}x "
            f"{first * 1e3:>9.1f}ms {first / base:>6.2f}x"
        )
    print(f"target: at most {TARGET}x per draw")


if __name__ == "__main__":
    main()
