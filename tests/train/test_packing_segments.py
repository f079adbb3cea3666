"""``data.packing="segments"``: packed rows carry segment ids, and the MLM step and evaluation keep the documents
of a row apart, so a packed batch computes what its documents compute alone; ``concat`` (the default) is
unchanged."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import small_overrides

from flax_narrow.cli import main
from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.train import aot
from flax_narrow.train import data as D
from flax_narrow.train import sharding as shd
from flax_narrow.train import step as S
from flax_narrow.train.config import DataConfig, KDConfig, MeshConfig, TrainConfig, load_config
from flax_narrow.train.loop import _check_resume_meta, pretrain
from flax_narrow.train.masking import MaskedBatch, MaskingSpec, mask_tokens
from flax_narrow.train.objectives import mlm_sums
from flax_narrow.train.optimizer import learning_rate_schedule, make_optimizer

CLS, SEP, PAD = 2, 3, 0


def _old_pack_token_lists(token_lists, seq_len, cls_id, sep_id, pad_id):
    """train/data.py's pack_token_lists before segment ids existed, verbatim: the reference for 'unchanged'."""
    body = seq_len - 2
    stream: list[int] = []
    for ids in token_lists:
        if ids:
            stream.extend(ids)
            stream.append(sep_id)
    if not stream:
        return np.zeros((0, seq_len), np.int32)
    n_rows = -(-len(stream) // body)
    out = np.full((n_rows, seq_len), pad_id, np.int32)
    for r in range(n_rows):
        chunk = stream[r * body : (r + 1) * body]
        out[r, 0] = cls_id
        out[r, 1 : 1 + len(chunk)] = chunk
        out[r, 1 + len(chunk)] = sep_id
    return out


def _random_docs(n=40, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=int(rng.integers(0, 24))).tolist() for _ in range(n)]


# --------------------------------------------------------------------------------------------- packing
def test_segments_number_the_pieces_of_each_row_and_the_ids_are_unchanged():
    docs = _random_docs()
    ids, seg = D.pack_rows(docs, 16, CLS, SEP, PAD)
    np.testing.assert_array_equal(ids, _old_pack_token_lists(docs, 16, CLS, SEP, PAD))
    np.testing.assert_array_equal(D.pack_token_lists(docs, 16, CLS, SEP, PAD), ids)
    assert seg.dtype == np.int32 and seg.shape == ids.shape
    np.testing.assert_array_equal(seg == 0, ids == PAD)  # 0 exactly at the padding (of the last row)
    assert np.all(seg[:, 0] == 1) and np.all(seg[:, 1] == 1)  # the row's CLS belongs to its first piece
    for r in range(len(ids)):
        real = seg[r][seg[r] > 0]
        assert np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)  # contiguous runs 1, 2, ...
        # a new piece starts right after a SEP, never elsewhere
        starts = np.flatnonzero(np.diff(real) == 1) + 1
        assert np.all(ids[r][starts - 1] == SEP)
        # the closing SEP joins the last piece
        last = np.flatnonzero(seg[r])[-1]
        assert ids[r, last] == SEP and seg[r, last] == real.max()
    # Every document comes back whole, in order: its pieces (a document cut at a row end continues as piece 1
    # of the next row) joined, without CLS and the row's closing SEP.
    pieces = []
    for r in range(len(ids)):
        last = np.flatnonzero(seg[r])[-1]
        for s in range(1, seg[r].max() + 1):
            idx = [i for i in np.flatnonzero(seg[r] == s) if i != 0 and i != last]
            pieces.append(ids[r, idx].tolist())
    stream = [t for p in pieces for t in p]
    assert stream == [t for d in docs if d for t in [*d, SEP]]
    # the data holds documents cut at a row end (the row's last token before its SEP is not a SEP)
    assert any(ids[r, -2] != SEP for r in range(len(ids) - 1))


