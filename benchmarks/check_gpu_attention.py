"""On a GPU: cuDNN fused attention (``attention_impl="cudnn"``) against XLA's, for BERT-base in bf16.

Both bf16 runs are compared with an fp32 XLA reference on padded batches (padding anywhere in a row, not only
at the end): cuDNN's error must be of the size of XLA-bf16's. Then it times one forward+backward of the whole
encoder each way (round-robin, one run).

    python benchmarks/check_gpu_attention.py --batch 32 --lengths 128,512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_narrow as fn


def _inputs(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):  # right padding of random length, and a hole in the middle of every other row
        mask[b, rng.integers(length // 2, length + 1) :] = 0
        if b % 2:
            mask[b, 5:9] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss_and_grad(cfg, ids, mask):
    model = fn.BertModel.from_config(cfg, add_pooling_layer=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest, copy=True)(ids, mask).last_hidden_state.astype(jnp.float32)
        return jnp.mean(jnp.where(mask[..., None] > 0, out, 0.0) ** 2), out

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return f, params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"# jax {jax.__version__}, device {dev.device_kind} ({dev.platform}); command: "
        f"python benchmarks/check_gpu_attention.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    if dev.platform != "gpu" and not os.environ.get("CHECK_ON_CPU"):
        print("no GPU: cuDNN attention needs one")
        return 1
    for length in [int(x) for x in args.lengths.split(",")]:
        ids, mask = _inputs(args.batch, length)
        res = {}
        for name, impl, dtype in (
            ("fp32", "xla", "float32"),
            ("xla", "xla", "bfloat16"),
            ("cudnn", "cudnn", "bfloat16"),
        ):
            cfg = fn.EncoderConfig.bert_base(dtype=dtype, attention_impl=impl)
            f, params = _loss_and_grad(cfg, ids, mask)
            t0 = time.perf_counter()
            (loss, out), grads = jax.block_until_ready(f(params))
            res[name] = dict(f=f, params=params, out=out, grads=grads, loss=loss, compile=time.perf_counter() - t0)
        valid = np.asarray(mask, bool)
        ref = res.pop("fp32")  # fp32 XLA attention: the reference both bf16 runs are measured against
        g_ref = np.concatenate([np.ravel(np.asarray(a, np.float32)) for a in jax.tree.leaves(ref["grads"])])
        for k, r in res.items():
            d_out = np.abs(np.asarray(r["out"]) - np.asarray(ref["out"]))[valid].max()
            g = np.concatenate([np.ravel(np.asarray(a, np.float32)) for a in jax.tree.leaves(r["grads"])])
            rel = np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)
            print(
                f"L={length} B={args.batch} {k:5s} bf16 vs fp32 XLA: max|Δout| {d_out:.3e} "
                f"(|out| max {np.abs(np.asarray(ref['out']))[valid].max():.2f}), relative |Δgrad| {rel:.3e}, "
                f"loss {float(r['loss']):.6f} (fp32 {float(ref['loss']):.6f})"
            )
        times = {k: [] for k in res}
        for _ in range(args.rounds):
            for k, r in res.items():
                t0 = time.perf_counter()
                jax.block_until_ready(r["f"](r["params"]))
                times[k].append(time.perf_counter() - t0)
        for k in res:
            print(
                f"  {k:5s}: fwd+bwd best {min(times[k]) * 1e3:.2f} ms, "
                f"median {statistics.median(times[k]) * 1e3:.2f} ms, "
                f"first call {res[k]['compile']:.1f} s"
            )
        print(f"  cudnn / xla speed: {min(times['xla']) / min(times['cudnn']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
