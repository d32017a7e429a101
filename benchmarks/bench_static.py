"""How long the static audit takes: the static pass on ResNet-18, ResNet-50 and a
24-block transformer, and the whole ``gradaudit check`` process on the ResNet-18 example.

Two measurements, medians over several repeats:

1. In process, after tracing: the *static pass* = propagation + rules + report
   building, timed apart from the torch.fx trace (``gradaudit.frontends.fx.trace``),
   for the ResNet-18 example at 2x3x224x224, torchvision's ResNet-50 at 2x3x224x224
   (when torchvision is installed) and the Pre-LN transformer example with 24 blocks
   (4 sequences of 32 tokens). Target: under 50 ms each.
2. Whole processes: ``gradaudit check examples/resnet18.py --input-shape 2,3,224,224
   --format json -o /dev/null`` beside a baseline ``python -c`` that imports torch,
   builds the same model (runs the same file) and traces it with
   ``torch.fx.symbolic_trace``. Target: gradaudit within 1.3x of the baseline.
3. The tensor operations one static pass calls, and what they cost at this machine's
   time for one small op: a floor under the pass that no tuning of the arithmetic
   around them moves.
   gradaudit's modules are byte-compiled first (:func:`compile_package`), as pip does
   when it installs a package and as torch's already are: with PYTHONDONTWRITEBYTECODE
   set and no ``__pycache__``, every run would compile gradaudit's source again.

    python benchmarks/bench_static.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "resnet18.py")
SHAPE = (2, 3, 224, 224)
STATIC_TARGET_MS = 50.0
PROCESS_TARGET_RATIO = 1.3


def static_pass(model, inputs, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """(trace seconds, static-pass seconds, static-pass CPU seconds) per repeat."""
    from gradaudit.api import Settings, analyse, build_report, run_rules
    from gradaudit.frontends import fx
    from gradaudit.rules.base import all_rules

    codes = set(all_rules())
    settings = Settings()
    traces, passes, cpus = [], [], []
    for _ in range(repeats + 1):  # the first round warms caches (quadrature nodes, imports)
        t0 = time.perf_counter()
        graph = fx.trace(model, inputs)
        t1, c1 = time.perf_counter(), time.process_time()
        analysis = analyse(graph, inputs, None, settings)
        findings = run_rules(analysis, codes)
        build_report(analysis, findings, target="bench", input_source="given", inputs=inputs)
        t2, c2 = time.perf_counter(), time.process_time()
        traces.append(t1 - t0)
        passes.append(t2 - t1)
        cpus.append(c2 - c1)
    return traces[1:], passes[1:], cpus[1:]


#: Tensor reads that do not go through torch's dispatcher (``.shape``, ``.dtype``,
#: ``numel()``...): not counted by :func:`op_count`.
NOT_OPS = frozenset({"__get__", "numel", "dim", "element_size", "size", "is_floating_point", "stride",
                     "is_contiguous", "data_ptr", "__len__", "__hash__", "untyped_storage", "storage_offset"})


def op_count(model, inputs) -> int:
    """Tensor operations one static pass calls (counted by a ``TorchFunctionMode``)."""
    from torch.overrides import TorchFunctionMode

    from gradaudit.api import Settings, analyse, build_report, run_rules
    from gradaudit.frontends import fx
    from gradaudit.rules.base import all_rules

    graph = fx.trace(model, inputs)
    calls = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls[0] += getattr(func, "__name__", "") not in NOT_OPS
            return func(*args, **(kwargs or {}))

    with Count():
        analysis = analyse(graph, inputs, None, Settings())
        build_report(analysis, run_rules(analysis, set(all_rules())), target="bench", input_source="given", inputs=inputs)
    return calls[0]


def small_op_us() -> float:
    """Microseconds for one ``a * b`` of two float64 64-vectors (median of 5 timings)."""
    import timeit

    import torch

    a, b = torch.rand(64, dtype=torch.float64), torch.rand(64, dtype=torch.float64)
    return statistics.median(timeit.repeat(lambda: a * b, number=20_000, repeat=5)) / 20_000 * 1e6


def models() -> list[tuple[str, object, tuple]]:
    """(label, model, inputs) of the static-pass measurements."""
    import runpy

    import torch

    from gradaudit.loading import load_target

    loaded = load_target(os.path.join(ROOT, EXAMPLE), input_shapes=[SHAPE])
    out = [("ResNet-18 example, 2x3x224x224", loaded.model, loaded.inputs)]
    try:
        import torchvision
    except ImportError:
        print("(torchvision is not installed: ResNet-50 left out)")
    else:
        torch.manual_seed(0)
        out.append(("ResNet-50 (torchvision), 2x3x224x224", torchvision.models.resnet50(), (torch.randn(*SHAPE),)))
    ns = runpy.run_path(os.path.join(ROOT, "examples", "transformer_preln.py"))
    ns["PreLNEncoder"].__init__.__globals__["BLOCKS"] = 24
    torch.manual_seed(0)
    out.append(("Pre-LN transformer, 24 blocks, 4x32 ids", ns["PreLNEncoder"](), ns["example_inputs"]))
    return out


def compile_package() -> None:
    """Byte-compile gradaudit's modules (``__pycache__`` beside them), the state of an
    installed package: the processes then time the audit, not Python's compiler."""
    import compileall

    compileall.compile_dir(os.path.join(ROOT, "gradaudit"), quiet=1)


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, cpu, proc.returncode


