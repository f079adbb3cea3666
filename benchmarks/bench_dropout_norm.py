"""Dropout + residual + LayerNorm, and dropout's random bits, timed alone (forward + backward), alternated in one run.

Two questions of issue 15's "cheaper dropout" lever:

* ``--what norm``: the output block ``LayerNorm(x + dropout(y))`` as the model computes it by default (``nnx.Dropout``
  + ``nnx.LayerNorm``, "modules"), as the fused op's jnp form ("jnp", ``fused_dropout_norm="jnp"``) and as its
  Pallas kernels ("pallas", GPU/TPU only). On a device the kernels are first checked against the jnp form (values
  and gradients; exit 1 if they disagree), then timed.
* ``--what draws``: a layer's three dropout sites (attention probabilities (B, N, L, L), attention output and FFN
  output (B, L, H)) with three Bernoulli draws ("bernoulli3", what ``nnx.Dropout`` does), three uint32-bits draws
  compared with an integer threshold ("bits3"), and one bits draw sliced for the three sites: flat ("bits1") or
  laid out per token, (B, L, N·L + 2·H) ("bits1_rows").

    python benchmarks/bench_dropout_norm.py --what norm --rows 1024 --hidden 768           # CPU: modules vs jnp
    python benchmarks/bench_dropout_norm.py --what draws --batch 8 --length 128            # CPU: bit draws
    python benchmarks/bench_dropout_norm.py --what norm --rows 16384 --dtype bfloat16      # GPU: + pallas

Each variant is a jitted function of (x, y, scale, bias, key) returning the loss's value and gradients; every
round runs each variant ``--steps`` times, and the table gives the best and the median round and each variant's
median per-round ratio to the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.ops import dropout_norm as dn


def _modules_norm(h: int, eps: float, rate: float, dtype):
    """The model's default path: nnx.Dropout then nnx.LayerNorm of the sum (fp32 statistics)."""

    def f(x, y, scale, bias, key):
        ln = nnx.LayerNorm(h, epsilon=eps, dtype=dtype, rngs=nnx.Rngs(0))  # built in the trace: ones and zeros
        ln.scale[...], ln.bias[...] = scale, bias
        return ln(nnx.Dropout(rate)(y, deterministic=False, rngs=key) + x)

    return f


def norm_variants(args, dtype):
    eps, rate = args.eps, args.rate
    out = {
        "modules": _modules_norm(args.hidden, eps, rate, dtype),
        "jnp": lambda x, y, s, b, k: dn.dropout_add_layer_norm_reference(x, y, s, b, eps=eps, rate=rate, key=k),
    }
    impl = "pallas_interpret" if args.interpret else "pallas"
    if args.interpret or jax.default_backend() in ("gpu", "tpu"):
        out["pallas"] = lambda x, y, s, b, k: dn.dropout_add_layer_norm(
            x, y, s, b, eps=eps, rate=rate, key=k, impl=impl, block_rows=args.block_rows
        )
    return out


def draw_variants(args):
    """Three dropout sites of one layer, applied to (probs, attn_out, ffn_out); returns their sum of squares."""
    rate, keep = args.rate, 1.0 - args.rate
    t = jnp.uint32(dn.keep_threshold(rate))

    def apply(v, mask):
        return jnp.where(mask, v / keep, 0)

    def bernoulli3(p, a, f, key):
        k = jax.random.split(key, 3)
        masks = [jax.random.bernoulli(ki, keep, v.shape) for ki, v in zip(k, (p, a, f))]
        return [apply(v, m) for v, m in zip((p, a, f), masks)]

    def bits3(p, a, f, key):
        k = jax.random.split(key, 3)
        return [apply(v, jax.random.bits(ki, v.shape, jnp.uint32) >= t) for ki, v in zip(k, (p, a, f))]

    def bits1(p, a, f, key):
        sizes = [v.size for v in (p, a, f)]
        bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
        parts = jnp.split(bits, np.cumsum(sizes)[:-1])
        return [apply(v, b.reshape(v.shape) >= t) for v, b in zip((p, a, f), parts)]

    def bits1_rows(p, a, f, key):
        """One draw laid out per token, (B, L, N·L + 2·H), sliced on its last axis (probs transposed back)."""
        b, n, length, _ = p.shape
        h = a.shape[-1]
        bits = jax.random.bits(key, (b, length, n * length + 2 * h), jnp.uint32)
        bp = bits[..., : n * length].reshape(b, length, n, length).transpose(0, 2, 1, 3)
        ba, bf = bits[..., n * length : n * length + h], bits[..., n * length + h :]
        return [apply(p, bp >= t), apply(a, ba >= t), apply(f, bf >= t)]

    return {"bernoulli3": bernoulli3, "bits3": bits3, "bits1": bits1, "bits1_rows": bits1_rows}


