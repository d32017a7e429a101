"""gradaudit against what a user does instead: train and watch the gradient norms.

For the deep-sigmoid and the Xavier-ReLU examples, two ways to the same verdict, timed
in one process on one thread (imports done, medians over repeats, interleaved):

* training: 100 steps of SGD (lr 0.01) on the example's batch with a real loss
  (cross-entropy over random labels for the 10-way Xavier-ReLU head, mean squared error
  to random targets for the one-output sigmoid net), logging every weight layer's
  gradient norm at every step (``p.grad.norm().item()``, the usual per-layer logging);
  the verdict is read off the log: the median over the logged steps of the first
  layer's norm over the largest layer norm of that step, below 1e-3: vanishing (the
  head alone is no reference: once it has fitted the mean its own gradient collapses);
* gradaudit: ``gradaudit.audit(model, x)`` (capture + propagation + rules + report).

It prints both times, their ratio, and both verdicts. The model file's weights are
copied for each training run, so every run starts from the same init.

    python benchmarks/bench_training.py [--repeats N] [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import os
import runpy
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("deep_sigmoid", "relu_xavier_30")


def train(model, x, steps: int) -> tuple[float, float]:
    """(seconds, median over the steps of the first weight layer's gradient norm over the
    largest one)."""
    import torch
    import torch.nn as nn

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    out_features = model[-1].out_features
    if out_features > 1:
        target, loss_fn = torch.randint(0, out_features, (x.shape[0],), generator=gen), nn.functional.cross_entropy
    else:
        target, loss_fn = torch.randn(x.shape[0], 1, generator=gen), nn.functional.mse_loss
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log: list[list[float]] = []
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        log.append([w.grad.norm().item() for w in weights])
        opt.step()
    seconds = time.perf_counter() - start
    ratios = [row[0] / max(row) if max(row) > 0 else float("nan") for row in log]
    return seconds, statistics.median(ratios)


def audit(model, x) -> tuple[float, str]:
    import gradaudit

    start = time.perf_counter()
    report = gradaudit.audit(model, x)
    return time.perf_counter() - start, report.verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # both sides alike, and steady on a shared machine
    print(f"time to a verdict, medians of {args.repeats} runs (one process, imports done):")
    print(f"  {'example':<16} {f'{args.steps} SGD steps + logging':>26} {'verdict from the log':>24} "
          f"{'gradaudit':>10} {'verdict':>10} {'ratio':>8}")
    for name in EXAMPLES:
        ns = runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"))
        model, (x,) = ns["model"], ns["example_inputs"]
        audit(model, x)  # warm: quadrature tables, first-call costs
        trains, audits, verdict, ratio = [], [], "", 0.0
        for _ in range(args.repeats):
            seconds, ratio = train(model, x, args.steps)
            trains.append(seconds)
            seconds, verdict = audit(model, x)
            audits.append(seconds)
        t, a = statistics.median(trains), statistics.median(audits)
        seen = f"{'vanishing' if ratio < 1e-3 else 'not visible'} ({ratio:.1e})"
        print(f"  {name:<16} {t * 1e3:>24.0f}ms {seen:>24} {a * 1e3:>8.0f}ms {verdict:>10} {t / a:>7.1f}x")
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
