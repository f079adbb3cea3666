"""How fast a small MLM leaves the unigram plateau, per step: the measurements behind the demo presets.

Trains a BERT (or NarrowBERT with ``--full-layers F``) from scratch with the library's own train step
(``flax_narrow.train.step.make_train_step``, the demo's optimizer) on the demo corpus (the standard library's
docstrings, its WordPiece tokenizer) packed into rows of ``--length`` tokens, every selected token replaced by
[MASK], and prints the eval loss on held-out rows (fixed masks) five times. Step counts, not seconds, so machine
load does not change the figures. It also prints the two context-free baselines the demo prints: the eval
tokens' unigram entropy and their cross-entropy under the training split's frequencies.

    python benchmarks/demo_recipe.py --steps 1500                       # hidden 64, L=32, batch 64, lr 1e-3
    python benchmarks/demo_recipe.py --steps 1000 --unigram-bias        # the demo presets' recipe
    python benchmarks/demo_recipe.py --steps 1000 --unigram-bias --lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=32, help="tokens per row (L)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--predictions", type=int, default=5, help="P: masked slots per row")
    ap.add_argument("--mask-prob", type=float, default=0.15)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--full-layers", type=int, default=0, help="NarrowBERT's F (0: BERT)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--b2", type=float, default=0.999)
    ap.add_argument("--init-range", type=float, default=0.02, help="initializer_range")
    ap.add_argument("--unigram-bias", action="store_true", help="train.output_bias_init=unigram")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flax_narrow.config import EncoderConfig
    from flax_narrow.train import data as D
    from flax_narrow.train import sharding as shd
    from flax_narrow.train import step as S
    from flax_narrow.train.config import KDConfig, MeshConfig, load_config
    from flax_narrow.train.demo import unigram_cross_entropy, unigram_entropy
    from flax_narrow.train.loop import with_output_bias
    from flax_narrow.train.masking import MaskingSpec, mask_tokens
    from flax_narrow.train.optimizer import learning_rate_schedule, make_optimizer

    sets = [f"data.tokenizer_vocab_size={a.vocab}", f"model.vocab_size={a.vocab}", "mesh.data=1"]
    pc = load_config("demo-bert", None, sets)
    cache = os.path.expanduser(pc.data.cache_dir)
    docs, eval_docs = D.load_documents(pc.data, cache)
    tok = D.get_tokenizer(pc.data, docs, cache)
    cls_id, sep_id, pad_id = D.special_ids(tok)

    def rows_of(ds):
        enc = tok(list(ds["text"]), add_special_tokens=False, return_attention_mask=False, verbose=False)
        return D.pack_token_lists(enc["input_ids"], a.length, cls_id, sep_id, pad_id)

    train, held = rows_of(docs), rows_of(eval_docs)[: 8 * a.batch]
    specials = tok.all_special_ids
    entropy, plateau = unigram_entropy([held], specials), unigram_cross_entropy([held], [train], specials)
    extra = {"full_length_layers": a.full_layers, "model_type": "narrow_bert"} if a.full_layers else {}
    cfg = EncoderConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=4 * a.hidden,
        max_position_embeddings=max(a.length, 32),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=a.init_range,
        **extra,
    )
    over = [f"train.learning_rate={a.lr}", f"train.steps={a.steps}", f"train.warmup_steps={a.warmup}"]
    tcfg = load_config("demo-bert", None, [*over, f"train.b2={a.b2}"]).train
    spec = MaskingSpec(
        max_predictions=a.predictions,
        mask_prob=a.mask_prob,
        mask_token_prob=1.0,
        random_token_prob=0.0,
        vocab_size=a.vocab,
        mask_token_id=tok.mask_token_id,
        pad_token_id=pad_id,
        special_token_ids=tuple(specials),
    )
    tx = make_optimizer(tcfg)
    state, rest, sspec = S.create_state(cfg, tx, shd.make_mesh(MeshConfig(1, 1, 1)), seed=0)
    if a.unigram_bias:
        logp = jnp.asarray(D.unigram_log_probs(train, a.vocab, sorted(set(specials) | {pad_id})))
        state = with_output_bias(state, logp)  # what train.output_bias_init=unigram does
    schedule = learning_rate_schedule(tcfg)
    step = jax.jit(S.make_train_step(sspec.graphdef, tx, spec, seed=0, schedule=schedule, kd=KDConfig()))

    def evaluate(params) -> float:
        model = nnx.merge(sspec.graphdef, params, rest)
        total = count = 0.0
        for i in range(0, len(held) - a.batch + 1, a.batch):
            m = mask_tokens(jnp.asarray(held[i : i + a.batch]), jax.random.key(123), spec)
            out = model(m.input_ids, m.attention_mask, narrow_positions=m.positions, narrow_valid=m.valid)
            logp_v = jax.nn.log_softmax(out.logits.astype(jnp.float32), -1)
            nll = -jnp.take_along_axis(logp_v, m.labels[..., None], -1)[..., 0]
            total += float((nll * m.valid).sum())
            count += float(m.valid.sum())
        return total / count

    print(json.dumps(vars(a)))
    print(f"eval tokens: unigram entropy {entropy:.3f} nats, plateau (training frequencies) {plateau:.3f}")
    rng, t0, evals = np.random.default_rng(0), time.perf_counter(), []
    for i in range(a.steps):
        batch = train[rng.integers(0, len(train), a.batch)][None]
        state, _ = step(state, jnp.asarray(batch, jnp.int32), rest, None, None)
        if (i + 1) % max(a.steps // 5, 1) == 0:
            evals.append({"step": i + 1, "eval_loss": evaluate(state.params)})
            print(f"step {i + 1:>6}  eval loss {evals[-1]['eval_loss']:.3f}  ({time.perf_counter() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(a), "entropy": entropy, "plateau": plateau, "evals": evals}, fh, indent=1)


if __name__ == "__main__":
    main()
