"""EncoderConfig.fused_dropout_norm: the fused LayerNorm(residual + dropout(dense)) in the model gives the
modules' logits and gradients without dropout, keeps the parameter tree and checkpoints, and refuses bad use."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_narrow as fn
from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError

IDS = np.array([[2, 11, 12, 13, 14, 15, 16, 3], [2, 21, 22, 23, 3, 0, 0, 0]], np.int32)
MASK = (IDS != 0).astype(np.int32)
POSITIONS = np.array([[1, 4, 6], [3, 0, 0]], np.int32)
VALID = np.array([[True, True, True], [True, False, False]])


def _model(cls, mode, **kw):
    cfg = (EncoderConfig.tiny_narrowbert if cls is fn.NarrowBertForMaskedLM else EncoderConfig.tiny)(
        fused_dropout_norm=mode, **kw
    )
    return cls(cfg, rngs=nnx.Rngs(0))


def _loss_and_grads(model, deterministic):
    narrow = model.config.is_narrow
    extra = dict(narrow_positions=POSITIONS, narrow_valid=VALID) if narrow else {}
    labels = (IDS * 7) % 128
    labels = np.take_along_axis(labels, POSITIONS, 1) if narrow else np.where(MASK > 0, labels, -100)

    def loss_fn(m):
        out = m(IDS, MASK, labels=labels, deterministic=deterministic, **extra)
        return out.loss, out.logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, nnx.to_flat_state(grads)


@pytest.mark.parametrize("cls", [fn.BertForMaskedLM, fn.NarrowBertForMaskedLM])
@pytest.mark.parametrize("mode", ["jnp", "pallas_interpret"])
@pytest.mark.parametrize("case", ["rate0_training", "deterministic"])
def test_fused_matches_modules(cls, mode, case):
    """Same logits, loss and gradients as the nnx modules: dropout 0 in training mode, and dropout 0.1 with
    ``deterministic=True`` (the mask is not applied)."""
    rates = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if case == "rate0_training" else {}
    deterministic = case == "deterministic"
    base = _loss_and_grads(_model(cls, "off", **rates), deterministic)
    fused = _loss_and_grads(_model(cls, mode, **rates), deterministic)
    np.testing.assert_allclose(fused[0], base[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fused[1], base[1], atol=1e-5, rtol=1e-5)
    assert [p for p, _ in fused[2]] == [p for p, _ in base[2]]
    for (path, g_fused), (_, g_base) in zip(fused[2], base[2]):
        np.testing.assert_allclose(g_fused[...], g_base[...], atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_jnp_and_pallas_share_masks_in_training():
    """With dropout on, the jnp form and the kernels draw the same masks from the same dropout streams (the
    modules' own masks differ: nnx.Dropout draws Bernoulli floats, the fused op uint32 bits)."""
    kw = dict(attention_probs_dropout_prob=0.0)
    jnp_loss, jnp_logits, _ = _loss_and_grads(_model(fn.BertForMaskedLM, "jnp", **kw), False)
    pl_loss, pl_logits, _ = _loss_and_grads(_model(fn.BertForMaskedLM, "pallas_interpret", **kw), False)
    off_logits = _loss_and_grads(_model(fn.BertForMaskedLM, "off", **kw), False)[1]
    det_logits = _loss_and_grads(_model(fn.BertForMaskedLM, "jnp", **kw), True)[1]
    np.testing.assert_allclose(pl_logits, jnp_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pl_loss, jnp_loss, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(jnp_logits) - np.asarray(det_logits)).max() > 1e-2  # dropout did something
    assert np.abs(np.asarray(jnp_logits) - np.asarray(off_logits)).max() > 1e-3  # other masks


def test_parameter_tree_and_state_unchanged():
    off, on = _model(fn.NarrowBertForMaskedLM, "off"), _model(fn.NarrowBertForMaskedLM, "jnp")
    flat = lambda m: [(p, v.shape) for p, v in nnx.to_flat_state(nnx.state(m))]  # noqa: E731
    assert flat(on) == flat(off)


def test_old_config_json_without_the_field_loads(tmp_path):
    """A checkpoint written before the option existed (no ``fused_dropout_norm`` in config.json) loads with it
    off; a new checkpoint round-trips the setting."""
    model = _model(fn.BertForMaskedLM, "jnp")
    path = model.save_pretrained(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    data = json.loads(cfg_path.read_text())
    assert data["flax_narrow"]["config"]["fused_dropout_norm"] == "jnp"
    assert fn.BertForMaskedLM.from_pretrained(path).config.fused_dropout_norm == "jnp"
    del data["flax_narrow"]["config"]["fused_dropout_norm"]
    cfg_path.write_text(json.dumps(data))
    loaded = fn.BertForMaskedLM.from_pretrained(path)
    assert loaded.config.fused_dropout_norm == "off"
    np.testing.assert_array_equal(
        loaded.bert.encoder.layer[0].output.LayerNorm.scale[...],
        model.bert.encoder.layer[0].output.LayerNorm.scale[...],
    )
    assert fn.BertForMaskedLM.from_pretrained(path, fused_dropout_norm="jnp").config.fused_dropout_norm == "jnp"


def test_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="fused_dropout_norm 'auto' not in"):
        EncoderConfig.tiny(fused_dropout_norm="auto")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU refusal")
def test_pallas_on_cpu_names_the_setting():
    model = _model(fn.BertForMaskedLM, "pallas")
    with pytest.raises(ConfigError, match="fused_dropout_norm='pallas' needs a GPU or TPU.*'cpu'"):
        model(IDS, MASK)


def test_scan_layers_and_remat_with_fused():
    """The fused op inside lax.scan and remat (its custom VJP under jax.checkpoint) gives the loop's values."""
    rates = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = _loss_and_grads(_model(fn.BertForMaskedLM, "off", **rates), False)
    fused = _loss_and_grads(
        _model(fn.BertForMaskedLM, "pallas_interpret", scan_layers=True, remat_policy="full", **rates), False
    )
    np.testing.assert_allclose(fused[0], base[0], atol=1e-5, rtol=1e-5)
    for (path, a), (_, b) in zip(fused[2], base[2]):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_bf16_compute_close_to_modules():
    kw = dict(dtype="bfloat16", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = _loss_and_grads(_model(fn.BertForMaskedLM, "off", **kw), False)
    fused = _loss_and_grads(_model(fn.BertForMaskedLM, "pallas_interpret", **kw), False)
    assert fused[1].dtype == base[1].dtype
    np.testing.assert_allclose(np.asarray(fused[0]), np.asarray(base[0]), atol=2e-2, rtol=1e-2)
    logits = lambda r: np.asarray(jnp.asarray(r[1], jnp.float32))  # noqa: E731
    np.testing.assert_allclose(logits(fused), logits(base), atol=1e-1, rtol=5e-2)
