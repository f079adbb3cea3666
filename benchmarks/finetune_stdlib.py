"""Real labelled text, offline: Python standard-library docstrings labelled by the package they come from.

Steps: collect docstrings (module, class, function, method) of a few stdlib packages; split by a hash of the
text into train/dev/test; train a WordPiece tokenizer on the train part; pretrain a tiny BERT briefly by MLM
on the train docstrings (``--mlm-steps 0``: from scratch); fine-tune it with ``flax_narrow.train.finetune``;
compare with the majority-class baseline; then run the Agora scaffold (g: MLM infilling with the pretrained
MLM, S: the fine-tuned classifier) for a few rounds.

    python benchmarks/finetune_stdlib.py --out /tmp/stdlib_ft
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.tokenization import load_tokenizer
from flax_narrow.train import agora
from flax_narrow.train.candidates import Candidate
from flax_narrow.train.finetune import (
    FinetuneConfig,
    build_model,
    evaluate,
    finetune,
    forward_fn,
    make_eval_step,
    split_model,
)
from flax_narrow.train.finetune_data import Encoder, load_examples
from flax_narrow.train.tasks import Task

PACKAGES = ("email", "http", "xml", "json", "asyncio", "unittest", "multiprocessing", "logging")


def docstrings(package: str) -> list[str]:
    """Docstrings (first paragraph, >= 40 chars) of a package's modules, classes, functions and methods."""
    mod = importlib.import_module(package)
    mods = [mod]
    for info in pkgutil.walk_packages(mod.__path__, package + "."):
        if ".test" in info.name or "__main__" in info.name:
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
    seen, out = set(), []

    def add(obj):
        doc = inspect.getdoc(obj)
        if doc:
            para = " ".join(doc.split("\n\n")[0].split())
            if len(para) >= 40 and para not in seen:
                seen.add(para)
                out.append(para)

    for m in mods:
        add(m)
        for _, obj in inspect.getmembers(m):
            if getattr(obj, "__module__", None) != m.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                add(obj)
            if inspect.isclass(obj):
                for _, meth in inspect.getmembers(obj, inspect.isfunction):
                    add(meth)
    return out


def build_corpus(out: str) -> dict[str, str]:
    rows = {"train": [], "dev": [], "test": []}
    all_texts = collections.Counter()
    per = {p: docstrings(p) for p in PACKAGES}
    for texts in per.values():
        all_texts.update(texts)
    for pkg, texts in per.items():
        for t in texts:
            if all_texts[t] > 1:  # the same text under two packages: ambiguous, dropped
                continue
            h = int(hashlib.sha1(t.encode()).hexdigest(), 16) % 10
            split = "test" if h == 0 else "dev" if h in (1, 2) else "train"
            rows[split].append({"text": t, "package": pkg})
    paths = {}
    for split, rs in rows.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as fh:
            for r in rs:
                fh.write(json.dumps(r) + "\n")
    return paths


def train_tokenizer(train_path: str, out: str, vocab_size: int) -> str:
    from tokenizers import BertWordPieceTokenizer

    texts = [json.loads(x)["text"] for x in open(train_path, encoding="utf-8")]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2)
    d = os.path.join(out, "tokenizer")
    os.makedirs(d, exist_ok=True)
    tok.save_model(d)
    return d


