"""Where a train step's time goes on an accelerator: profile a few steps, then sum device time per kernel.

Builds the same AdamW MLM step as ``bench_throughput.py`` (model spec syntax included), runs it under
``jax.profiler`` and prints the kernels that take the most device time, grouped by XLA op name.

    python benchmarks/profile_step.py --model narrowbert-base --dtype bfloat16 --attention-impl cudnn \\
        --attention-dropout 0 --batch 128 --length 128
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from bench_throughput import ROWS, _prng, flax_train, model_config  # noqa: E402


def device_kernel_times(trace_dir: str, host: bool = False) -> tuple[dict[str, float], float]:
    """Sum of device-side event durations (µs) per name, from the profiler's Chrome-trace JSON. ``host``: the
    CPU backend's events instead (XLA:CPU runs the program's ops on host threads)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(sorted(files)[-1]) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {
        pid for pid, n in names.items() if ("/host:CPU" in n if host else "/device:" in n and "CPU" not in n)
    }
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            name = e.get("name", "?")
            if host:  # keep XLA's ops (grouped by kind: "fusion.12" -> "fusion"), not Python frames or waits
                if name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
                    continue
                name = re.sub(r"\.\d+$", "", name)
            totals[name] += float(e.get("dur", 0))
    return totals, sum(totals.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-impl", default="xla")
    p.add_argument("--attention-dropout", type=float, default=None)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    over = dict(dtype=args.dtype, attention_impl=args.attention_impl)
    if args.attention_dropout is not None:
        over["attention_probs_dropout_prob"] = args.attention_dropout
    cfg = model_config(args.model, over)
    rows = ROWS.get(args.length, max(1, round(0.15 * args.length)))
    run, compile_s, *_ = flax_train(cfg, args.batch, args.length, rows, _prng(args.model))
    for _ in range(3):
        jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.steps):
                out = run()
            jax.block_until_ready(out)
        totals, total = device_kernel_times(d, host=jax.devices()[0].platform == "cpu")
    print(
        f"# {args.model} B={args.batch} L={args.length} P={rows} {args.dtype} attention={args.attention_impl}: "
        f"device time {total / args.steps / 1e3:.2f} ms/step over {args.steps} steps (compile {compile_s:.1f} s)"
    )
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{us / args.steps / 1e3:8.3f} ms  {100 * us / total:5.1f}%  {name[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
