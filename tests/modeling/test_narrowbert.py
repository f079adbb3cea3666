"""NarrowBERT parity against a PyTorch reference written from the spec, saved in the authors' and the port's
layouts; the F = N identity; the CLS path; compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import flax_narrow as fn
from flax_narrow.errors import ConfigError
from narrow_reference import (
    TINY_NARROW,
    RefForMaskedLM,
    RefForMultipleChoice,
    RefForSequenceClassification,
    RefForTokenClassification,
    randomize,
    save_authors_checkpoint,
    save_port_checkpoint,
)

ATOL = 1e-5
CFG = TINY_NARROW


@pytest.fixture
def batch():
    """Three rows: padding in rows 1 and 2, token types, and 3 / 1 / 2 selected positions."""
    ids = np.array(
        [[2, 11, 12, 13, 14, 15, 16, 3], [2, 21, 22, 23, 3, 0, 0, 0], [2, 31, 32, 33, 34, 3, 0, 0]], np.int64
    )
    mask = (ids != 0).astype(np.int64)
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]], np.int64)
    labels = np.full(ids.shape, -100, np.int64)
    for row, cols in enumerate([[1, 4, 6], [3], [0, 5]]):
        labels[row, cols] = (ids[row, cols] * 7) % CFG["vocab_size"]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, labels


def _t(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _valid_rows(out, labels):
    """Valid (B, P, ...) rows of our output, in the order of the reference's packed rows."""
    return np.asarray(out)[np.asarray(labels != -100).sum(1)[:, None] > np.arange(out.shape[1])[None]]


def _ref_rows(ref, labels):
    counts = (labels != -100).sum(1)
    return np.concatenate([ref[i, : counts[i]] for i in range(len(counts))])


@pytest.mark.parametrize("layout", ["authors", "port"])
def test_masked_lm_matches_reference(tmp_path, batch, layout):
    inputs, labels = batch
    ref = randomize(RefForMaskedLM(CFG), seed=0)
    with torch.no_grad():
        ref_logits, ref_loss = ref(**_t(inputs), labels=torch.from_numpy(labels))
    save = save_authors_checkpoint if layout == "authors" else save_port_checkpoint
    d = save(ref, tmp_path / layout, CFG, "NarrowBertForMaskedLM")
    model = fn.NarrowBertForMaskedLM.from_pretrained(d)
    assert model.config.full_length_layers == 2 and model.config.is_narrow
    # 1) derive the rows from labels, as the authors do
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 3, CFG["vocab_size"])  # P = the largest count
    got = _valid_rows(out.logits, labels)
    assert np.abs(got - _ref_rows(ref_logits.numpy(), labels)).max() <= ATOL
    assert abs(float(out.loss) - float(ref_loss)) <= ATOL
    # 2) explicit static positions with a larger budget P = 5 and (B, P) labels
    pos, valid = fn.positions_from_mask(labels != -100, max_positions=5)
    row_labels = np.where(valid, np.take_along_axis(labels, np.asarray(pos), 1), -100)
    out2 = model(**inputs, narrow_positions=pos, narrow_valid=valid, labels=row_labels)
    assert out2.logits.shape == (3, 5, CFG["vocab_size"])
    assert np.abs(_valid_rows(out2.logits, labels) - _ref_rows(ref_logits.numpy(), labels)).max() <= ATOL
    assert abs(float(out2.loss) - float(ref_loss)) <= ATOL


@pytest.mark.parametrize("layout", ["authors", "port"])
def test_sequence_classification_cls_path(tmp_path, batch, layout):
    inputs, _ = batch
    ref = randomize(RefForSequenceClassification(CFG, 3), seed=1)
    with torch.no_grad():
        ref_logits = ref(**_t(inputs)).numpy()
    save = save_authors_checkpoint if layout == "authors" else save_port_checkpoint
    d = save(ref, tmp_path / layout, CFG, "NarrowBertForSequenceClassification", num_labels=3)
    model = fn.NarrowBertForSequenceClassification.from_pretrained(d)
    out = model(**inputs, labels=np.array([0, 2, 1]))
    assert out.logits.shape == (3, 3)
    assert np.abs(np.asarray(out.logits) - ref_logits).max() <= ATOL
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(ref_logits), torch.tensor([0, 2, 1]))
    assert abs(float(out.loss) - float(expected)) <= ATOL
    base = fn.NarrowBertModel.from_pretrained(d)  # the base model selects nothing by itself: every row
    cls = base(**inputs, cls_only=True)
    assert cls.last_hidden_state.shape == (3, 1, 32)


