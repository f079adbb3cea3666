"""flax-narrow against the NarrowBERT authors' own PyTorch code (and flax BERT against transformers eager), on CPU.

Every workload runs in a worker process of its own — the authors' code under their pin (transformers 4.28.1) in
a separate virtualenv, flax-narrow variants with their own ``XLA_FLAGS`` — and this script times them
alternately: in each round every workload runs ``--steps`` steps while the others wait, so all ratios come
from one run under the same conditions. Same shapes, same batches (the same seeds as
``bench_throughput.py``), same thread count (XLA:CPU and torch both use every core). The report gives per
workload the median and spread over rounds, and per pair the median of the per-round ratios.

Their code is not vendored and not on PyPI: clone it, then build its environment once::

    git clone https://github.com/lihaoxin2020/narrowbert /tmp/narrowbert-authors
    python benchmarks/bench_authors.py --setup                  # venv with transformers==4.28.1 + torch
    python benchmarks/bench_authors.py --authors-repo /tmp/narrowbert-authors --rounds 7 \\
        --json benchmarks/results/cpu-2026-12-01/authors.json

Workloads (``--workloads``): ``train128`` (NarrowBERT-base MLM train step, L=128, B=8, P=20, AdamW, dropout
0.1), ``cls512`` (sequence-classification inference, L=512, B=4), ``bert128`` (flax BERT-base vs
transformers eager ``BertForMaskedLM`` in this project's environment, train step L=128, B=8, P=20).
``--variant NAME=SPEC`` adds flax-narrow variants timed in the same rounds; SPEC is ``/``-separated
``field=value`` EncoderConfig overrides, ``prng=rbg`` and ``xla=FLAGS`` (e.g.
``xnn=xla:--xla_cpu_experimental_xnn_fusion_type=dot``; ``:`` after ``xla`` keeps ``=`` in the flags), and
``@train128,bert128`` at the end limits a variant to some workloads. ``--cpus 0`` pins every worker to core 0
(torch then runs one thread; XLA:CPU has the one core): a check that is less sensitive to other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "flax-narrow", "bench-authors-venv")
AUTHORS_PIN = ["transformers==4.28.1", "torch==2.13.0", "numpy<2.5"]
N_BATCHES = 4
SHAPES = {"train128": ("train", 128, 8, 20), "cls512": ("cls", 512, 4, 20), "bert128": ("train", 128, 8, 20)}


def batches(vocab: int, batch: int, length: int, rows: int):
    """The same (ids, positions, labels at positions) as ``bench_throughput._batches``, as numpy arrays."""
    import numpy as np

    out = []
    for seed in range(N_BATCHES):
        rng = np.random.default_rng(seed)
        ids = rng.integers(min(1000, vocab // 2), min(vocab, 30000), size=(batch, length)).astype(np.int32)
        pos = np.sort(np.stack([rng.choice(np.arange(1, length), rows, replace=False) for _ in range(batch)]), 1)
        pos = pos.astype(np.int32)
        out.append((ids, pos, np.take_along_axis(ids, pos, 1)))
    return out


# ------------------------------------------------------------------------------------------------ workers
def _torch_batches(torch, vocab, batch, length, rows):
    import numpy as np

    out = []
    for ids, pos, lab in batches(vocab, batch, length, rows):
        labels = np.full(ids.shape, -100, np.int64)
        np.put_along_axis(labels, pos, lab, 1)
        out.append((torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels)))
    return out


def authors_workload(repo: str, kind: str, length: int, batch: int, rows: int):
    """The authors' NarrowBertForMaskedLM train step / NarrowBertForSequenceClassification forward."""
    import torch

    sys.path.insert(0, repo)
    from narrowbert import NarrowBertConfig, NarrowBertForMaskedLM, NarrowBertForSequenceClassification

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = NarrowBertConfig(full_length_layers=2, num_labels=3)
    data = _torch_batches(torch, cfg.vocab_size, batch, length, rows)
    i = [0]
    if kind == "train":
        model = NarrowBertForMaskedLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            ids, labels = data[i[0] % N_BATCHES]
            i[0] += 1
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            return loss

    else:
        model = NarrowBertForSequenceClassification(cfg).eval()

        def run():
            i[0] += 1
            with torch.no_grad():
                return model(input_ids=data[i[0] % N_BATCHES][0]).logits

    import transformers

    return run, f"authors' code, transformers {transformers.__version__}, torch {torch.__version__}, " + (
        f"{torch.get_num_threads()} threads"
    )


