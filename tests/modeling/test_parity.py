"""Parity with transformers' PyTorch models: tiny random models saved to disk, loaded via from_pretrained."""

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from conftest import max_diff, save_torch_model, tiny_hf_config, torch_run

ATOL = 1e-5

HEADS = [
    ("BertModel", "last_hidden_state", {}),
    ("BertForMaskedLM", "logits", {}),
    ("BertForSequenceClassification", "logits", {"num_labels": 3}),
    ("BertForTokenClassification", "logits", {"num_labels": 5}),
    ("BertForQuestionAnswering", "start_logits", {}),
]


@pytest.mark.parametrize("name,field,extra", HEADS)
def test_every_head_matches_transformers(tmp_path, padded_batch, name, field, extra):
    torch.manual_seed(0)
    tm = getattr(transformers, name)(tiny_hf_config(**extra))
    d = save_torch_model(tm, tmp_path / "ckpt")
    ref = torch_run(tm, padded_batch)
    fm = getattr(fn, name).from_pretrained(d)
    out = fm(**padded_batch)
    mask = (
        padded_batch["attention_mask"]
        if getattr(out, field).ndim >= 2
        and field != "logits"
        or name in ("BertForMaskedLM", "BertForTokenClassification")
        else None
    )
    if name == "BertForSequenceClassification":
        mask = None
    assert max_diff(getattr(out, field), getattr(ref, field), mask) <= ATOL
    if name == "BertModel":
        assert max_diff(out.pooler_output, ref.pooler_output) <= ATOL
    if name == "BertForQuestionAnswering":
        assert max_diff(out.end_logits, ref.end_logits, padded_batch["attention_mask"]) <= ATOL


def test_multiple_choice_matches_transformers(tmp_path, padded_batch):
    torch.manual_seed(1)
    tm = transformers.BertForMultipleChoice(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "mc")
    batch = {k: np.stack([v, v[::-1]], axis=0) for k, v in padded_batch.items()}  # (B=2, C=2, L)
    labels = np.array([1, 0])
    ref = torch_run(tm, {**batch, "labels": labels})
    out = fn.BertForMultipleChoice.from_pretrained(d)(**batch, labels=labels)
    assert out.logits.shape == (2, 2)
    assert max_diff(out.logits, ref.logits) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


@pytest.mark.parametrize(
    "name,labels_fn",
    [
        ("BertForMaskedLM", lambda b: np.where(b["attention_mask"] == 1, b["input_ids"], -100)),
        ("BertForTokenClassification", lambda b: np.where(b["attention_mask"] == 1, b["input_ids"] % 2, -100)),
        ("BertForSequenceClassification", lambda b: np.array([1, 0])),
    ],
)
def test_losses_match_transformers(tmp_path, padded_batch, name, labels_fn):
    torch.manual_seed(2)
    tm = getattr(transformers, name)(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "m")
    labels = labels_fn(padded_batch)
    ref = torch_run(tm, {**padded_batch, "labels": labels})
    out = getattr(fn, name).from_pretrained(d)(**padded_batch, labels=labels)
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("regression", np.array([0.5, -1.0], np.float32)),
        ("multi_label_classification", np.array([[1, 0, 1], [0, 1, 1]], np.float32)),
    ],
)
def test_regression_and_multilabel_losses(tmp_path, padded_batch, problem_type, labels):
    torch.manual_seed(3)
    num_labels = 1 if problem_type == "regression" else 3
    tm = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=num_labels, problem_type=problem_type))
    d = save_torch_model(tm, tmp_path / "m")
    ref = torch_run(tm, {**padded_batch, "labels": labels})
    out = fn.BertForSequenceClassification.from_pretrained(d)(**padded_batch, labels=labels)
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


def test_qa_loss_matches_including_out_of_range_targets(tmp_path, padded_batch):
    torch.manual_seed(4)
    tm = transformers.BertForQuestionAnswering(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "qa")
    kw = {"start_positions": np.array([1, 40]), "end_positions": np.array([3, 2])}
    ref = torch_run(tm, {**padded_batch, **kw})
    out = fn.BertForQuestionAnswering.from_pretrained(d)(**padded_batch, **kw)
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