def test_dict_rows_shard_over_hosts_like_plain_rows():
    rows = [{"input_ids": np.full(8, i, np.int32), "segment_ids": np.full(8, i % 3, np.int32)} for i in range(50)]
    plain = [r["input_ids"] for r in rows]
    single = D.to_iterator(D.train_dataset(rows, seed=3, accum=2, shard=D.HostShard(0, 1, 8)), 0)
    same = D.to_iterator(D.train_dataset(plain, seed=3, accum=2, shard=D.HostShard(0, 1, 8)), 0)
    hosts = [D.to_iterator(D.train_dataset(rows, seed=3, accum=2, shard=D.HostShard(h, 2, 4)), 2) for h in range(2)]
    for _ in range(5):
        want = next(single)
        assert set(want) == {"input_ids", "segment_ids"} and want["segment_ids"].shape == (2, 8, 8)
        np.testing.assert_array_equal(want["input_ids"], next(same))  # the same order as plain rows
        np.testing.assert_array_equal(want["segment_ids"], want["input_ids"] % 3)  # each row keeps its own ids
        got = [next(h) for h in hosts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got], axis=1), want[k])
    assert D.split_rows(want)[1] is want["segment_ids"] and D.split_rows(want["input_ids"])[1] is None
    for it in [single, same, *hosts]:
        it.close()


def _stdlib_cfg(data_cache, **kw):
    return DataConfig(
        **{
            **dict(source="stdlib", max_documents=400, tokenizer_vocab_size=1024, seq_len=64, cache_dir=data_cache),
            **kw,
        }
    )


