"""Audits of models too big to instantiate: Llama-2-70B and 7B shapes and a Mixtral-8x7B
shape, built on the meta device from a transformers config.

Each configuration runs in a fresh process, stage by stage, printing wall time and the
process's peak resident set after each:

1. build the model under ``torch.device("meta")`` (no parameter is allocated);
2. the CPU stand-in (:func:`gradaudit.frontends.meta.stand_in`: one draw per distinct
   block, shared by the repeated decoder layers);
3. capture (the frontend chain) on one sequence of ``--seq`` token ids;
4. propagation + rules + report, only when the propagation's own memory fits
   ``--budget-gb`` and the memory available: it holds, for every dense layer under
   :data:`gradaudit.propagation.ops.chunked.CHUNKED_ABOVE` weights, a float64 (C_out x
   C_in) matrix of squared weights (8 bytes per weight, per layer, shared draws or not;
   bigger layers keep only the weight), so that estimate is printed instead when it
   does not.

A reduced-depth run of a configuration is the full audit at a depth that fits. A stage
whose memory the machine does not have available now is reported and not run.

The audit's small tensor work runs on one thread; its passes over the big weights run
on the process's torch threads (``--threads``, default this machine's CPUs:
:mod:`gradaudit.serial`).

    python benchmarks/bench_meta.py [--seq 128] [--budget-gb 8] [--only 7b,70b,moe] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CONFIGS = {
    "70b": ("Llama-2-70B shape (80 layers, 8192, 28672, 64/8 heads)", "llama",
            dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000)),
    "7b": ("Llama-2-7B shape (32 layers, 4096, 11008, 32 heads)", "llama",
           dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)),
    "7b-2": ("Llama-2-7B shape at 2 layers (full audit)", "llama",
             dict(num_hidden_layers=2, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)),
    "moe": ("Mixtral-8x7B shape (32 layers, 8 experts, top 2)", "mixtral",
            dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)),
}

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    family, seq, budget = sys.argv[1], int(sys.argv[3]), float(sys.argv[4]) * 2**30
    torch.set_num_threads(int(sys.argv[5]))
    kwargs = json.loads(sys.argv[2])

    def report(stage, t0, **extra):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        global c0
        cpu, c0 = time.process_time() - c0, time.process_time()
        print(json.dumps({"stage": stage, "seconds": time.perf_counter() - t0, "cpu": cpu, "peak_gb": rss, **extra}),
              flush=True)

    c0 = time.process_time()
    t0 = time.perf_counter()
    import transformers
    cls, cfg_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "mixtral": ("MixtralForCausalLM", "MixtralConfig")}[family]
    with torch.device("meta"):
        model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kwargs))
    params = sum(p.numel() for p in model.parameters())
    report("build on meta", t0, params=params)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    layers = len(model.model.layers)
    standin = (params - (layers - 1) * layer) * 4 if layers > 1 else params * 4
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    if standin + 2**30 > available:
        print(json.dumps({"stage": "stand-in", "no_room": standin / 2**30, "available": available / 2**30}))
        sys.exit(0)
    from gradaudit.api import Settings, analyse, build_report, capture, run_rules
    from gradaudit.frontends import meta
    from gradaudit.frontends.signature import ExampleCall
    from gradaudit.propagation import coverage
    from gradaudit.rules.base import all_rules
    c0, t0 = time.process_time(), time.perf_counter()
    shadow = meta.stand_in(model)
    held = sum(s.untyped_storage().nbytes() for s in {p.data_ptr(): p for p in shadow.parameters()}.values())
    report("stand-in", t0, held_gb=held / 2**30)
    inputs = ExampleCall.of({"input_ids": torch.zeros(1, seq, dtype=torch.int64)})
    t0 = time.perf_counter()
    graph = capture(shadow, inputs)
    report("capture", t0, frontend=graph.frontend, nodes=len(graph.nodes))
    from gradaudit.propagation.ops import chunked
    need = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p.numel() < chunked.CHUNKED_ABOVE) * 8
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    if need > min(budget, available - 2**30):
        print(json.dumps({"stage": "propagation", "skipped": need / 2**30}), flush=True)
    else:
        t0 = time.perf_counter()
        analysis = analyse(graph, inputs, None, Settings())
        analysis.coverage = coverage.check(analysis, model_has_parameters=True)
        findings = run_rules(analysis, set(all_rules()))
        rep = build_report(analysis, findings, target=cls, input_source="given", inputs=inputs)
        report("propagation + rules + report", t0, verdict=rep.verdict)
    assert all(p.is_meta for p in model.parameters())
""")


def run(key: str, seq: int, budget: float, threads: int) -> list[dict]:
    label, family, kwargs = CONFIGS[key]
    proc = subprocess.run([sys.executable, "-c", _CHILD, family, json.dumps(kwargs), str(seq), str(budget), str(threads)],
                          capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        rows.append({"stage": "failed", "error": last})
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--only", default="7b-2,7b,70b,moe")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the median is printed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the audited process (default: this machine's CPUs)")
    args = parser.parse_args()
    print(f"meta-device audits, one sequence of {args.seq} tokens, {args.threads} thread(s), "
          f"{'one run each' if args.repeat == 1 else f'median of {args.repeat} runs each'} "
          f"(wall time per stage, CPU time, peak RSS of the process so far):")
    for key in args.only.split(","):
        runs = [run(key, args.seq, args.budget_gb, args.threads) for _ in range(args.repeat)]
        rows = runs[0]
        print(f"  {CONFIGS[key][0]}")
        total = 0.0
        for i, r in enumerate(rows):
            if r["stage"] == "failed":
                print(f"    failed: {r['error']}")
            elif "no_room" in r:
                print(f"    stand-in not built: it needs {r['no_room']:.1f} GB and {r['available']:.1f} GB are "
                      "available on this shared machine now")
            elif "skipped" in r:
                print(f"    propagation not run: its float64 weight matrices would hold {r['skipped']:.0f} GB "
                      f"(budget {args.budget_gb:.0f} GB)")
            else:
                same = [rs[i] for rs in runs if i < len(rs) and rs[i].get("stage") == r["stage"]]
                seconds = _median([x["seconds"] for x in same])
                cpu = _median([x.get("cpu", 0.0) for x in same])
                peak = _median([x["peak_gb"] for x in same])
                total += seconds
                extra = {k: v for k, v in r.items() if k not in ("stage", "seconds", "cpu", "peak_gb")}
                note = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
                times = ", ".join(f"{x['seconds']:.1f}" for x in same)
                spread = f" (runs {times})" if len(same) > 1 else ""
                print(f"    {r['stage']:<30} {seconds:>7.1f}s  cpu {cpu:6.1f}s  peak RSS {peak:5.2f} GB  {note}{spread}")
        print(f"    total {total:.1f}s")
    print("targets: 70B shape statically under 60 s and 4 GB peak RSS; 7B in proportion")


if __name__ == "__main__":
    main()
