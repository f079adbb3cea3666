"""MLM sums and Hinton distillation against straightforward NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from flax_narrow.modeling.losses import masked_cross_entropy
from flax_narrow.train.objectives import kd_sum, mlm_sums


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_sums_match_the_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    valid = rng.random((3, 5)) < 0.6
    labels[0, 0] = logits[0, 0].argmax()
    valid[0, 0] = True
    out = jax.device_get(mlm_sums(jnp.asarray(logits, jnp.bfloat16), labels, valid))  # bf16 in, fp32 math
    ce = -np.take_along_axis(
        _np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)), labels[..., None], -1
    )[..., 0]
    np.testing.assert_allclose(out["ce_sum"], (ce * valid).sum(), rtol=1e-5)
    assert out["count"] == valid.sum()
    assert out["correct"] == ((logits.argmax(-1) == labels) & valid).sum()
    # The same mean as the library's masked cross-entropy.
    mean = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    np.testing.assert_allclose(mlm_sums(logits, labels, valid)["ce_sum"] / valid.sum(), mean, rtol=1e-5)


def test_kd_is_hinton_kl_at_temperature():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 4, 9)).astype(np.float32) * 2
    t = rng.normal(size=(2, 4, 9)).astype(np.float32) * 2
    valid = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    temp = 2.0
    lt, ls = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    np.testing.assert_allclose(kd_sum(s, t, valid, temp), temp**2 * (kl * valid).sum(), rtol=1e-5)
    assert float(kd_sum(t, t, valid, temp)) == 0.0
    # Gradient flows to the student only, and vanishes when the student matches the teacher.
    gs, gt = jax.grad(lambda a, b: kd_sum(a, b, valid, temp), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.abs(np.asarray(gs)).max() > 0 and np.abs(np.asarray(gt)).max() == 0
    # d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) on valid rows.
    expected = temp * (np.exp(ls) - np.exp(lt)) * valid[..., None]
    np.testing.assert_allclose(gs, expected, atol=1e-6)
