"""Length bucketing on real text lengths: NarrowBERT-base inference over WordNet glosses or fortunes, bucketed
(:mod:`flax_narrow.bucketing`) against every batch padded to ``max_length``.

Texts: WordNet 3.0 glosses (``apt-get install wordnet-base``: /usr/share/wordnet/data.*) or the fortunes
database (``apt-get install fortunes``: /usr/share/games/fortunes). A WordPiece tokenizer is trained on the
texts themselves (offline). Two workloads, each bucketed and padded, timed alternately in rounds, with the
outputs compared:

* ``cls``: sequence-classification logits (the fine-tuning evaluation / prediction path), batches of 32;
* ``fill``: :func:`flax_narrow.fill_mask` with one mask per text (top-1), batch 32.

    python benchmarks/bench_bucketing.py --source wordnet --texts 2048 --max-length 128 --rounds 3 \\
        --json benchmarks/results/cpu-2026-12-01/bucketing_wordnet.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

import flax_narrow as fn
from flax_narrow.bucketing import bucket_lengths, in_input_order, pad_rows, plan_batches


def wordnet_glosses() -> list[str]:
    out = []
    for path in sorted(glob.glob("/usr/share/wordnet/data.*")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.startswith("  ") and " | " in line:
                    out.append(line.split(" | ", 1)[1].strip())
    return out


def fortunes() -> list[str]:
    out = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if os.path.isfile(path) and not path.endswith((".dat", ".u8")):
            with open(path, encoding="utf-8", errors="replace") as fh:
                out.extend(t.strip() for t in fh.read().split("\n%\n") if t.strip())
    return out


def tokenizer_for(texts: list[str]):
    import transformers
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=30522, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    vocab = wp.get_vocab()
    return transformers.BertTokenizerFast(vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["wordnet", "fortunes"], default="wordnet")
    p.add_argument("--texts", type=int, default=2048, help="how many texts (a fixed random sample)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default="cls,fill")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    texts = wordnet_glosses() if args.source == "wordnet" else fortunes()
    if not texts:
        raise SystemExit(f"bench_bucketing: no {args.source} texts found; see the module docstring")
    tok = tokenizer_for(texts)
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.choice(len(texts), size=min(args.texts, len(texts)), replace=False)]
    enc = tok(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = np.asarray([len(r) for r in enc])
    cfg = fn.EncoderConfig.narrowbert_base(vocab_size=len(tok))
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {os.cpu_count()} cores | load "
        f"{os.getloadavg()[0]:.1f} | {len(texts)} {args.source} texts, tokens: median {int(np.median(lengths))}, "
        f"mean {lengths.mean():.1f}, p95 {int(np.percentile(lengths, 95))}, max {lengths.max()} (max_length "
        f"{args.max_length})"
    )
    work, outputs, info = {}, {}, {}
    if "cls" in args.workloads:
        model = fn.BertForSequenceClassification.from_config(cfg.replace(num_labels=3), seed=0)
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, ids, att: nnx.merge(graphdef, s)(ids, att).logits)
        rows = [np.asarray(r, np.int32) for r in enc]
        ones = [np.ones(len(r), np.int32) for r in rows]

        def cls_run(buckets):
            plan = plan_batches(lengths, args.batch, args.max_length, buckets)
            res = [np.asarray(fwd(state, pad_rows(rows, b), pad_rows(ones, b))) for b in plan]
            return np.stack(in_input_order(len(rows), plan, res)), plan

        work["cls bucketed"] = lambda: cls_run(None)
        work["cls padded to max_length"] = lambda: cls_run([args.max_length])
    if "fill" in args.workloads:
        mlm = fn.BertForMaskedLM.from_config(cfg, seed=0)
        masked = []
        for t in texts:
            words = t.split()
            j = int(rng.integers(0, len(words)))
            words[j] = "[MASK]"
            masked.append(" ".join(words))
        menc = tok(masked, truncation=True, max_length=args.max_length)["input_ids"]
        masked = [t for t, r in zip(masked, menc) if tok.mask_token_id in r]  # the mask survived truncation
        fill_limit = mlm.config.max_position_embeddings
        default_buckets = list(bucket_lengths(args.max_length)) + ([fill_limit] if fill_limit > args.max_length else [])

        def fill_run(buckets):
            out = fn.fill_mask(mlm, tok, masked, top_k=1, batch_size=args.batch, buckets=buckets)
            return np.asarray([[m[0]["score"] for m in t] for t in out], dtype=object), None

        work["fill_mask bucketed"] = lambda: fill_run(default_buckets)
        work["fill_mask padded to max_length"] = lambda: fill_run([args.max_length, fill_limit])
    for k, run in work.items():  # compile every shape, keep the outputs
        t0 = time.perf_counter()
        outputs[k], plan = run()
        info[k] = dict(first_s=time.perf_counter() - t0)
        if plan is not None:
            info[k]["shapes"] = sorted({(int(b.indices.size), b.length) for b in plan})
            info[k]["padded_tokens"] = int(sum(b.indices.size * b.length for b in plan))
        print(f"# warm {k}: {info[k]}", flush=True)
    times = {k: [] for k in work}
    for _ in range(args.rounds):
        for k, run in work.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    lines = []
    for kind in ("cls", "fill_mask"):
        b, pdd = f"{kind} bucketed", f"{kind} padded to max_length"
        if b not in times:
            continue
        same = (
            np.allclose(outputs[b], outputs[pdd], atol=1e-4)
            if kind == "cls"
            else all(
                np.allclose(np.asarray(x, float), np.asarray(y, float), atol=1e-4)
                for x, y in zip(outputs[b], outputs[pdd])
            )
        )
        per_round = [a / c for a, c in zip(times[pdd], times[b])]
        lines.append(
            f"{kind}: bucketed {statistics.median(times[b]):.2f} s, padded {statistics.median(times[pdd]):.2f} s per "
            f"pass over the texts; speed-up {statistics.median(per_round):.2f}x (rounds {min(per_round):.2f}-"
            f"{max(per_round):.2f}); same outputs (atol 1e-4): {same}"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                dict(
                    command="python benchmarks/bench_bucketing.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    lengths=dict(median=float(np.median(lengths)), mean=float(lengths.mean()), max=int(lengths.max())),
                    times=times,
                    info={
                        k: {kk: (str(vv) if kk == "shapes" else vv) for kk, vv in v.items()} for k, v in info.items()
                    },
                    summary=lines,
                ),
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
