"""Conversion benchmark: time and peak memory of ``flax-narrow convert`` on a full-size BORT checkpoint.

The checkpoint is written the way the hub's ``amazon/bort`` is stored (``flax_narrow.convert.parity_demo``): a
transformers ``BertForMaskedLM`` with BORT's shape (hidden 1024, 4 layers, 8 heads, FFN 768, vocab 50265; 76.2M
parameters), fp16 ``pytorch_model.bin`` holding a stale untied decoder copy. Each measurement is a fresh process,
exactly as a user runs it; its peak RSS comes from ``wait4`` (the child's own ``ru_maxrss``). A process that only
imports what the CLI imports gives the baseline (interpreter + jax + flax + torch), so the figure attributable to
the conversion is ``peak - baseline``.

Usage::

    .venv/bin/python benchmarks/bench_convert.py [--repeat 3] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

IMPORTS_ONLY = (
    "import torch, flax_narrow.cli; from flax_narrow.convert import cli, conversion, sources; "
    "cli.register; conversion.convert_checkpoint"
)


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return wall, usage.ru_maxrss * 1024, proc.returncode


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="bench-convert-")
    src = os.path.join(work, "bort-hf")
    if not os.path.isfile(os.path.join(src, "pytorch_model.bin")):
        # In a child process: Linux carries a parent's peak RSS into its children's ru_maxrss across fork+exec,
        # so this process stays small (stdlib only) for the measurements to be the children's own.
        code = (
            "from flax_narrow.convert.parity_demo import write_bort_like_checkpoint as w; import sys; "
            "w(sys.argv[1], hidden=1024)"
        )
        subprocess.run([sys.executable, "-c", code, src], check=True)
    size = os.path.getsize(os.path.join(src, "pytorch_model.bin"))
    exe = os.path.join(os.path.dirname(sys.executable), "flax-narrow")

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "load_average_at_start": os.getloadavg()[0],
        "checkpoint": "BORT-shaped BertForMaskedLM fp16 pytorch_model.bin with a stale decoder copy",
        "checkpoint_bytes": size,
    }
    base = [run_measured([sys.executable, "-c", IMPORTS_ONLY]) for _ in range(args.repeat)]
    results["baseline_import_s"] = min(b[0] for b in base)
    results["baseline_rss_bytes"] = min(b[1] for b in base)
    cases = {
        "convert (fp32 storage, default)": [],
        "convert --storage-dtype float16": ["--storage-dtype", "float16"],
    }
    for name, extra in cases.items():
        runs = []
        for i in range(args.repeat):
            dst = os.path.join(work, f"out-{i}")
            shutil.rmtree(dst, ignore_errors=True)
            runs.append(run_measured([exe, "convert", src, dst, *extra]))
            out_bytes = os.path.getsize(os.path.join(dst, "flax_model.safetensors"))
            shutil.rmtree(dst)
        walls = sorted(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        results[name] = {
            "command": f"flax-narrow convert SRC DST {' '.join(extra)}".strip(),
            "wall_s_min": walls[0],
            "wall_s_median": walls[len(walls) // 2],
            "peak_rss_bytes": peak,
            "peak_rss_over_checkpoint": peak / size,
            "peak_minus_baseline_bytes": peak - results["baseline_rss_bytes"],
            "peak_minus_baseline_over_checkpoint": (peak - results["baseline_rss_bytes"]) / size,
            "output_bytes": out_bytes,
        }
    # In-process (a notebook): imports already paid, conversion only.
    code = (
        "import sys, time; import torch; from flax_narrow.convert.conversion import convert_checkpoint; "
        "t = time.perf_counter(); convert_checkpoint(sys.argv[1], sys.argv[2]); print(time.perf_counter() - t)"
    )
    inproc = []
    for i in range(args.repeat):
        dst = os.path.join(work, f"inproc-{i}")
        shutil.rmtree(dst, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", code, src, dst], check=True, capture_output=True, text=True)
        inproc.append(float(out.stdout.strip().splitlines()[-1]))
        shutil.rmtree(dst)
    results["in_process_convert_s_min"] = min(inproc)
    results["in_process_convert_s_median"] = sorted(inproc)[len(inproc) // 2]
    results["load_average_at_end"] = os.getloadavg()[0]
    mib = 2**20
    print(f"checkpoint: {size / mib:.1f} MiB ({results['checkpoint']})")
    print(
        f"baseline (imports only): {results['baseline_import_s']:.2f} s, "
        f"peak RSS {results['baseline_rss_bytes'] / mib:.0f} MiB"
    )
    for name in cases:
        r = results[name]
        print(
            f"{name}: wall {r['wall_s_min']:.2f} s (median {r['wall_s_median']:.2f} s), peak RSS "
            f"{r['peak_rss_bytes'] / mib:.0f} MiB = {r['peak_rss_over_checkpoint']:.2f}x checkpoint; "
            f"above baseline {r['peak_minus_baseline_bytes'] / mib:.0f} MiB = "
            f"{r['peak_minus_baseline_over_checkpoint']:.2f}x; output {r['output_bytes'] / mib:.0f} MiB"
        )
    print(
        f"in-process convert_checkpoint (imports already done): {results['in_process_convert_s_min']:.2f} s "
        f"(median {results['in_process_convert_s_median']:.2f} s)"
    )
    print(f"load average: {results['load_average_at_start']:.2f} at start, {results['load_average_at_end']:.2f} at end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