def processes(repeats: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    shape = ",".join(map(str, SHAPE))
    check = [sys.executable, "-m", "gradaudit", "check", EXAMPLE, "--input-shape", shape, "--format", "json",
             "-o", os.devnull]
    baseline = [
        sys.executable,
        "-c",
        f"import runpy, torch, torch.fx; ns = runpy.run_path({EXAMPLE!r}); torch.fx.symbolic_trace(ns['model'])",
    ]
    ours, base, status = [], [], 0
    compile_package()
    timed(baseline)  # warm the file cache once
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        wall, cpu, status = timed(check)
        ours.append((wall, cpu))
        base.append(timed(baseline)[:2])
    return ours, base, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"static pass = propagate + rules + report, after the torch.fx trace; medians of {args.repeats} runs:")
    print(f"  {'model':<40} {'fx trace':>10} {'static pass':>12} {'cpu (all threads)':>18}")
    counted = []
    for label, model, inputs in models():
        traces, passes, cpus = static_pass(model, inputs, args.repeats)
        pass_ms = statistics.median(passes) * 1e3
        print(f"  {label:<40} {statistics.median(traces) * 1e3:>8.1f}ms {pass_ms:>10.1f}ms "
              f"{statistics.median(cpus) * 1e3:>16.1f}ms   target < {STATIC_TARGET_MS:.0f} ms: "
              f"{verdict(pass_ms < STATIC_TARGET_MS)}")
        counted.append((label, op_count(model, inputs)))
    us = small_op_us()
    print(f"tensor operations one static pass calls, at {us:.2f} us each (this machine's time for one op on a "
          f"64-vector, the size most of them have): the time they take before any Python or arithmetic")
    for label, n in counted:
        print(f"  {label:<40} {n:>7d} ops  {n * us / 1e3:6.1f} ms")
    ours, base, status = processes(max(3, args.repeats // 2 + 1))
    ours_s, base_s = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in base)
    ours_cpu, base_cpu = statistics.median(c for _, c in ours), statistics.median(c for _, c in base)
    ratio = ours_s / base_s
    cpu_ratio = ours_cpu / base_cpu

    print(f"whole process, medians of {len(ours)} runs (wall clock; CPU time of the process beside it):")
    print(f"  gradaudit check (exit {status})                      {ours_s:6.2f} s wall  {ours_cpu:6.2f} s cpu")
    print(f"  baseline: import torch + build + fx.symbolic_trace  {base_s:6.2f} s wall  {base_cpu:6.2f} s cpu")
    print(f"  ratio {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu   target <= {PROCESS_TARGET_RATIO}x: "
          f"{verdict(ratio <= PROCESS_TARGET_RATIO)}")


if __name__ == "__main__":
    main()