@pytest.mark.parametrize("layout", ["authors", "port"])
def test_token_classification_matches_reference(tmp_path, batch, layout):
    inputs, labels = batch
    tags = np.where(labels != -100, labels % 5, -100)
    ref = randomize(RefForTokenClassification(CFG, 5), seed=2)
    with torch.no_grad():
        ref_logits = ref(**_t(inputs), labels=torch.from_numpy(tags)).numpy()
    save = save_authors_checkpoint if layout == "authors" else save_port_checkpoint
    d = save(ref, tmp_path / layout, CFG, "NarrowBertForTokenClassification", num_labels=5)
    model = fn.NarrowBertForTokenClassification.from_pretrained(d)
    out = model(**inputs, labels=tags)
    assert np.abs(_valid_rows(out.logits, tags) - _ref_rows(ref_logits, tags)).max() <= ATOL
    packed = torch.from_numpy(tags[tags != -100])  # row-major: the reference's packed order
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(_ref_rows(ref_logits, tags)), packed)
    assert abs(float(out.loss) - float(expected)) <= ATOL
    # scatter back to (B, L, labels): selected tokens carry their logits, others the fill value
    full = fn.scatter_rows(out.logits, out.narrow_positions, out.narrow_valid, 8, fill_value=np.nan)
    assert full.shape == (3, 8, 5) and np.isnan(np.asarray(full)[tags == -100]).all()


def test_multiple_choice_port_head(tmp_path, batch):
    inputs, _ = batch
    mc = {k: np.stack([v, v[[1, 2, 0]]], axis=1) for k, v in inputs.items()}  # (B=3, C=2, L)
    ref = randomize(RefForMultipleChoice(CFG), seed=3)
    with torch.no_grad():
        ref_logits = ref(**_t(mc)).numpy()
    d = save_port_checkpoint(ref, tmp_path / "port", CFG, "NarrowBertForMultipleChoice", num_labels=1)
    out = fn.NarrowBertForMultipleChoice.from_pretrained(d)(**mc)
    assert out.logits.shape == (3, 2)
    assert np.abs(np.asarray(out.logits) - ref_logits).max() <= ATOL


def test_f_equals_n_is_bert_gathered(tmp_path, batch):
    inputs, labels = batch
    cfg = fn.EncoderConfig.tiny(num_hidden_layers=3)
    bert = fn.BertModel.from_config(cfg, seed=4)
    narrow = fn.NarrowBertModel.from_config(cfg.replace(full_length_layers=3, model_type="narrow_bert"), seed=4)
    assert not narrow.config.is_narrow
    pos, valid = fn.positions_from_mask(labels != -100, max_positions=4)
    dense = bert(**inputs).last_hidden_state
    got = narrow(**inputs, narrow_positions=pos, narrow_valid=valid).last_hidden_state
    np.testing.assert_allclose(got, fn.gather_rows(dense, pos), atol=1e-6)


def test_narrow_rows_are_independent_and_dense_mode_covers_every_row(batch):
    inputs, labels = batch
    model = fn.NarrowBertForMaskedLM.from_config(fn.EncoderConfig.tiny_narrowbert(), seed=5)
    dense = model(inputs["input_ids"], inputs["attention_mask"]).logits  # no selection: all L rows
    assert dense.shape == (3, 8, 128)
    pos, valid = fn.positions_from_mask(labels != -100, max_positions=4)
    sparse = model(inputs["input_ids"], inputs["attention_mask"], narrow_positions=pos, narrow_valid=valid).logits
    np.testing.assert_allclose(np.asarray(sparse)[np.asarray(valid)], np.asarray(dense)[labels != -100], atol=1e-5)


def test_layer_layout_is_cross_checked(tmp_path):
    ref = randomize(RefForMaskedLM(CFG), seed=6)
    d = save_authors_checkpoint(ref, tmp_path / "a", {**CFG, "full_length_layers": 3}, "NarrowBertForMaskedLM")
    with pytest.raises(ConfigError, match=r"full_length_layers=3 .* encoder.layer \[0, 1\] and encoder_narrow"):
        fn.NarrowBertForMaskedLM.from_pretrained(d)
    # The config trap: an authors' checkpoint whose config lost full_length_layers would build 4 full layers.
    d2 = save_authors_checkpoint(
        ref, tmp_path / "b", {k: v for k, v in CFG.items() if k != "full_length_layers"}, "NarrowBertForMaskedLM"
    )
    with pytest.raises(ConfigError, match="NarrowBERT layers"):
        fn.BertForMaskedLM.from_pretrained(d2)


