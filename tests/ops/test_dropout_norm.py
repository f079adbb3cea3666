"""The fused LayerNorm(x + dropout(y)): Pallas kernels (interpret mode) against the jnp reference and against
plain LayerNorm, the shared mask, the Triton masked-column path, row blocking, and bad inputs."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_narrow.errors import ConfigError, InputError
from flax_narrow.ops import dropout_norm as dn


def _inputs(shape, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = shape[-1]
    x = jax.random.normal(k[0], shape).astype(dtype)
    y = jax.random.normal(k[1], shape).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k[2], (h,))
    bias = 0.1 * jax.random.normal(k[3], (h,))
    return x, y, scale, bias, k[4]


def _grads(fn, x, y, scale, bias):
    w = jax.random.normal(jax.random.key(9), x.shape)  # a cotangent that is not all ones
    return jax.grad(lambda *a: (fn(*a).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2, 3))(x, y, scale, bias)


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


# (shape, rate): ragged row counts (10 = 2·5 rows), an H that is not a power of two, dropout on and off
CASES = [((2, 6, 32), 0.0), ((2, 6, 32), 0.3), ((10, 48), 0.1), ((3, 5, 16), 0.5)]


@pytest.mark.parametrize("shape,rate", CASES)
def test_pallas_interpret_matches_reference_fp32(shape, rate):
    x, y, scale, bias, key = _inputs(shape)
    ref = lambda *a: dn.dropout_add_layer_norm_reference(*a, eps=1e-12, rate=rate, key=key)  # noqa: E731
    fused = lambda *a: dn.dropout_add_layer_norm(  # noqa: E731
        *a, eps=1e-12, rate=rate, key=key, impl="pallas_interpret", block_rows=4
    )
    np.testing.assert_allclose(fused(x, y, scale, bias), ref(x, y, scale, bias), atol=1e-5, rtol=1e-5)
    for g_fused, g_ref in zip(_grads(fused, x, y, scale, bias), _grads(ref, x, y, scale, bias)):
        np.testing.assert_allclose(g_fused, g_ref, atol=1e-5, rtol=1e-5)


def test_pallas_interpret_matches_reference_bf16():
    x, y, scale, bias, key = _inputs((4, 8, 64), jnp.bfloat16)
    ref = lambda *a: dn.dropout_add_layer_norm_reference(*a, eps=1e-5, rate=0.1, key=key)  # noqa: E731
    fused = lambda *a: dn.dropout_add_layer_norm(*a, eps=1e-5, rate=0.1, key=key, impl="pallas_interpret")  # noqa: E731
    out = fused(x, y, scale, bias)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f32(out), _f32(ref(x, y, scale, bias)), atol=3e-2, rtol=2e-2)
    g_fused, g_ref = _grads(fused, x, y, scale, bias), _grads(ref, x, y, scale, bias)
    assert [g.dtype for g in g_fused] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    for a, b in zip(g_fused, g_ref):
        np.testing.assert_allclose(_f32(a), _f32(b), atol=5e-2, rtol=3e-2)


def test_triton_masked_columns_path_in_interpret_mode():
    """The GPU path for H not a power of two (48 read as 64 masked columns) gives the reference's values."""
    x, y, scale, bias, key = _inputs((12, 48))
    spec = dn._Spec(eps=1e-5, rate=0.2, backend="interpret", block_rows=4, masked=True, x_dtype="float32",
                    y_dtype="float32")  # fmt: skip
    fused = lambda x, y, s, b: dn._fused(spec, x, y, s, b, key)  # noqa: E731
    ref = lambda *a: dn.dropout_add_layer_norm_reference(*a, eps=1e-5, rate=0.2, key=key)  # noqa: E731
    np.testing.assert_allclose(fused(x, y, scale, bias), ref(x, y, scale, bias), atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(fused, x, y, scale, bias), _grads(ref, x, y, scale, bias)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["jnp", "pallas_interpret"])
def test_rate_zero_is_plain_layer_norm(impl):
    x, y, scale, bias, key = _inputs((2, 5, 32))
    ln = nnx.LayerNorm(32, epsilon=1e-12, rngs=nnx.Rngs(0))
    ln.scale[...], ln.bias[...] = scale, bias
    out = dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-12, rate=0.0, key=key, impl=impl)
    np.testing.assert_allclose(out, ln(x + y), atol=1e-5, rtol=1e-5)
    no_key = dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-12, impl=impl)
    np.testing.assert_array_equal(no_key, out)


