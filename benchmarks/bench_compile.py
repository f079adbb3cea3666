"""Compile time and compiled memory of the train step: layer loop vs ``scan_layers``, and remat policies.

Compiles (does not run) the AdamW MLM step of ``bench_throughput.py`` for each model variant and prints the
AOT compile time and XLA's memory analysis (arguments + temporaries: activations kept for the backward pass
live in the temporaries).

    python benchmarks/bench_compile.py --models bert-large,bert-large:scan_layers=true,\\
bert-large:scan_layers=true/remat_policy=full --batch 8 --length 128
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from bench_throughput import ROWS, flax_train, model_config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert-large,bert-large:scan_layers=true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.machine()} {os.cpu_count()} cores | "
        f"jax {jax.__version__} on {dev.device_kind} | load average {os.getloadavg()[0]:.1f}\n"
        f"# command: python benchmarks/bench_compile.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
    )
    print("| model | compile s | XLA memory (args + temp) | notes |\n|---|---|---|---|")
    rows = ROWS.get(args.length, max(1, round(0.15 * args.length)))
    for spec in args.models.split(","):
        cfg = model_config(spec, {"dtype": args.dtype})
        _, compile_s, mem_mib, note = flax_train(cfg, args.batch, args.length, rows)
        print(f"| {spec} | {compile_s:.1f} | {mem_mib:.0f} MiB | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