def _loss_grad(f, n_args: int):
    def loss(*a):
        outs = f(*a)
        outs = outs if isinstance(outs, list) else [outs]
        return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in outs)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_args))))


def check_pallas(variants, inputs, dtype) -> dict:
    """Max |pallas - jnp| of the value and each gradient (on the device); tolerance by dtype."""
    ref = _loss_grad(variants["jnp"], 4)(*inputs)
    got = _loss_grad(variants["pallas"], 4)(*inputs)
    diffs = {}
    for name, a, b in zip(["loss", "dx", "dy", "dscale", "dbias"], [ref[0], *ref[1]], [got[0], *got[1]]):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        diffs[name] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))
    direct = variants["pallas"](*inputs)
    diffs["out"] = float(
        np.max(np.abs(np.asarray(direct, np.float32) - np.asarray(variants["jnp"](*inputs), np.float32)))
    )
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    diffs["ok"] = all(v <= tol for k, v in diffs.items() if k != "ok")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["norm", "draws"], default="norm")
    p.add_argument("--rows", type=int, default=1024, help="norm: rows N = batch x length (B=8, L=128: 1024)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12, help="draws: attention heads")
    p.add_argument("--batch", type=int, default=8, help="draws")
    p.add_argument("--length", type=int, default=128, help="draws")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=1e-12)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block-rows", type=int, default=None, help="pallas: rows per kernel program")
    p.add_argument("--interpret", action="store_true", help="norm: the kernels in interpret mode (a smoke test)")
    p.add_argument("--prng", default="threefry2x32", help="jax_default_prng_impl for the keys (rbg, unsafe_rbg)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    jax.config.update("jax_default_prng_impl", args.prng)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.machine()} {os.cpu_count()} cores | "
        f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}) | {args.dtype}, prng {args.prng} | "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    print(f"# command: python benchmarks/bench_dropout_norm.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    k = jax.random.split(jax.random.key(0), 4)
    check = None
    if args.what == "norm":
        shape, h = (args.rows, args.hidden), args.hidden
        inputs = (
            jax.random.normal(k[0], shape).astype(dtype),
            jax.random.normal(k[1], shape).astype(dtype),
            jnp.ones(h),
            jnp.zeros(h),
            k[3],
        )
        variants = norm_variants(args, dtype)
        if "pallas" in variants:
            check = check_pallas(variants, inputs, dtype)
            print(f"# pallas vs jnp (max abs difference, relative to the largest value): {check}")
            if not check["ok"]:
                print("# FAILED: the kernels disagree with the jnp form; not timing them")
                variants.pop("pallas")
        n_diff = 4
        print(f"# rows {args.rows}, hidden {h}, dropout {args.rate}, forward + backward")
    else:
        b, n, length, h = args.batch, args.heads, args.length, args.hidden
        inputs = (
            jax.random.uniform(k[0], (b, n, length, length)).astype(dtype),
            jax.random.normal(k[1], (b, length, h)).astype(dtype),
            jax.random.normal(k[2], (b, length, h)).astype(dtype),
            k[3],
        )
        variants = draw_variants(args)
        n_diff = 3
        print(f"# sites: probs {(b, n, length, length)}, two of {(b, length, h)}; dropout {args.rate}; fwd + bwd")
    fns = {name: _loss_grad(f, n_diff) for name, f in variants.items()}
    compile_s = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*inputs))
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = f(*inputs)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = next(iter(fns))
    print(f"\n| variant | best ms | median ms | vs {base} (median of per-round ratios, range) | first call s |")
    print("|---|---|---|---|---|")
    rows = []
    for name, ts in times.items():
        ratios = [tb / t for tb, t in zip(times[base], ts)]
        row = dict(
            variant=name,
            best_ms=1e3 * min(ts),
            median_ms=1e3 * statistics.median(ts),
            ratio_median=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            first_call_s=compile_s[name],
        )
        rows.append(row)
        print(
            f"| {name} | {row['best_ms']:.3f} | {row['median_ms']:.3f} | {row['ratio_median']:.2f}× "
            f"({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | {row['first_call_s']:.1f} |"
        )
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), device=dev.device_kind, check=check, rows=rows), fh, indent=2)
    return 1 if check is not None and not check["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