def test_concat_cache_keeps_its_key_and_rows_and_segments_get_their_own(data_cache):
    cfg = _stdlib_cfg(data_cache)
    train, _ = D.load_documents(cfg, data_cache)
    tok = D.get_tokenizer(cfg, train, data_cache)
    # The default's key is what it was before the option existed (so existing caches are reused).
    old_key = D._digest(
        {
            "src": D.source_key(cfg, data_cache),
            "split": "train",
            "tok": D.tokenizer_fingerprint(tok),
            "seq_len": 64,
            "v": D.PACK_VERSION,
        }
    )
    concat_dir = D.packed_cache_dir(cfg, tok, data_cache, "train")
    assert os.path.basename(concat_dir) == f"train-L64-{old_key}"
    seg_cfg = dataclasses.replace(cfg, packing="segments")
    seg_dir = D.packed_cache_dir(seg_cfg, tok, data_cache, "train")
    assert seg_dir != concat_dir and "-segments-" in os.path.basename(seg_dir)
    concat = D.PackedRows(D.packed_cached(train, tok, cfg, data_cache, "train"))
    segs = D.PackedRows(D.packed_cached(train, tok, seg_cfg, data_cache, "train"))
    assert not concat.has_segments and segs.has_segments
    assert os.path.isdir(concat_dir) and os.path.isdir(seg_dir)
    # Option off: the rows are the old code's rows, in the old form (plain arrays).
    enc = tok(
        [t if isinstance(t, str) else "" for t in train["text"]],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    ids, sid, pid = D.special_ids(tok)
    old = np.concatenate(
        [_old_pack_token_lists(enc[i : i + 1000], 64, ids, sid, pid) for i in range(0, len(enc), 1000)]
    )
    rows = concat.rows(0, len(concat))
    assert isinstance(rows, np.ndarray) and isinstance(concat[0], np.ndarray)
    np.testing.assert_array_equal(rows, old)
    # Option on: the same ids plus int32 segment ids, 0 exactly at padding; the same data order.
    both = segs.rows(0, len(segs))
    np.testing.assert_array_equal(both["input_ids"], old)
    assert both["segment_ids"].dtype == np.int32 and both["segment_ids"].max() >= 3
    np.testing.assert_array_equal(both["segment_ids"] == 0, old == pid)
    a = D.to_iterator(D.train_dataset(concat, seed=0, accum=1, shard=D.HostShard(0, 1, 4)), 0)
    b = D.to_iterator(D.train_dataset(segs, seed=0, accum=1, shard=D.HostShard(0, 1, 4)), 0)
    for _ in range(3):
        np.testing.assert_array_equal(next(a), next(b)["input_ids"])
    a.close()
    b.close()


def test_streaming_rows_carry_the_same_segment_ids(tmp_path):
    docs = [f"document {i} talks about topic {i % 7} and the number {i * 13}." for i in range(120)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cache = str(tmp_path / "cache")
    base = DataConfig(source="files", files=(str(tmp_path / "c.jsonl"),), seq_len=16, eval_fraction=0.0)
    base = dataclasses.replace(base, packing="segments")
    train, _ = D.load_documents(base, cache)
    tok = D.train_wordpiece(iter(train["text"]), 150, str(tmp_path / "tok"))
    rows = D.PackedRows(D.packed_cached(train, tok, base, cache, "train")).rows(0, 12)
    scfg = dataclasses.replace(base, streaming=True, shuffle_buffer=1)
    sdocs, _ = D.load_documents(scfg, cache)
    it = D.to_iterator(D.streaming_dataset(sdocs, tok, scfg, seed=0, accum=1, rows=4), 0)
    got = [next(it) for _ in range(3)]
    for k in ("input_ids", "segment_ids"):
        np.testing.assert_array_equal(np.concatenate([g[k][0] for g in got]), rows[k])
    it.close()


# --------------------------------------------------------------------------------------------- the model side
SPEC = MaskingSpec(
    max_predictions=8,
    vocab_size=128,
    mask_token_id=4,
    pad_token_id=PAD,
    special_token_ids=(0, 1, 2, 3, 4),
    mask_prob=0.3,
)
MODELS = {
    "bert": EncoderConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2),
    "narrowbert": EncoderConfig.tiny_narrowbert(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2
    ),
}


def _packed_batch(rows=4, length=32):
    ids, seg = D.pack_rows(_random_docs(60, seed=1), length, CLS, SEP, PAD)
    assert len(ids) >= rows and (seg[:rows].max(axis=1) >= 2).all()  # several documents per row
    return ids[:rows], seg[:rows]


def _alone(masked: MaskedBatch) -> tuple[MaskedBatch, list[tuple[int, int, int, int]]]:
    """Each segment of each packed row as a row of its own (its tokens from position 0, then padding), with its
    predicted slots; and the map (packed row, packed slot, alone row, alone slot)."""
    ids, seg = np.asarray(masked.input_ids), np.asarray(masked.segment_ids)
    pos, val, lab = np.asarray(masked.positions), np.asarray(masked.valid), np.asarray(masked.labels)
    batch, length = ids.shape
    p = pos.shape[1]
    rows, positions, valid, labels, where = [], [], [], [], []
    for b in range(batch):
        for s in range(1, int(seg[b].max()) + 1):
            idx = np.flatnonzero(seg[b] == s)
            start, end = int(idx[0]), int(idx[-1]) + 1
            row = np.full(length, PAD, np.int32)
            row[: end - start] = ids[b, start:end]
            slots = [k for k in range(p) if val[b, k] and start <= pos[b, k] < end]
            r = len(rows)
            rows.append(row)
            positions.append(np.pad(pos[b, slots] - start, (0, p - len(slots))))
            valid.append(np.arange(p) < len(slots))
            labels.append(np.pad(lab[b, slots], (0, p - len(slots))))
            where += [(b, k, r, j) for j, k in enumerate(slots)]
    rows = np.stack(rows)
    alone = MaskedBatch(
        input_ids=jnp.asarray(rows),
        attention_mask=jnp.asarray(rows != PAD),
        positions=jnp.asarray(np.stack(positions), jnp.int32),
        valid=jnp.asarray(np.stack(valid)),
        labels=jnp.asarray(np.stack(labels), jnp.int32),
    )
    return alone, where


def _state(model_cfg, accum):
    tcfg = TrainConfig(steps=10, global_batch_size=4, grad_accum_steps=accum, max_predictions=8)
    tx = make_optimizer(tcfg)
    state, rest, spec = S.create_state(model_cfg, tx, shd.make_mesh(MeshConfig(1, 1, 1)), seed=0)
    return state, rest, spec, tx, tcfg


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_batch_equals_its_documents_run_alone(name):
    state, rest, spec, tx, tcfg = _state(MODELS[name], accum=2)
    ids, seg = _packed_batch()
    g, params = spec.graphdef, state.params

    # Evaluation: the eval step's sums over the packed batch are those of the documents one per row.
    masked = mask_tokens(jnp.asarray(ids), S.eval_mask_key(0, 0), SPEC, segment_ids_bl=jnp.asarray(seg))
    assert not np.asarray(masked.valid & (jnp.take_along_axis(masked.segment_ids, masked.positions, 1) == 0)).any()
    alone, where = _alone(masked)
    assert len(where) == int(masked.valid.sum()) >= 20
    packed_logits = np.asarray(S._forward(g, params, rest, masked, deterministic=True))
    alone_logits = np.asarray(S._forward(g, params, rest, alone, deterministic=True))
    for b, k, r, j in where:
        np.testing.assert_allclose(packed_logits[b, k], alone_logits[r, j], atol=2e-5)
    ref = {k: float(v) for k, v in mlm_sums(jnp.asarray(alone_logits), alone.labels, alone.valid).items()}
    ev = jax.jit(S.make_eval_step(g, SPEC, seed=0, kd=KDConfig()))
    got = jax.device_get(ev(params, jnp.asarray(ids), jnp.int32(0), rest, None, None, jnp.asarray(seg)))
    np.testing.assert_allclose(float(got["ce_sum"]), ref["ce_sum"], rtol=1e-5)
    assert float(got["count"]) == ref["count"]
    mixed = jax.device_get(ev(params, jnp.asarray(ids), jnp.int32(0), rest, None, None))  # documents see each other
    assert not np.isclose(float(mixed["ce_sum"]), ref["ce_sum"], rtol=1e-4)  # 10x the tolerance above

    # Training (2 micro-batches, dropout off): the first step's MLM loss is that of the documents run alone.
    ce, count = 0.0, 0.0
    for m in range(2):
        key, _ = S.step_keys(0, jnp.int32(0), m)
        rows = jnp.arange(2, dtype=jnp.int32) + 2 * m
        mm = mask_tokens(jnp.asarray(ids[2 * m : 2 * m + 2]), key, SPEC, rows, jnp.asarray(seg[2 * m : 2 * m + 2]))
        a, _ = _alone(mm)
        sums = mlm_sums(S._forward(g, params, rest, a, deterministic=True), a.labels, a.valid)
        ce, count = ce + float(sums["ce_sum"]), count + float(sums["count"])
    fn = jax.jit(S.make_train_step(g, tx, SPEC, seed=0, schedule=learning_rate_schedule(tcfg), kd=KDConfig()))
    ids_abl, seg_abl = jnp.asarray(ids).reshape(2, 2, -1), jnp.asarray(seg).reshape(2, 2, -1)
    _, metrics = fn(state, ids_abl, rest, None, None, seg_abl)
    np.testing.assert_allclose(float(metrics["mlm_loss"]), ce / count, rtol=1e-5)
    assert float(metrics["predictions"]) == count
    _, plain = fn(state, ids_abl, rest, None, None)
    assert not np.isclose(float(plain["mlm_loss"]), ce / count, rtol=1e-4)


def test_masking_never_selects_segment_zero():
    ids = np.full((2, 12), 50, np.int32)
    seg = np.ones((2, 12), np.int32)
    seg[:, 8:] = 0  # not padding ids, but outside every segment: never selected, never attended
    m = mask_tokens(jnp.asarray(ids), jax.random.key(0), dataclasses.replace(SPEC, mask_prob=1.0), None, seg)
    pos, val = np.asarray(m.positions), np.asarray(m.valid)
    assert val.sum() == 16 and (pos[val] < 8).all()
    assert not np.asarray(m.attention_mask)[:, 8:].any()
    full = mask_tokens(jnp.asarray(ids), jax.random.key(0), dataclasses.replace(SPEC, mask_prob=1.0))
    assert (np.asarray(full.positions)[np.asarray(full.valid)] >= 8).any()  # without segment ids they would be


# --------------------------------------------------------------------------------------------- the program
def _run_cfg(data_cache, out=None, **extra):
    values = {
        "data.packing": "segments",
        "train.steps": 6,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "data.eval_fraction": 0.1,
        "checkpoint.every_steps": 3,
        "train.output_bias_init": "unigram",  # counts the rows' token ids (dict rows with segments)
        **extra,
    }
    if out is not None:
        values["output_dir"] = out
    return load_config("tiny", None, small_overrides(data_cache, **values))


@pytest.mark.slow
def test_pretrain_with_segments_resumes_bit_exactly_evaluates_and_shards(tmp_path, data_cache):
    whole = pretrain(_run_cfg(data_cache))
    assert [h["step"] for h in whole.history] == list(range(1, 7)) and len(whole.evals) == 2
    assert all(np.isfinite(h["loss"]) for h in whole.history) and whole.evals[-1]["eval_predictions"] > 0
    run = str(tmp_path / "run")
    first = pretrain(_run_cfg(data_cache, run), stop_at=3)
    assert first.final_step == 3
    second = pretrain(_run_cfg(data_cache, run, **{"checkpoint.resume": "true"}))
    assert second.start_step == 3
    assert [h["loss"] for h in first.history + second.history] == [h["loss"] for h in whole.history]
    assert [e["eval_loss"] for e in first.evals + second.evals] == [e["eval_loss"] for e in whole.evals]
    # Resuming with the other packing is refused.
    with pytest.raises(ConfigError, match="data.packing: checkpoint segments vs now concat"):
        pretrain(_run_cfg(data_cache, run, **{"checkpoint.resume": "true", "data.packing": "concat", "train.steps": 9}))
    # 8 devices (data x fsdp): the segment ids are sharded like the ids, and the losses are the 1-device ones.
    eight = pretrain(_run_cfg(data_cache, **{"mesh.data": 2, "mesh.fsdp": 4, "train.eval_every": 0}), stop_at=3)
    np.testing.assert_allclose([h["loss"] for h in eight.history], [h["loss"] for h in whole.history[:3]], rtol=1e-5)
    # The loop really passes them: the default packing trains on the same rows with other losses.
    concat = pretrain(_run_cfg(data_cache, **{"data.packing": "concat", "train.eval_every": 0}), stop_at=2)
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(concat.history, whole.history))
    assert [h["tokens"] for h in concat.history] == [h["tokens"] for h in whole.history[:2]]


