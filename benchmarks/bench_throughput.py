"""Train-step and inference throughput: flax-narrow BERT / BORT / NarrowBERT vs PyTorch transformers.

All workloads of one invocation are built and warmed up first, then timed round-robin (one step of each per
round, ``--rounds`` rounds), so every ratio is measured in one run under the same conditions; the table reports
the fastest and the median round of each workload. Training steps use dropout 0.1 and AdamW on both sides.

    python benchmarks/bench_throughput.py --lengths 128 --batch 8                  # train steps, L=128, P=20
    python benchmarks/bench_throughput.py --lengths 512 --batch 2                  # train steps, L=512, P=80
    python benchmarks/bench_throughput.py --mode infer --lengths 512 --batch 4     # CLS-path inference
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from flops import forward_flops, train_step_flops  # noqa: E402

import flax_narrow as fn  # noqa: E402

ROWS = {128: 20, 512: 80}  # the MLM prediction budget P per length
PRESETS = {
    "bert-base": fn.EncoderConfig.bert_base,
    "narrowbert-base": fn.EncoderConfig.narrowbert_base,
    "bort": fn.EncoderConfig.bort,
}


def _batch(cfg, batch, length, rows, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, min(cfg.vocab_size, 30000), size=(batch, length)).astype(np.int32)
    pos = np.sort(np.stack([rng.choice(np.arange(1, length), rows, replace=False) for _ in range(batch)]), 1)
    return ids, pos.astype(np.int32), np.take_along_axis(ids, pos, 1)


def flax_train(cfg, batch, length, rows):
    """An AOT-compiled, donated AdamW step on the MLM loss of the P rows (dropout on)."""
    model = fn.BertForMaskedLM.from_config(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adamw(1e-4)

    def step(params, opt_state, rest, ids, pos, labels):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss = m(ids, narrow_positions=pos, labels=labels, deterministic=False).loss
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    ids, pos, labels = _batch(cfg, batch, length, rows)
    state = [params, opt.init(params), rest]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, ids, pos, labels).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0

    def run():
        *state[:], loss = compiled(*state, ids, pos, labels)
        return jax.block_until_ready(loss)

    return run, f"AOT compile {compile_s:.1f}s, XLA temp {temp / 2**20:.0f} MiB"


def flax_infer_cls(cfg, batch, length):
    """Sequence-classification forward: the CLS path for NarrowBERT (narrow layers on one row)."""
    model = fn.BertForSequenceClassification.from_config(cfg.replace(num_labels=3))
    graphdef, state = nnx.split(model)
    ids, _, _ = _batch(cfg, batch, length, 1)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits).lower(state, ids).compile()
    note = f"AOT compile {time.perf_counter() - t0:.1f}s"
    return (lambda: jax.block_until_ready(compiled(state, ids))), note


def torch_train(cfg, batch, length, rows, compile_: bool):
    """transformers BertForMaskedLM as users run it: logits for every token, labels -100 elsewhere, AdamW."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf_config())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, pos, labels_p = _batch(cfg, batch, length, rows)
    labels = np.full(ids.shape, -100, np.int64)
    np.put_along_axis(labels, pos, labels_p, 1)
    ids_t, labels_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels)
    fwd = torch.compile(model) if compile_ else model

    def run():
        opt.zero_grad(set_to_none=True)
        loss = fwd(input_ids=ids_t, labels=labels_t).loss
        loss.backward()
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    run()
    return run, f"first step {time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads"


def torch_infer_cls(cfg, batch, length):
    import torch
    import transformers

    hf = transformers.BertConfig(**cfg.to_hf_config())
    hf.num_labels = 3
    model = transformers.BertForSequenceClassification(hf).eval()
    ids_t = torch.from_numpy(_batch(cfg, batch, length, 1)[0].astype(np.int64))

    def run():
        with torch.no_grad():
            return model(input_ids=ids_t).logits

    return run, f"{torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--lengths", default="128", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (one step of every workload each)")
    p.add_argument("--models", default="bert-base,narrowbert-base,bort")
    p.add_argument("--torch", default="eager,compile", help="PyTorch baselines: eager,compile or none")
    p.add_argument("--narrow-attention", default="auto", choices=["auto", "standard", "absorbed"])
    args = p.parse_args(argv)

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.machine()} {os.cpu_count()} cores "
        f"| jax {jax.__version__} ({jax.devices()[0].platform}) | batch {args.batch}, fp32 | load average at start "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"# command: python benchmarks/bench_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    table = []
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = ROWS.get(length, max(1, round(0.15 * length)))
        work = {}  # name -> (callable, flops per call, rows computed, note)
        for name in args.models.split(","):
            cfg = PRESETS[name](narrow_attention=args.narrow_attention)
            if args.mode == "train":
                run, note = flax_train(cfg, args.batch, length, rows)
                work[f"flax-narrow {name}"] = (run, train_step_flops(cfg, args.batch, length, rows), rows, note)
            else:
                run, note = flax_infer_cls(cfg, args.batch, length)
                flops = forward_flops(cfg, args.batch, length, 1 if cfg.is_narrow else None, "cls")
                work[f"flax-narrow {name} (CLS)"] = (run, flops, 1 if cfg.is_narrow else length, note)
        base = fn.EncoderConfig.bert_base()
        for kind in [k for k in args.torch.split(",") if k and k != "none"]:
            if args.mode == "train":
                run, note = torch_train(base, args.batch, length, rows, kind == "compile")
                flops = train_step_flops(base, args.batch, length, None)  # dense logits: every row
                work[f"transformers BERT-base ({kind})"] = (run, flops, length, note)
            elif kind == "eager":
                run, note = torch_infer_cls(base, args.batch, length)
                flops = forward_flops(base, args.batch, length, None, "cls")
                work["transformers BERT-base (eager)"] = (run, flops, length, note)
        times = {k: [] for k in work}
        for run, *_rest in work.values():  # warm-up
            run()
        for _ in range(args.rounds):
            for k, (run, *_rest) in work.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        for k, (_, flops, nrows, note) in work.items():
            med = statistics.median(times[k])
            table.append((k, length, nrows, args.batch / best[k], args.batch / med, flops / best[k] / 1e9, note))
        ref = next((k for k in work if "bert-base" in k and k.startswith("flax")), None)
        for k in work:
            if ref and k != ref:
                print(f"L={length}: {k} / {ref} = {best[ref] / best[k]:.2f}x  (speed ratio, best rounds)")
        for k in [k for k in work if k.startswith("transformers")]:
            for f in [f for f in work if f.startswith("flax") and ("bert-base" in f or "narrowbert" in f)]:
                print(f"L={length}: {f} / {k} = {best[k] / best[f]:.2f}x")
    print("\n| workload | L | rows | seq/s (best) | seq/s (median) | GFLOP/s (analytic, best) | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
