"""Train-step and inference throughput: flax-narrow BERT / BORT / NarrowBERT vs PyTorch transformers.

Every workload of one invocation runs in the same process, one after another, so the ratios it prints are
measured in one run on one machine. Prints a markdown table; copy it into RESULTS.md with the command.

    python benchmarks/bench_throughput.py --lengths 128 --batch 8            # train steps at L=128, P=20
    python benchmarks/bench_throughput.py --mode infer --lengths 512 --batch 4   # CLS-path inference
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from flops import forward_flops, train_step_flops  # noqa: E402

import flax_narrow as fn  # noqa: E402

ROWS = {128: 20, 512: 80}  # the MLM prediction budget P per length (15% rounded as in BERT's recipe)

PRESETS = {
    "bert-base": lambda **kw: fn.EncoderConfig.bert_base(**kw),
    "narrowbert-base": lambda **kw: fn.EncoderConfig.narrowbert_base(**kw),
    "bort": lambda **kw: fn.EncoderConfig.bort(**kw),
}


def _batch(cfg, batch, length, rows, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, min(cfg.vocab_size, 30000), size=(batch, length)).astype(np.int32)
    pos = np.sort(np.stack([rng.choice(np.arange(1, length), rows, replace=False) for _ in range(batch)]), 1)
    labels = np.take_along_axis(ids, pos, 1)
    return ids, pos.astype(np.int32), labels


def time_fn(fn_, args, steps, warmup=2):
    for _ in range(warmup):
        out = fn_(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn_(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps, out


def flax_train(cfg, batch, length, rows, steps):
    """One jitted AdamW step on the MLM loss of the P rows. Returns (s/step, compile s, compiles, temp bytes)."""
    model = fn.BertForMaskedLM.from_config(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adamw(1e-4)
    opt_state = opt.init(params)

    def step(params, opt_state, ids, pos, labels):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return m(ids, narrow_positions=pos, labels=labels).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids, pos, labels = _batch(cfg, batch, length, rows)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, ids, pos, labels).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], ids, pos, labels)
        return loss

    sec, _ = time_fn(lambda: run(), (), steps)
    return sec, compile_s, jitted._cache_size(), temp


def flax_infer_cls(cfg, batch, length, steps):
    """Sequence classification forward (CLS path for NarrowBERT)."""
    model = fn.BertForSequenceClassification.from_config(cfg.replace(num_labels=3))
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    ids, _, _ = _batch(cfg, batch, length, 1)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, ids))
    compile_s = time.perf_counter() - t0
    sec, _ = time_fn(fwd, (state, ids), steps)
    return sec, compile_s


def torch_train(cfg, batch, length, rows, steps, compile_: bool):
    """transformers BertForMaskedLM as users run it: logits for every token, labels -100 elsewhere, AdamW."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertConfig(**cfg.to_hf_config())
    model = transformers.BertForMaskedLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, pos, labels_p = _batch(cfg, batch, length, rows)
    labels = np.full(ids.shape, -100, np.int64)
    np.put_along_axis(labels, pos, labels_p, 1)
    ids_t, labels_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels)
    fwd = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd(input_ids=ids_t, labels=labels_t).loss
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, first_s


def torch_infer_cls(cfg, batch, length, steps):
    import torch
    import transformers

    hf = transformers.BertConfig(**cfg.to_hf_config(), num_labels=3)
    model = transformers.BertForSequenceClassification(hf).eval()
    ids, _, _ = _batch(cfg, batch, length, 1)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        model(input_ids=ids_t)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids_t)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--lengths", default="128", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="bert-base,narrowbert-base,bort")
    p.add_argument("--torch", default="eager,compile", help="PyTorch baselines to run: eager,compile or none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--narrow-attention", default="auto", choices=["auto", "standard", "absorbed"])
    args = p.parse_args(argv)

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} cores | jax {jax.__version__} {jax.devices()[0].platform} | batch {args.batch}, "
        f"{args.dtype}"
    )
    print(f"# command: python benchmarks/{os.path.basename(__file__)} {' '.join(argv or sys.argv[1:])}")
    rows_out = []
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = ROWS.get(length, max(1, round(0.15 * length)))
        results = {}
        for name in args.models.split(","):
            cfg = PRESETS[name](dtype=args.dtype, narrow_attention=args.narrow_attention)
            if args.mode == "train":
                sec, comp, count, temp = flax_train(cfg, args.batch, length, rows, args.steps)
                flops = train_step_flops(cfg, args.batch, length, rows)
                results[name] = args.batch / sec
                rows_out.append(
                    (
                        f"flax-narrow {name}",
                        length,
                        rows,
                        args.batch / sec,
                        flops / sec / 1e9,
                        f"compile {comp:.1f}s x{count}, temp {temp / 2**20:.0f} MiB",
                    )
                )
            else:
                sec, comp = flax_infer_cls(cfg, args.batch, length, args.steps)
                flops = forward_flops(cfg, args.batch, length, 1 if cfg.is_narrow else None, "cls")
                results[name] = args.batch / sec
                rows_out.append(
                    (
                        f"flax-narrow {name} (CLS)",
                        length,
                        1,
                        args.batch / sec,
                        flops / sec / 1e9,
                        f"compile {comp:.1f}s",
                    )
                )
            print("  ", rows_out[-1], flush=True)
        base = fn.EncoderConfig.bert_base()
        for kind in [k for k in args.torch.split(",") if k and k != "none"]:
            if args.mode == "train":
                sec, first = torch_train(base, args.batch, length, rows, args.steps, kind == "compile")
                results[f"torch-{kind}"] = args.batch / sec
                rows_out.append(
                    (
                        f"transformers BertForMaskedLM ({kind}, dense logits)",
                        length,
                        length,
                        args.batch / sec,
                        train_step_flops(base, args.batch, length, None) / sec / 1e9,
                        f"first step {first:.1f}s",
                    )
                )
            elif kind == "eager":
                sec = torch_infer_cls(base, args.batch, length, args.steps)
                results["torch-eager"] = args.batch / sec
                rows_out.append(
                    (
                        "transformers BertForSequenceClassification (eager)",
                        length,
                        length,
                        args.batch / sec,
                        forward_flops(base, args.batch, length, None, "cls") / sec / 1e9,
                        "",
                    )
                )
            print("  ", rows_out[-1], flush=True)
        if "bert-base" in results:
            for k, v in results.items():
                print(f"ratio L={length}: {k} / flax-narrow bert-base = {v / results['bert-base']:.2f}x")
        for k in ("torch-eager", "torch-compile"):
            for name in ("bert-base", "narrowbert-base"):
                if k in results and name in results:
                    print(f"ratio L={length}: flax-narrow {name} / {k} = {results[name] / results[k]:.2f}x")
    print("\n| workload | L | rows | seq/s | GFLOP/s (analytic) | notes |\n|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} | {r[5]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
