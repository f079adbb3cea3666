"""Sequence packing on a real corpus: how much padding packing leaves, and what segment-aware attention costs.

1. Padding: the corpus (default: the built-in standard-library docstrings, tokenized as a pretraining run does)
   packed into rows of ``seq_len`` (``data.packing`` concat and segments cut the same rows), against one
   document per row (``[CLS] doc [SEP]``, truncated to ``seq_len``, padded): rows, the fraction of padding
   tokens, and the tokens truncation drops.
2. Step time: the pretraining train step (``flax_narrow.train.step``: masking, forward, backward, AdamW) of
   each model, compiled twice, without segment ids (``concat``) and with them (``segments``: per-query
   attention masks), on the same packed batches; timed alternately, ``--steps`` steps per mode per round, for
   ``--rounds`` rounds in one run. Reported: the median over rounds of the ratio segments / concat of a
   round's seconds per step, and the ratio of the two modes' fastest rounds.

    python benchmarks/bench_packing.py                                    # demo-bert + demo-narrowbert, L=128
    python benchmarks/bench_packing.py --presets tiny --rounds 3 --steps 5 # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from flax_narrow.train import data as D
from flax_narrow.train import sharding as shd
from flax_narrow.train import step as S
from flax_narrow.train.config import MeshConfig, preset
from flax_narrow.train.masking import MaskingSpec
from flax_narrow.train.optimizer import learning_rate_schedule, make_optimizer

N_BATCHES = 4


def padding_stats(rows: np.ndarray, pad_id: int) -> dict[str, float]:
    return {"rows": int(len(rows)), "padding_fraction": float(np.mean(rows == pad_id))}


def one_per_row(token_lists: list[list[int]], seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> tuple:
    """Unpacked rows ``[CLS] doc [SEP]`` (truncated, padded) and the number of document tokens truncation drops."""
    docs = [d for d in token_lists if d]
    out = np.full((len(docs), seq_len), pad_id, np.int32)
    dropped = 0
    for r, d in enumerate(docs):
        body = d[: seq_len - 2]
        dropped += len(d) - len(body)
        out[r, 0], out[r, 1 : 1 + len(body)], out[r, 1 + len(body)] = cls_id, body, sep_id
    return out, dropped


def corpus(cfg, cache_dir: str):
    """(tokenizer, document token lists, packed rows as a dict with segment ids) of the preset's train split."""
    docs, _ = D.load_documents(cfg.data, cache_dir)
    tok = D.get_tokenizer(cfg.data, docs, cache_dir)
    seg_cfg = dataclasses.replace(cfg.data, packing="segments")
    packed = D.PackedRows(D.packed_cached(docs, tok, seg_cfg, cache_dir, "train"))
    texts = [t if isinstance(t, str) else "" for t in docs[cfg.data.text_column]]
    enc = tok(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return tok, enc["input_ids"], packed.rows(0, len(packed))


def compiled_step(cfg, masking: MaskingSpec, segments: bool):
    mesh = shd.make_mesh(MeshConfig(1, 1, 1))
    tcfg = cfg.train
    tx = make_optimizer(tcfg)
    spec = S.state_spec(cfg.model, tx, mesh, seed=0)
    rest = S.init_rest(spec)
    state = S.init_state(spec, cfg.model, tx, seed=0)
    fn = S.make_train_step(spec.graphdef, tx, masking, seed=0, schedule=learning_rate_schedule(tcfg), kd=cfg.kd)
    steps = S.compile_steps(
        fn,
        None,
        spec,
        mesh,
        accum=tcfg.grad_accum_steps,
        micro_batch=tcfg.micro_batch_size,
        seq_len=cfg.data.seq_len,
        rest=rest,
        teacher=None,
        segment_ids=segments,
    )
    return steps, state, rest


def timed(modes: dict, batches: list[dict], mode: str, count: int) -> float:
    """Seconds per step of ``count`` steps of ``mode`` (its state carried on in ``modes``)."""
    train, state, rest, i = modes[mode]
    t0 = time.perf_counter()
    for _ in range(count):
        b = batches[i % N_BATCHES]
        seg = b["segment_ids"] if mode == "segments" else None
        state, metrics = train(state, b["input_ids"], rest, None, None, seg)
        i += 1
    jax.block_until_ready(metrics["loss"])
    modes[mode][1], modes[mode][3] = state, i
    return (time.perf_counter() - t0) / count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="demo-bert,demo-narrowbert", help="pretraining presets (their model, "
                    "batch, P and data config); comma-separated")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per mode per round")
    ap.add_argument("--cache-dir", default="~/.cache/flax-narrow")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    cache_dir = os.path.expanduser(args.cache_dir)
    results: dict = {
        "command": "python benchmarks/bench_packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
        "padding": {},
        "step": {},
    }
    for name in args.presets.split(","):
        cfg = preset(name)
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, cache_dir=cache_dir))
        tok, enc, rows = corpus(cfg, cache_dir)
        cls_id, sep_id, pad_id = D.special_ids(tok)
        key = f"{cfg.data.source} L={cfg.data.seq_len}"
        if key not in results["padding"]:
            alone, dropped = one_per_row(enc, cfg.data.seq_len, cls_id, sep_id, pad_id)
            seg = rows["segment_ids"]
            results["padding"][key] = {
                "documents": sum(1 for d in enc if d),
                "packed": {**padding_stats(rows["input_ids"], pad_id), "segments_per_row": float(seg.max(1).mean())},
                "one_per_row": {**padding_stats(alone, pad_id), "truncated_tokens": dropped},
            }
            print(f"padding {key}: {json.dumps(results['padding'][key])}", flush=True)
        masking = MaskingSpec.from_tokenizer(
            tok, max_predictions=cfg.train.max_predictions, vocab_size=cfg.model.vocab_size
        )
        accum, micro, length = cfg.train.grad_accum_steps, cfg.train.micro_batch_size, cfg.data.seq_len
        n = accum * micro
        batches = [
            {k: jax.device_put(v[i * n : (i + 1) * n].reshape(accum, micro, length)) for k, v in rows.items()}
            for i in range(N_BATCHES)
        ]
        modes = {}
        for mode in ("concat", "segments"):
            steps, state, rest = compiled_step(cfg, masking, mode == "segments")
            modes[mode] = [steps.train, state, rest, 0]

        for mode in modes:
            timed(modes, batches, mode, 2)  # warm-up
        per_round = {"concat": [], "segments": []}
        for _ in range(args.rounds):
            for mode in modes:
                per_round[mode].append(timed(modes, batches, mode, args.steps))
        ratios = [s / c for s, c in zip(per_round["segments"], per_round["concat"])]
        results["step"][name] = {
            "batch": n,
            "seq_len": length,
            "max_predictions": cfg.train.max_predictions,
            "concat_s_per_step": per_round["concat"],
            "segments_s_per_step": per_round["segments"],
            "ratio_segments_over_concat_median": statistics.median(ratios),
            "ratio_segments_over_concat_fastest": min(per_round["segments"]) / min(per_round["concat"]),
            "ratios": ratios,
        }
        print(
            f"step {name} (B={n}, L={length}): concat median {statistics.median(per_round['concat']) * 1e3:.1f} ms, "
            f"segments median {statistics.median(per_round['segments']) * 1e3:.1f} ms, "
            f"ratio segments/concat: median of rounds {statistics.median(ratios):.3f}, fastest rounds "
            f"{min(per_round['segments']) / min(per_round['concat']):.3f} "
            f"(min {min(per_round['concat']) * 1e3:.1f} vs {min(per_round['segments']) * 1e3:.1f} ms)",
            flush=True,
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