def test_same_key_same_mask_and_keep_fraction():
    """Both implementations drop the same elements for one key; another key drops others; ~1 - rate kept."""
    n, h, rate = 64, 128, 0.25
    x = jnp.zeros((n, h))
    y = jnp.ones((n, h))
    scale, bias = jnp.ones(h), jnp.zeros(h)
    key = jax.random.key(3)

    def kept(impl, k):  # LayerNorm of a 0/(1/keep) row: positive exactly where y was kept
        return np.asarray(dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-6, rate=rate, key=k, impl=impl) > 0)

    mask = np.asarray(dn.keep_mask(dn.dropout_bits(key, (n, h)), rate))
    np.testing.assert_array_equal(kept("jnp", key), mask)
    np.testing.assert_array_equal(kept("pallas_interpret", key), mask)
    assert (kept("jnp", jax.random.key(4)) != mask).mean() > 0.2
    assert abs(mask.mean() - dn.expected_keep_fraction(rate)) < 0.02  # 8192 draws: sd 0.005
    assert dn.expected_keep_fraction(rate) == 0.75


def test_dropout_scales_kept_values():
    """Before the LayerNorm, x + dropout(y) holds y / (1 - rate) where kept and 0 elsewhere (inverted dropout)."""
    rate = 0.5
    x = jnp.zeros((4, 16)).at[:, 0].set(1000.0)  # one huge column pins the mean/std; the rest read y's scale
    y = jnp.full((4, 16), 2.0).at[:, 0].set(0.0)
    key = jax.random.key(0)
    out = dn.dropout_add_layer_norm_reference(x, y, jnp.ones(16), jnp.zeros(16), eps=1e-6, rate=rate, key=key)
    z = np.where(np.asarray(dn.keep_mask(dn.dropout_bits(key, (4, 16)), rate)), 4.0, 0.0)
    z[:, 0] = 1000.0
    want = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, want, atol=1e-4)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.1", True, None])
def test_bad_rate_is_a_config_error(rate):
    x, y, scale, bias, key = _inputs((2, 8))
    for impl in ("jnp", "pallas_interpret"):
        with pytest.raises(ConfigError, match="dropout rate must be a number in \\[0, 1\\)"):
            dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-5, rate=rate, key=key, impl=impl)


def test_bad_inputs():
    x, y, scale, bias, key = _inputs((2, 8))
    with pytest.raises(InputError, match="needs a PRNG key"):
        dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-5, rate=0.1, impl="jnp")
    with pytest.raises(InputError, match="must have the same shape"):
        dn.dropout_add_layer_norm(x, y[:1], scale, bias, eps=1e-5, impl="pallas_interpret")
    with pytest.raises(InputError, match=r"must be \(8,\)"):
        dn.dropout_add_layer_norm(x, y, scale[:4], bias, eps=1e-5, impl="jnp")
    with pytest.raises(ConfigError, match="impl 'triton' is not one of"):
        dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-5, impl="triton")
    with pytest.raises(ConfigError, match="block_rows must be a power of two, got 6"):
        dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-5, impl="pallas_interpret", block_rows=6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU refusal")
def test_pallas_on_cpu_is_a_config_error():
    x, y, scale, bias, key = _inputs((2, 8))
    with pytest.raises(ConfigError, match="needs a GPU or TPU, but JAX's backend is 'cpu'.*'pallas_interpret'"):
        dn.dropout_add_layer_norm(x, y, scale, bias, eps=1e-5, impl="pallas")


def _spec(backend, block_rows):
    return dn._Spec(1e-5, 0.1, backend, block_rows, False, "float32", "float32")


