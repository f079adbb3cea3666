"""Agora candidates: K fine-tuning runs side by side (one vmapped step) vs one after another.

Times ``train_side_by_side`` and ``train_sequential`` on the same candidates and data (each timed after a
warm-up call that compiles it), checks that the trained parameters agree, and prints one JSON line.

    python benchmarks/bench_candidates.py --k 4 --hidden 64 --steps 40
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np
from flax import nnx
from transformers import BertTokenizerFast

from flax_narrow.config import EncoderConfig
from flax_narrow.train.candidates import Candidate, train_sequential, train_side_by_side
from flax_narrow.train.finetune import FinetuneConfig, build_model
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    words = [f"w{i}" for i in range(200)]
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])})
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    ex = [{"text_a": " ".join(rng.choice(words, args.length)), "label": str(rng.integers(2))} for _ in range(n)]
    task = Task("classification", ("0", "1"))
    data = Encoder(tok, args.length).encode(task, ex)
    mcfg = EncoderConfig.tiny(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        max_position_embeddings=max(64, args.length),
    )

    def factory(seed):
        return build_model(task, mcfg, seed=seed)

    cands = [Candidate(1e-4 * (i + 1), 0.01 * i, 0.1, args.batch, i, 1.0) for i in range(args.k)]
    base = FinetuneConfig()
    out = {"k": args.k, "hidden": args.hidden, "layers": args.layers, "length": args.length, "batch": args.batch}
    out["steps"] = args.steps
    results = {}
    for name, fn in (("side_by_side", train_side_by_side), ("sequential", train_sequential)):
        fn(factory, task, data, cands[:1] if name == "sequential" else cands, base)  # compile
        t = time.perf_counter()
        models = fn(factory, task, data, cands, base)
        jax.block_until_ready(jax.tree.leaves(nnx.state(models[-1])))
        out[f"{name}_s"] = round(time.perf_counter() - t, 3)
        results[name] = models
    diffs = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for ma, mb in zip(results["side_by_side"], results["sequential"])
        for a, b in zip(jax.tree.leaves(nnx.state(ma, nnx.Param)), jax.tree.leaves(nnx.state(mb, nnx.Param)))
    ]
    out["max_param_diff"] = max(diffs)
    out["speedup"] = round(out["sequential_s"] / out["side_by_side_s"], 2)
    out["device"] = str(jax.devices()[0].device_kind)
    out["machine"] = platform.processor() or platform.machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