def test_resume_meta_compares_the_packing():
    cfg = load_config("tiny", None, ["data.packing=segments"])
    meta = {"config": cfg.to_dict()}
    _check_resume_meta(cfg, meta, "ck")  # same: fine
    old = json.loads(json.dumps(meta))
    del old["config"]["data"]["packing"]  # a checkpoint written before the option: it packed by concat
    with pytest.raises(ConfigError, match="data.packing: checkpoint concat vs now segments"):
        _check_resume_meta(cfg, old, "ck")
    _check_resume_meta(load_config("tiny"), old, "ck")


@pytest.mark.parametrize(
    "value,message", [("bogus", "data: packing 'bogus' is not one of ('concat', 'segments')"), ("", "packing ''")]
)
def test_bad_packing_is_one_line(value, message, capsys):
    with pytest.raises(ConfigError, match="packing"):
        load_config("tiny", None, [f"data.packing={value}"])
    rc = main(["pretrain", "--preset", "tiny", "--set", f"data.packing={value}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_print_config_shows_the_packing(capsys):
    assert main(["pretrain", "--preset", "tiny", "--set", "data.packing=segments", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["packing"] == "segments"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_compile_only_compiles_the_step_with_segment_ids():
    cfg = load_config("tiny")
    plain = aot.compile_for_topology(cfg, "v4-8")
    seg = aot.compile_for_topology(load_config("tiny", None, ["data.packing=segments"]), "v4-8")
    assert plain.fits and seg.fits
    # one more int32[A, Bm, L] input, split over the 4 devices' batch rows (TPU layouts pad it: up to 4x)
    extra = cfg.train.global_batch_size * cfg.data.seq_len * 4 // plain.num_devices
    assert extra <= seg.argument_bytes - plain.argument_bytes <= 4 * extra
    assert seg.xla_flops_per_device > plain.xla_flops_per_device  # and the segment masks are computed