def test_hidden_states_and_attentions_match(tmp_path, padded_batch):
    torch.manual_seed(5)
    tm = transformers.BertModel(tiny_hf_config(attn_implementation="eager"))
    d = save_torch_model(tm, tmp_path / "m")
    tm.eval()
    with torch.no_grad():
        ref = tm(
            **{k: torch.from_numpy(v) for k, v in padded_batch.items()},
            output_hidden_states=True,
            output_attentions=True,
        )
    out = fn.BertModel.from_pretrained(d)(**padded_batch, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(a, b, padded_batch["attention_mask"]) <= ATOL
    keep = padded_batch["attention_mask"].astype(bool)
    for a, b in zip(out.attentions, ref.attentions):  # (B, N, T, S): compare real query rows
        a, b = np.asarray(a), b.numpy()
        assert np.abs(a - b).transpose(0, 2, 1, 3)[keep].max() <= ATOL


def test_roberta_positions_and_weights(tmp_path):
    torch.manual_seed(6)
    cfg = transformers.RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    tm = transformers.RobertaModel(cfg)
    d = save_torch_model(tm, tmp_path / "rob")
    ids = np.array([[0, 15, 16, 17, 18, 2], [0, 30, 31, 2, 1, 1]], np.int64)
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    ref = torch_run(tm, batch)
    fm = fn.BertModel.from_pretrained(d)
    assert fm.config.model_type == "roberta" and fm.config.position_offset == 2
    out = fm(**batch)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state, batch["attention_mask"]) <= ATOL
    assert max_diff(out.pooler_output, ref.pooler_output) <= ATOL


def test_roberta_mlm_head_loads_into_bert_mlm(tmp_path):
    torch.manual_seed(7)
    cfg = transformers.RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
    )
    tm = transformers.RobertaForMaskedLM(cfg)
    d = save_torch_model(tm, tmp_path / "rob")
    ids = np.array([[0, 15, 16, 17, 18, 2], [0, 30, 31, 2, 1, 1]], np.int64)
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    ref = torch_run(tm, batch)
    out = fn.BertForMaskedLM.from_pretrained(d)(**batch)
    assert max_diff(out.logits, ref.logits, batch["attention_mask"]) <= ATOL


def test_logits_at_positions_equal_dense_logits(tmp_path, padded_batch):
    torch.manual_seed(8)
    tm = transformers.BertForMaskedLM(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "m")
    ref = torch_run(tm, padded_batch).logits.numpy()
    fm = fn.BertForMaskedLM.from_pretrained(d)
    mask = np.zeros((2, 8), bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [2]] = True
    pos, valid = fn.positions_from_mask(mask, max_positions=4)
    out = fm(**padded_batch, narrow_positions=pos, narrow_valid=valid)
    assert out.logits.shape == (2, 4, 99)
    got = np.asarray(out.logits)[np.asarray(valid)]
    assert np.abs(got - ref[mask]).max() <= ATOL
    labels_bl = np.where(mask, padded_batch["input_ids"], -100)
    dense_loss = float(torch_run(tm, {**padded_batch, "labels": labels_bl}).loss)
    sparse = fm(**padded_batch, narrow_positions=pos, narrow_valid=valid, labels=labels_bl)
    assert abs(float(sparse.loss) - dense_loss) <= ATOL