@pytest.mark.parametrize(
    "backend,block_rows,n,want",
    [
        ("gpu", 4, 1024, (4, 1024)),
        ("gpu", 4, 10, (2, 10)),  # a power of two dividing N: nothing padded
        ("interpret", 256, 40, (8, 40)),
        ("tpu", 256, 1024, (256, 1024)),
        ("tpu", 256, 40, (40, 40)),  # one block: the whole array
        ("tpu", 256, 600, (200, 600)),  # multiples of 8, not only powers of two
        ("tpu", 16, 20, (8, 24)),  # padded to a multiple of 8
    ],
)
def test_row_blocks(backend, block_rows, n, want):
    assert dn._row_blocks(_spec(backend, block_rows), n) == want


def test_any_leading_rank_under_jit():
    """Leading dims of any rank flatten to rows; the op jits (the Spec is static)."""
    x, y, scale, bias, key = _inputs((2, 3, 4, 16))
    f = jax.jit(lambda *a: dn.dropout_add_layer_norm(*a, eps=1e-5, rate=0.1, key=key, impl="pallas_interpret"))
    ref = dn.dropout_add_layer_norm_reference(x, y, scale, bias, eps=1e-5, rate=0.1, key=key)
    np.testing.assert_allclose(f(x, y, scale, bias), ref, atol=1e-5, rtol=1e-5)


def _fwd_bwd(spec):
    """The fused op's value-and-gradients as a function of abstract (N, H) inputs, for lowering elsewhere."""

    def f(x, y, s, b, k):
        loss = lambda *a: dn._fused(spec, *a, k).astype(jnp.float32).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, y, s, b)

    return f


@pytest.mark.parametrize("h,masked,rate", [(768, True, 0.1), (1024, False, 0.1), (768, True, 0.0)])
def test_kernels_lower_for_triton(h, masked, rate):
    """Forward and backward kernels lower through Pallas' Triton backend (checked here without a GPU: lowering
    runs on the host; the power-of-two and masked-access rules are enforced there)."""
    spec = dn._Spec(1e-12, rate, "gpu", 4, masked, "bfloat16", "bfloat16")
    args = (jnp.zeros((64, h), jnp.bfloat16),) * 2 + (jnp.ones(h), jnp.zeros(h), jax.random.key(0))
    text = jax.jit(_fwd_bwd(spec)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_kernels_compile_for_tpu_deviceless():
    """Forward and backward kernels compile with Mosaic for a TPU v5e chip (libtpu's compile-only topology)."""
    from flax_narrow.train import aot

    device = aot.topology_devices(aot.parse_topology("v5e-8"))[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    n, h = 1000, 256  # 1000 rows: blocks of 200 (multiples of 8, not powers of two)
    spec = dn._Spec(1e-12, 0.1, "tpu", 256, False, "bfloat16", "bfloat16")
    s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    args = (s((n, h), jnp.bfloat16),) * 2 + (s((h,), jnp.float32),) * 2 + (s((), jax.random.key(0).dtype),)
    compiled = jax.jit(_fwd_bwd(spec)).trace(*args).lower().compile()
    assert "tpu_custom_call" in compiled.as_text()


def test_numpy_rates_are_accepted():
    assert dn.keep_threshold(np.float32(0.5)) == 2**31
    assert dn.check_rate(np.float64(0.25)) == 0.25


@pytest.mark.parametrize("rows", [("data", "fsdp"), "data", None])
def test_sharded_rows_match_reference(rows):
    """On 8 (fake CPU) devices with the rows sharded, the kernels run per row shard (custom_partitioning): the
    values, dx/dy and the dscale/dbias sums across shards equal the jnp form's, and dx keeps the rows' sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, y, scale, bias, key = _inputs((64, 32))
    x, y = (jax.device_put(a, NamedSharding(mesh, PartitionSpec(rows))) for a in (x, y))
    ref = lambda *a: dn.dropout_add_layer_norm_reference(*a, eps=1e-12, rate=0.2, key=key)  # noqa: E731
    fused = lambda *a: dn.dropout_add_layer_norm(*a, eps=1e-12, rate=0.2, key=key, impl="pallas_interpret")  # noqa: E731
    g_fused = jax.jit(lambda *a: _grads(fused, *a))(x, y, scale, bias)
    g_ref = jax.jit(lambda *a: _grads(ref, *a))(x, y, scale, bias)
    np.testing.assert_allclose(jax.jit(fused)(x, y, scale, bias), ref(x, y, scale, bias), atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert g_fused[0].sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(rows)), 2)
