"""Train-step and inference throughput: flax-narrow BERT / BORT / NarrowBERT vs PyTorch transformers.

All workloads of one invocation are built, compiled and warmed up first, then timed round-robin (``--steps``
steps of each per round, ``--rounds`` rounds), so every ratio is measured in one run under the same
conditions; the table reports the fastest and the median round. Each step gets one of four different batches
(different masked positions), and the script counts XLA compilations during the timed rounds (static shapes:
it must be 0). Training steps use AdamW on both sides and dropout 0.1 unless ``--attention-dropout`` says
otherwise (cuDNN attention needs 0 there).

    python benchmarks/bench_throughput.py --lengths 128 --batch 8                  # train steps, L=128, P=20
    python benchmarks/bench_throughput.py --lengths 512 --batch 2                  # train steps, L=512, P=80
    python benchmarks/bench_throughput.py --mode infer-cls --lengths 512 --batch 4 # CLS-path inference
    python benchmarks/bench_throughput.py --mode infer-mlm --lengths 128 --batch 8 # fill-mask inference
    # GPU, bf16 compute, cuDNN attention, MFU against the device's dense bf16 peak:
    python benchmarks/bench_throughput.py --dtype bfloat16 --attention-impl cudnn --attention-dropout 0 \\
        --lengths 128 --batch 256 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import json
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
from flax_narrow.train.flops import peak_flops_per_device  # noqa: E402

ROWS = {128: 20, 512: 80}  # the MLM prediction budget P per length
PRESETS = {
    "bert-base": fn.EncoderConfig.bert_base,
    "narrowbert-base": fn.EncoderConfig.narrowbert_base,
    "bort": fn.EncoderConfig.bort,
    "bert-large": fn.EncoderConfig.bert_large,
    "tiny": fn.EncoderConfig.tiny,  # smoke tests
    "tiny-narrowbert": fn.EncoderConfig.tiny_narrowbert,
}
N_BATCHES = 4
_COMPILES = [0]


def _count_compiles(event: str, _duration: float, **_kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _batches(cfg, batch, length, rows):
    """N_BATCHES different (ids, positions, labels) batches, as device arrays."""
    out = []
    for seed in range(N_BATCHES):
        rng = np.random.default_rng(seed)
        ids = rng.integers(min(1000, cfg.vocab_size // 2), min(cfg.vocab_size, 30000), size=(batch, length))
        ids = ids.astype(np.int32)
        pos = np.sort(np.stack([rng.choice(np.arange(1, length), rows, replace=False) for _ in range(batch)]), 1)
        pos = pos.astype(np.int32)
        out.append(tuple(jax.device_put(a) for a in (ids, pos, np.take_along_axis(ids, pos, 1))))
    return out


def model_config(spec: str, overrides: dict):
    """``preset`` or ``preset:field=value/field=value`` (EncoderConfig fields), e.g.
    ``bert-base:vocab_pad_multiple=128/attention_impl=cudnn`` — variants of one model timed in the same run."""
    preset, _, extra = spec.partition(":")
    kw = dict(overrides)
    for item in filter(None, extra.split("/")):
        if item.startswith("prng="):  # not a config field: the PRNG implementation of the model's Rngs
            continue
        key, _, value = item.partition("=")
        try:
            kw[key] = json.loads(value)  # numbers, true/false
        except json.JSONDecodeError:
            kw[key] = value  # names: cudnn, dots, bfloat16, ...
    return PRESETS[preset](**kw)


def _memory(compiled) -> tuple[str, float]:
    mem = compiled.memory_analysis()
    if mem is None:
        return "", 0.0
    args = getattr(mem, "argument_size_in_bytes", 0) / 2**20
    temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20
    return f"XLA args {args:.0f} MiB + temp {temp:.0f} MiB", args + temp


def _prng(spec: str) -> str:
    return next((i[5:] for i in spec.partition(":")[2].split("/") if i.startswith("prng=")), "threefry2x32")


def build(model_cls, cfg, prng: str):
    """``model_cls.from_config`` with its dropout keys made by the given PRNG implementation."""
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", prng)
    try:
        return model_cls.from_config(cfg)
    finally:
        jax.config.update("jax_default_prng_impl", before)


def flax_train(cfg, batch, length, rows, prng="threefry2x32"):
    """An AOT-compiled, donated AdamW step on the MLM loss of the P rows."""
    model = build(fn.BertForMaskedLM, cfg, prng)
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

    batches = _batches(cfg, batch, length, rows)
    state = [params, opt.init(params), rest]
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    t0 = time.perf_counter()
    compiled = jitted.lower(*state, *batches[0]).compile()
    compile_s = time.perf_counter() - t0
    mem_note, mem_mib = _memory(compiled)
    i = [0]

    def run():
        *state[:], loss = jitted(*state, *batches[i[0] % N_BATCHES])
        i[0] += 1
        return loss

    return run, compile_s, mem_mib, mem_note


def flax_infer(cfg, batch, length, rows, head):
    """Forward only: 'cls' = sequence classification (NarrowBERT: narrow layers on the CLS row);
    'mlm' = fill-mask logits on the P selected rows."""
    if head == "cls":
        model = fn.BertForSequenceClassification.from_config(cfg.replace(num_labels=3))
    else:
        model = fn.BertForMaskedLM.from_config(cfg)
    graphdef, state = nnx.split(model)
    batches = _batches(cfg, batch, length, rows)

    def fwd(state, ids, pos):
        m = nnx.merge(graphdef, state)
        return m(ids).logits if head == "cls" else m(ids, narrow_positions=pos).logits

    jitted = jax.jit(fwd)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, *batches[0][:2]).compile()
    compile_s = time.perf_counter() - t0
    mem_note, mem_mib = _memory(compiled)
    i = [0]

    def run():
        i[0] += 1
        return jitted(state, *batches[i[0] % N_BATCHES][:2])

    return run, compile_s, mem_mib, mem_note


def _torch_setup(cfg, batch, length, rows, dtype, head):
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertConfig(**cfg.to_hf_config())
    hf.num_labels = 3
    cls = transformers.BertForSequenceClassification if head == "cls" else transformers.BertForMaskedLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cls(hf).to(device)
    batches = []
    for ids, pos, labels_p in _batches(cfg, batch, length, rows):
        ids, pos, labels_p = (np.asarray(a) for a in (ids, pos, labels_p))
        labels = np.full(ids.shape, -100, np.int64)
        np.put_along_axis(labels, pos, labels_p, 1)
        batches.append((torch.from_numpy(ids.astype(np.int64)).to(device), torch.from_numpy(labels).to(device)))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return torch, model, batches, autocast, device


def torch_train(cfg, batch, length, rows, compile_: bool, dtype: str):
    """transformers BertForMaskedLM as users run it: logits for every token, labels -100 elsewhere, AdamW."""
    torch, model, batches, autocast, device = _torch_setup(cfg, batch, length, rows, dtype, "mlm")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compile_ else model
    i = [0]

    def run():
        ids, labels = batches[i[0] % N_BATCHES]
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = fwd(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        return loss

    return _torch_first(torch, run, device)


def torch_infer(cfg, batch, length, rows, compile_: bool, dtype: str, head: str):
    torch, model, batches, autocast, device = _torch_setup(cfg, batch, length, rows, dtype, head)
    model.eval()
    fwd = torch.compile(model) if compile_ else model
    i = [0]

    def run():
        i[0] += 1
        with torch.no_grad(), autocast:
            return fwd(input_ids=batches[i[0] % N_BATCHES][0]).logits

    return _torch_first(torch, run, device)


def _torch_first(torch, run, device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _sync(run())
    first = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    note = f"{device}, {torch.get_num_threads()} threads" if device == "cpu" else f"peak allocated {mem:.0f} MiB"
    return run, first, mem, note


def _sync(x):
    if hasattr(x, "block_until_ready") or isinstance(x, (tuple, list)):
        return jax.block_until_ready(x)
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--mode",
        choices=["train", "infer-cls", "infer-mlm", "infer"],
        default="train",
        help="train step; CLS-path inference (infer = infer-cls); fill-mask inference on the P rows",
    )
    p.add_argument("--lengths", default="128", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds")
    p.add_argument("--steps", type=int, default=1, help="steps of each workload per round")
    p.add_argument(
        "--models",
        default="bert-base,narrowbert-base,bort",
        help="presets, each optionally with EncoderConfig overrides: bert-base:vocab_pad_multiple=128/...",
    )
    p.add_argument("--torch", default="eager,compile", help="PyTorch baselines: eager,compile or none")
    p.add_argument("--narrow-attention", default="auto", choices=["auto", "standard", "absorbed"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--attention-impl", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--attention-dropout", type=float, default=None, help="default: the preset's (0.1)")
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--vocab-pad", type=int, default=1, help="vocab_pad_multiple for every flax model")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU (default: by device)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    mode = "infer-cls" if args.mode == "infer" else args.mode
    dev = jax.devices()[0]
    peak = (
        peak_flops_per_device(dev.device_kind, args.peak_tflops)
        if (args.peak_tflops or (dev.platform != "cpu" and args.dtype == "bfloat16"))
        else None
    )
    command = f"python benchmarks/bench_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.machine()} {os.cpu_count()} cores "
        f"| jax {jax.__version__} on {dev.device_kind} ({dev.platform}) | batch {args.batch}, {args.dtype}, "
        f"attention {args.attention_impl} | load average at start {os.getloadavg()[0]:.1f}"
    )
    print(f"# command: {command}")
    overrides = dict(
        narrow_attention=args.narrow_attention,
        dtype=args.dtype,
        attention_impl=args.attention_impl,
        scan_layers=args.scan_layers,
        remat_policy=args.remat,
    )
    if args.attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = args.attention_dropout
    table, ratios = [], []
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = ROWS.get(length, max(1, round(0.15 * length)))
        work = {}  # name -> (callable, flops per step, rows computed, compile s, memory MiB, note)
        for name in args.models.split(","):
            cfg = model_config(name, overrides)
            if mode == "train":
                run, *info = flax_train(cfg, args.batch, length, rows, _prng(name))
                work[f"flax-narrow {name}"] = (run, train_step_flops(cfg, args.batch, length, rows), rows, *info)
            else:
                head = mode.split("-")[1]
                run, *info = flax_infer(cfg, args.batch, length, rows, head)
                cls_rows = 1 if cfg.is_narrow else None  # BERT's CLS path still runs every row
                nrows = rows if head == "mlm" else cls_rows
                flops = forward_flops(cfg, args.batch, length, nrows, head)
                nrows = nrows or length
                work[f"flax-narrow {name} ({head})"] = (run, flops, nrows, *info)
        base = PRESETS["bert-base"](**{k: v for k, v in overrides.items() if k == "attention_probs_dropout_prob"})
        for kind in [k for k in args.torch.split(",") if k and k != "none"]:
            if mode == "train":
                run, *info = torch_train(base, args.batch, length, rows, kind == "compile", args.dtype)
                flops = train_step_flops(base, args.batch, length, None)  # dense logits: every row
            else:
                head = mode.split("-")[1]
                run, *info = torch_infer(base, args.batch, length, rows, kind == "compile", args.dtype, head)
                flops = forward_flops(base, args.batch, length, None, head)
            work[f"transformers BERT-base ({kind})"] = (run, flops, length, *info)
        for run, *_ in work.values():  # warm-up: every batch once
            for _ in range(N_BATCHES):
                _sync(run())
        compiles_before = _COMPILES[0]
        times = {k: [] for k in work}
        for _ in range(args.rounds):
            for k, (run, *_rest) in work.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    out = run()
                _sync(out)
                times[k].append((time.perf_counter() - t0) / args.steps)
        recompiles = _COMPILES[0] - compiles_before
        best = {k: min(v) for k, v in times.items()}
        for k, (_, flops, nrows, compile_s, mem, note) in work.items():
            row = dict(
                workload=k,
                length=length,
                rows=nrows,
                batch=args.batch,
                seq_s_best=args.batch / best[k],
                seq_s_median=args.batch / statistics.median(times[k]),
                ms_best=best[k] * 1e3,
                tflops=flops / best[k] / 1e12,
                compile_s=compile_s,
                memory_mib=mem,
                note=note,
            )
            row["mfu"] = flops / best[k] / peak if peak else None
            table.append(row)
        ref = next((k for k in work if k.startswith("flax-narrow bert-base")), None)
        for k in work:
            if ref and k != ref and k.startswith("flax"):
                ratios.append(f"L={length}: {k} / {ref} = {best[ref] / best[k]:.2f}x")
        for k in [k for k in work if k.startswith("transformers")]:
            for f in [f for f in work if f.startswith("flax") and ("bert-base" in f or "narrowbert" in f)]:
                ratios.append(f"L={length}: {f} / {k} = {best[k] / best[f]:.2f}x")
        ratios.append(f"L={length}: XLA compilations during the timed rounds: {recompiles}")
    print("\n".join(ratios))
    print(
        "\n| workload | L | rows | seq/s (best) | seq/s (median) | tokens/s | ms/step | TFLOP/s | MFU | compile s "
        "| memory | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "—"
        print(
            f"| {r['workload']} | {r['length']} | {r['rows']} | {r['seq_s_best']:.2f} | {r['seq_s_median']:.2f} "
            f"| {r['seq_s_best'] * r['length']:.0f} "
            f"| {r['ms_best']:.1f} | {r['tflops']:.2f} | {mfu} | {r['compile_s']:.1f} | {r['memory_mib']:.0f} MiB "
            f"| {r['note']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(command=command, device=dev.device_kind, jax=jax.__version__, table=table, ratios=ratios),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