def test_one_compilation_across_different_narrow_masks():
    cfg = fn.EncoderConfig.tiny_narrowbert()
    model = fn.NarrowBertForMaskedLM.from_config(cfg, seed=7)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = {"forward": 0, "step": 0}

    @jax.jit
    def forward(params, ids, pos, valid):
        traces["forward"] += 1
        m = nnx.merge(graphdef, params, rest)
        return m(ids, narrow_positions=pos, narrow_valid=valid).logits

    opt = optax.adamw(1e-3)

    @jax.jit
    def step(params, opt_state, ids, pos, valid, labels_bp):
        traces["step"] += 1

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return m(ids, narrow_positions=pos, narrow_valid=valid, labels=labels_bp).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    rng = np.random.default_rng(0)
    for i in range(4):
        ids = rng.integers(5, 128, size=(2, 16))
        mask = rng.random((2, 16)) < (0.1 + 0.2 * i)  # different which and how many positions
        pos, valid, _ = fn.mask_to_positions(jnp.asarray(mask), 6)
        labels = jnp.where(valid, jnp.take_along_axis(jnp.asarray(ids), pos, 1), -100)
        forward(params, ids, pos, valid)
        params, opt_state, loss = step(params, opt_state, ids, pos, valid, labels)
        assert np.isfinite(float(loss))
    assert traces == {"forward": 1, "step": 1}


@pytest.mark.parametrize("deterministic", [True, False])
def test_absorbed_and_fused_forms_equal_the_standard_form(batch, deterministic):
    inputs, labels = batch
    pos, valid = fn.positions_from_mask(labels != -100, max_positions=4)
    outs = {}
    for form, fuse, qkv in [
        ("standard", False, False),
        ("standard", True, False),
        ("absorbed", False, False),
        ("absorbed", False, True),
    ]:
        cfg = fn.EncoderConfig.tiny_narrowbert(narrow_attention=form, fuse_narrow_kv=fuse, fuse_qkv=qkv)
        model = fn.NarrowBertForMaskedLM.from_config(cfg, seed=8)  # same seed: same weights, same dropout masks
        out = model(
            **inputs, narrow_positions=pos, narrow_valid=valid, deterministic=deterministic, output_attentions=True
        )
        outs[(form, fuse, qkv)] = out
    ref = outs[("standard", False, False)]
    for key, out in outs.items():
        np.testing.assert_allclose(out.logits, ref.logits, atol=2e-5, err_msg=str(key))
        for a, b in zip(out.attentions, ref.attentions):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_auto_form_choice_follows_the_flop_rule():
    from flax_narrow.modeling.layers import use_absorbed_attention

    base = fn.EncoderConfig.narrowbert_base()  # H = 768, N = 12
    assert use_absorbed_attention(base, 1) and use_absorbed_attention(base, 20)  # CLS path, MLM at L = 128
    assert not use_absorbed_attention(base, 80)  # MLM at L = 512: 80·12 > 768
    assert use_absorbed_attention(base.replace(narrow_attention="absorbed"), 80)
    assert not use_absorbed_attention(base.replace(narrow_attention="standard"), 1)


def test_scan_and_remat_change_nothing_but_speed(batch):
    inputs, labels = batch
    pos, valid = fn.positions_from_mask(labels != -100, max_positions=4)
    row_labels = np.where(valid, np.take_along_axis(labels, np.asarray(pos), 1), -100)
    # F = 2 full + 2 narrow layers: both segments scanned; "standard" so the fused K/V is scanned too
    preset = fn.EncoderConfig.tiny_narrowbert(narrow_attention="standard")
    results = []
    for kw in ({}, {"scan_layers": True, "remat_policy": "dots"}, {"remat_policy": "full"}):
        model = fn.BertForMaskedLM.from_config(preset.replace(**kw), seed=9)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p, rest, graphdef=graphdef):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return m(**inputs, narrow_positions=pos, narrow_valid=valid, labels=row_labels, deterministic=False).loss

        results.append(jax.jit(jax.value_and_grad(loss_fn))(params, rest))
    (l0, g0), others = results[0], results[1:]
    for l1, g1 in others:
        assert abs(float(l0) - float(l1)) <= 1e-6  # same dropout masks too: the RNG streams advance identically
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, atol=2e-6)


def test_scanned_layers_advance_their_dropout_streams_like_the_loop():
    ids = np.array([[2, 5, 6, 7, 8, 9, 3]])
    runs = []
    for kw in ({}, {"scan_layers": True}):
        m = fn.BertModel.from_config(fn.EncoderConfig.tiny(num_hidden_layers=3, **kw), seed=1)
        runs.append([np.asarray(m(ids, deterministic=False).last_hidden_state) for _ in range(2)])
    np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-5)
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-5)  # second call: counters were written back
    assert np.abs(runs[0][0] - runs[0][1]).max() > 1e-2