def test_vocab_padding_changes_nothing_but_the_matmul_shape(tmp_path, padded_batch):
    """vocab_pad_multiple=128 pads the tied decoder 99 -> 128 inside the head: logits, loss (vs transformers)
    and gradients (vs the unpadded model) are unchanged, and the parameters keep the true vocabulary."""
    import jax
    from flax import nnx

    torch.manual_seed(10)
    tm = transformers.BertForMaskedLM(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "m")
    labels = np.where(padded_batch["attention_mask"] > 0, padded_batch["input_ids"], -100)
    ref = torch_run(tm, {**padded_batch, "labels": labels})
    padded = fn.BertForMaskedLM.from_pretrained(d, vocab_pad_multiple=128)
    plain = fn.BertForMaskedLM.from_pretrained(d)
    assert padded.bert.embeddings.word_embeddings.embedding.shape == (99, 32)
    out = padded(**padded_batch, labels=labels)
    assert out.logits.shape == (2, 8, 99)
    assert max_diff(out.logits, ref.logits, padded_batch["attention_mask"]) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: nnx.merge(graphdef, p, rest)(**padded_batch, labels=labels).loss  # noqa: E731
        return jax.tree.leaves(jax.grad(loss)(params))

    for a, b in zip(grads(padded), grads(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_dropout_only_when_not_deterministic():
    from flax import nnx

    m = fn.BertModel(fn.EncoderConfig.tiny(), rngs=nnx.Rngs(0))
    ids = np.array([[2, 5, 6, 7]])
    a = m(ids).last_hidden_state
    b = m(ids).last_hidden_state
    c = m(ids, deterministic=False).last_hidden_state
    d = m(ids, deterministic=False).last_hidden_state
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3  # fresh dropout masks every call


def test_bf16_compute_with_fp32_params(tmp_path, padded_batch):
    torch.manual_seed(9)
    tm = transformers.BertModel(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "m")
    ref = torch_run(tm, padded_batch).last_hidden_state
    fm = fn.BertModel.from_pretrained(d, dtype="bfloat16")
    from flax import nnx

    params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(fm, nnx.Param))]
    assert params and all(p.dtype == np.float32 for p in params)
    out = fm(**padded_batch).last_hidden_state
    assert out.dtype == np.dtype("bfloat16")
    assert max_diff(out, ref, padded_batch["attention_mask"]) < 0.1  # bf16 rounding, not a wrong model


def test_cudnn_attention_refuses_attention_dropout():
    """No silent fallback: cuDNN attention cannot drop attention probabilities, so training with it and
    attention_probs_dropout_prob > 0 is an error naming the setting (inference is fine; checked on CPU
    where the error comes before any cuDNN call)."""
    from flax import nnx

    m = fn.BertModel(fn.EncoderConfig.tiny(attention_impl="cudnn"), rngs=nnx.Rngs(0))
    with pytest.raises(fn.ConfigError, match="attention_probs_dropout_prob=0"):
        m(np.array([[2, 5, 6, 7]]), deterministic=False)


def test_small_table_lookup_has_the_gather_gradient():
    """Positions/token types use a one-hot-matmul gradient (no scatter atomics); it equals the gather's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_narrow.modeling.layers import lookup_small_table

    emb = nnx.Embed(7, 5, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 3, 3, 6], [3, 3, 1, 0]])
    g = jax.random.normal(jax.random.key(1), (2, 4, 5))
    table = emb.embedding[...]

    graphdef = nnx.graphdef(emb)

    def ours(state):
        return (lookup_small_table(nnx.merge(graphdef, state), ids) * g).sum()

    want = jax.grad(lambda t: (jnp.take(t, ids, axis=0) * g).sum())(table)
    got = jax.grad(ours)(nnx.state(emb)).embedding[...]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert np.abs(np.asarray(want)[[2, 4, 5]]).max() == 0 and np.abs(np.asarray(got)[3]).max() > 0


def test_fused_qkv_matches_transformers_and_the_unfused_gradients(tmp_path, padded_batch):
    """fuse_qkv=True (one (H, 3H) matmul per layer) keeps transformers' logits and loss, the unfused gradients,
    and the same dropout masks (same seed)."""
    import jax
    from flax import nnx

    torch.manual_seed(11)
    tm = transformers.BertForMaskedLM(tiny_hf_config())
    d = save_torch_model(tm, tmp_path / "m")
    labels = np.where(padded_batch["attention_mask"] > 0, padded_batch["input_ids"], -100)
    ref = torch_run(tm, {**padded_batch, "labels": labels})
    fused = fn.BertForMaskedLM.from_pretrained(d, fuse_qkv=True)
    plain = fn.BertForMaskedLM.from_pretrained(d)
    out = fused(**padded_batch, labels=labels)
    assert max_diff(out.logits, ref.logits, padded_batch["attention_mask"]) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL

    def grads(model, deterministic):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            nnx.reseed(m, default=jax.random.key(3))
            return m(**padded_batch, labels=labels, deterministic=deterministic).loss

        return jax.tree.leaves(jax.grad(loss)(params))

    for deterministic in (True, False):
        for a, b in zip(grads(fused, deterministic), grads(plain, deterministic), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