def project_workload(name: str, spec: str, kind: str, length: int, batch: int, rows: int):
    """A flax-narrow workload from bench_throughput (``spec``: its model string), or transformers eager."""
    sys.path.insert(0, HERE)
    import bench_throughput as bt

    if name == "transformers-eager":
        import torch
        import transformers

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        run, *_ = bt.torch_train(bt.PRESETS["bert-base"](), batch, length, rows, False, "float32")
        return run, f"transformers {transformers.__version__} eager, torch {torch.get_num_threads()} threads"
    cfg = bt.model_config(spec, {})
    if kind == "train":
        run, compile_s, *_ = bt.flax_train(cfg, batch, length, rows, bt._prng(spec))
    else:
        run, compile_s, *_ = bt.flax_infer(cfg, batch, length, rows, "cls")
    import jax

    return (
        run,
        f"flax-narrow {spec}, jax {jax.__version__}, compile {compile_s:.1f} s, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    )


def _sync(x):
    if hasattr(x, "block_until_ready"):
        x.block_until_ready()
    return x


def worker(role: str, repo: str | None) -> int:
    """Serve JSON-line commands on stdin: {"build": {...}} and {"time": name, "steps": n}."""
    runs = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if "build" in cmd:
                b = cmd["build"]
                t0 = time.perf_counter()
                if role == "authors":
                    run, note = authors_workload(repo, b["kind"], b["length"], b["batch"], b["rows"])
                else:
                    run, note = project_workload(b["name"], b["spec"], b["kind"], b["length"], b["batch"], b["rows"])
                for _ in range(N_BATCHES):  # warm-up: every batch once
                    _sync(run())
                runs[b["key"]] = run
                reply = {"ok": True, "note": note, "setup_s": time.perf_counter() - t0}
            else:
                run = runs[cmd["time"]]
                t0 = time.perf_counter()
                for _ in range(cmd["steps"]):
                    out = run()
                _sync(out)
                reply = {"ok": True, "s": (time.perf_counter() - t0) / cmd["steps"]}
        except Exception as e:  # reported to the parent, which stops
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


class Worker:
    def __init__(self, python: str, role: str, env: dict, repo: str | None, cpus: set[int] | None = None):
        args = [python, os.path.abspath(__file__), "--worker", role]
        if repo:
            args += ["--authors-repo", repo]
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin
        )

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench_authors: a worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise SystemExit(f"bench_authors: worker error: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------------------------------------ driver
def setup(venv: str) -> int:
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", *AUTHORS_PIN], check=True)
    print(f"authors' environment ready: {venv} ({', '.join(AUTHORS_PIN)})")
    return 0


def parse_variant(text: str) -> tuple[str, str, str, set[str] | None]:
    """'name=spec[@workload,...]' -> (name, model-spec items, xla flags, workloads or None for all)."""
    text, _, only = text.partition("@")
    name, _, spec = text.partition("=")
    items, xla = [], ""
    for item in filter(None, spec.split("/")):
        if item.startswith("xla:") or item.startswith("xla="):
            xla = item[4:]
        else:
            items.append(item)
    return name, "/".join(items), xla, (set(only.split(",")) if only else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="build the authors' virtualenv and exit")
    p.add_argument("--authors-venv", default=DEFAULT_VENV)
    p.add_argument("--authors-repo", default=None, help="a clone of github.com/lihaoxin2020/narrowbert")
    p.add_argument("--workloads", default="train128,cls512,bert128")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC", help="extra flax-narrow variants")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="steps of each workload per round")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--cpus", default=None, help="pin every worker to these cores, e.g. 0 (torch then uses that many threads)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.authors_repo)
    if args.setup:
        return setup(args.authors_venv)
    workloads = [w for w in args.workloads.split(",") if w]
    needs_authors = any(w != "bert128" for w in workloads)
    if needs_authors and not (
        args.authors_repo and os.path.isfile(os.path.join(args.authors_repo, "narrowbert", "modeling_narrowbert.py"))
    ):
        raise SystemExit("bench_authors: --authors-repo must be a clone of github.com/lihaoxin2020/narrowbert")
    authors_python = os.path.join(args.authors_venv, "bin", "python")
    if needs_authors and not os.path.exists(authors_python):
        raise SystemExit(f"bench_authors: no authors' environment at {args.authors_venv}; run with --setup first")
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    variants = [("default", "", "", None)] + [parse_variant(v) for v in args.variant]
    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base_env.setdefault("JAX_PLATFORMS", "cpu")
    workers: dict[str, Worker] = {}

    def get_worker(key: str, python: str, role: str, xla: str) -> Worker:
        if key not in workers:
            env = dict(base_env)
            if xla:
                env["XLA_FLAGS"] = xla
            workers[key] = Worker(python, role, env, args.authors_repo if role == "authors" else None, cpus)
        return workers[key]

    entries = []  # (workload, label, key, note)
    times: dict[str, list[float]] = {}
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    for w in workloads:  # one workload at a time (its workers only: memory), its members alternated
        kind, length, batch, rows = SHAPES[w]
        preset = "bert-base" if w == "bert128" else "narrowbert-base"
        members = []
        for vname, items, xla, only in variants:
            if only is not None and w not in only:
                continue
            spec = preset + (":" + items if items else "")
            members.append(
                (f"flax-narrow {vname}", get_worker(f"flax|{xla}", sys.executable, "flax", xla), spec, "flax")
            )
        if w == "bert128":
            members.append(
                ("transformers eager", get_worker("torch", sys.executable, "flax", ""), "", "transformers-eager")
            )
        else:
            members.append(("authors", get_worker("authors", authors_python, "authors", ""), "", "authors"))
        built = []
        for label, wk, spec, name in members:
            key = f"{w}|{label}"
            build = dict(key=key, name=name, spec=spec, kind=kind, length=length, batch=batch, rows=rows)
            reply = wk.ask({"build": build})
            print(f"# built {key}: {reply['note']} ({reply['setup_s']:.1f} s)", flush=True)
            entries.append((w, label, key, reply["note"]))
            built.append((wk, key))
            times[key] = []
        for r in range(args.rounds):
            for wk, key in built:
                times[key].append(wk.ask({"time": key, "steps": args.steps})["s"])
            print(f"# {w}: round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
        for wk in workers.values():
            wk.close()
        workers.clear()
    rows_out, ratios = [], []
    print(
        f"\n# {t_start} | {platform.machine()} {os.cpu_count()} cores | load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end | {args.rounds} rounds x {args.steps} steps, alternated"
    )
    print("| workload | implementation | seq/s (median) | ms/step median | spread (min-max ms) | note |")
    print("|---|---|---|---|---|---|")
    for w, label, key, note in entries:
        ts = times[key]
        batch = SHAPES[w][2]
        med = statistics.median(ts)
        rows_out.append(dict(workload=w, impl=label, seconds=ts, median_s=med, seq_s=batch / med, note=note))
        print(
            f"| {w} | {label} | {batch / med:.2f} | {1e3 * med:.0f} | {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} "
            f"| {note} |"
        )
    for w in workloads:
        ref_label = "transformers eager" if w == "bert128" else "authors"
        ref = times[f"{w}|{ref_label}"]
        for _, label, key, _ in [e for e in entries if e[0] == w and e[1].startswith("flax")]:
            per_round = [a / b for a, b in zip(ref, times[key])]
            text = (
                f"{w}: {label} / {ref_label} = {statistics.median(per_round):.2f}x median of rounds "
                f"(min {min(per_round):.2f}, max {max(per_round):.2f})"
            )
            ratios.append(dict(workload=w, impl=label, ref=ref_label, per_round=per_round))
            print(text)
        base = times.get(f"{w}|flax-narrow default")
        for _, label, key, _ in [
            e for e in entries if e[0] == w and e[1].startswith("flax") and e[1] != "flax-narrow default"
        ]:
            per_round = [a / b for a, b in zip(base, times[key])]
            print(
                f"{w}: {label} / flax-narrow default = {statistics.median(per_round):.2f}x "
                f"(min {min(per_round):.2f}, max {max(per_round):.2f})"
            )
            ratios.append(dict(workload=w, impl=label, ref="flax-narrow default", per_round=per_round))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(
                dict(
                    command="python benchmarks/bench_authors.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    start=t_start,
                    load_start=load0,
                    load_end=os.getloadavg()[0],
                    machine=f"{platform.machine()} {os.cpu_count()} cores",
                    rows=rows_out,
                    ratios=ratios,
                ),
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