def pretrain_mlm(cfg: EncoderConfig, tok, texts: list[str], steps: int, length: int, seed: int) -> BertForMaskedLM:
    """A brief MLM pretraining (15% masking, 80/10/10) on ``texts``; AdamW 1e-3, batch 32."""
    model = BertForMaskedLM.from_config(cfg, seed=seed)
    if steps == 0:
        return model
    ids = np.full((len(texts), length), tok.pad_token_id, np.int32)
    for i, row in enumerate(tok(texts, truncation=True, max_length=length)["input_ids"]):
        ids[i, : len(row)] = row
    special = np.isin(ids, tok.all_special_ids)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, steps // 10, steps), weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(params, rest, opt, batch, labels):
        def lf(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            out = m(batch, batch != tok.pad_token_id, labels=labels, deterministic=False)
            return out.loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), g = jax.value_and_grad(lf, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), rest, opt, loss

    rng = np.random.default_rng(seed)
    for s in range(steps):
        idx = rng.integers(0, len(ids), 32)
        b, sp = ids[idx].copy(), special[idx]
        sel = (rng.random(b.shape) < 0.15) & ~sp
        labels = np.where(sel, b, -100)
        r = rng.random(b.shape)
        b[sel & (r < 0.8)] = tok.mask_token_id
        rand = sel & (r >= 0.8) & (r < 0.9)
        b[rand] = rng.integers(0, len(tok), rand.sum())
        params, rest, opt, loss = step(params, rest, opt, jnp.asarray(b), jnp.asarray(labels))
        if s % 100 == 0 or s == steps - 1:
            logging.info("mlm step %d loss %.3f", s, float(loss))
    return nnx.merge(graphdef, params, rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mlm-steps", type=int, default=600)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--agora-epochs", type=float, default=3)
    ap.add_argument("--replay", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    paths = build_corpus(args.out)
    tok = load_tokenizer(train_tokenizer(paths["train"], args.out, 4000))
    cols = {"text_a": "text", "label": "package"}
    train, dev, test = (load_examples(paths[s], s, "classification", cols) for s in ("train", "dev", "test"))
    names = tuple(sorted({e["label"] for e in train}))
    task = Task("classification", names)
    counts = collections.Counter(e["label"] for e in train)
    majority = counts.most_common(1)[0][0]
    base = {s: float(np.mean([e["label"] == majority for e in d])) for s, d in (("dev", dev), ("test", test))}
    cfg = EncoderConfig.tiny(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128
    )
    t1 = time.time()
    mlm = pretrain_mlm(cfg, tok, [e["text_a"] for e in train], args.mlm_steps, args.length, 0)
    mlm_dir = mlm.save_pretrained(os.path.join(args.out, "mlm"))
    t_mlm = time.time() - t1
    enc = Encoder(tok, args.length)
    tr, dv, te = (enc.encode(task, d) for d in (train, dev, test))
    ft = FinetuneConfig(
        learning_rate=args.lr, epochs=args.epochs, batch_size=32, warmup_ratio=0.1, patience=args.patience
    )
    res = finetune(build_model(task, mlm_dir, seed=0), task, tr, dv, ft, output_dir=os.path.join(args.out, "ft"))
    graphdef, params, rest = split_model(res.model)
    test_metrics, _ = evaluate(task, make_eval_step(graphdef, forward_fn(task, "standard")), params, rest, te, 64)
    summary = {
        "sizes": {"train": len(train), "dev": len(dev), "test": len(test), "classes": len(names)},
        "majority_baseline": base,
        "mlm_steps": args.mlm_steps,
        "mlm_time_s": round(t_mlm, 1),
        "dev_best": res.history[[h["step"] for h in res.history].index(res.best_step)],
        "test": test_metrics,
    }
    print(json.dumps(summary, indent=1))
    # Agora: Θ of 4, S = the fine-tuned classifier, g = infilling with the pretrained MLM.
    theta = [Candidate(lr, 0.01, 0.1, 32, s, args.agora_epochs) for lr in (args.lr, args.lr / 3) for s in (0, 1)]
    acfg = agora.AgoraConfig(
        os.path.join(args.out, "agora"), replay=args.replay, finetune=FinetuneConfig(eval_batch_size=64)
    )
    ag = agora.run_agora(
        task,
        enc,
        train,
        dev,
        theta,
        lambda seed: build_model(task, mlm_dir, seed=seed),
        agora.MLMInfill(mlm, tok, max_length=args.length),
        agora.ClassifierLabeller(res.model, task, enc),
        acfg,
    )
    graphdef, params, rest = split_model(ag.model)
    ag_test, _ = evaluate(task, make_eval_step(graphdef, forward_fn(task, "standard")), params, rest, te, 64)
    summary["agora"] = {"final_round": ag.round, "heldout": ag.heldout, "rounds": len(ag.rounds), "test": ag_test}
    summary["total_time_s"] = round(time.time() - t0, 1)
    print(open(os.path.join(args.out, "agora", "summary.md")).read())
    print(json.dumps(summary["agora"], indent=1))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
