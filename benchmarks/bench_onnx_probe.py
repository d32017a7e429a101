"""The ONNX probe's cost: ``gradaudit check model.onnx --probe`` on the ResNet-18 example
exported to ONNX (TorchScript exporter, training mode, the example's 2x3x224x224 batch).

It prints, as medians over repeats: the whole command (a fresh process: imports, loading,
the static audit, the probe), the probe stage alone (``probe_seconds`` of the report), the
probe's number of onnxruntime runs, and one plain onnxruntime forward of the same file,
so the probe's cost reads as a number of forwards; then each repeat's time and the
machine's load average before and after (on a shared machine the medians are only
comparable at a similar load). Target: the whole command under 30 s on 2 cores. Nothing
is asserted.

    python benchmarks/bench_onnx_probe.py [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 30.0


def export(path: str) -> tuple:
    import torch

    spec = importlib.util.spec_from_file_location("resnet18", os.path.join(ROOT, "examples", "resnet18.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(mod.model.train(), mod.example_inputs, path, dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    return mod.example_inputs


def forward_seconds(path: str, x, repeats: int) -> float:
    import onnxruntime as ort

    from gradaudit.frontends.onnx_load import session_options

    session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and onnxruntime)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "resnet18.onnx")
        (x,) = export(path)
        forward = forward_seconds(path, x, 5)
        whole, probe, runs = [], [], []
        for _ in range(args.repeats):
            out = os.path.join(folder, "report.json")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gradaudit", "check", path, "--probe", "--format", "json",
                            "-o", out, "-q"], env=env, check=False, capture_output=True)
            whole.append(time.perf_counter() - start)
            with open(out) as fh:
                report = json.load(fh)
            probe.append(report["environment"]["probe_seconds"])
            runs.append(report["probe"]["estimator"]["runs"])
    w, p = statistics.median(whole), statistics.median(probe)
    print(f"ResNet-18, 2x3x224x224, {args.threads} thread(s), medians of {args.repeats}:")
    print(f"  one onnxruntime forward      {forward * 1e3:8.1f} ms")
    print(f"  probe stage                  {p:8.1f} s   ({statistics.median(runs)} runs, "
          f"{p / forward:.0f} forwards' worth)")
    print(f"  gradaudit check --probe      {w:8.1f} s   target < {TARGET:.0f} s: {'met' if w < TARGET else 'NOT met'}")
    print(f"  each repeat: {', '.join(f'{t:.1f} s' for t in whole)} (probe stage {', '.join(f'{t:.1f}' for t in probe)}); "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
