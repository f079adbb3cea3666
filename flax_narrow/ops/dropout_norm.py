"""``LayerNorm(x + dropout(y))`` in one pass: BERT's post-LN output block, fused (a Pallas kernel on GPU/TPU).

Every BERT layer ends its attention and its FFN the same way: the dense output ``y`` goes through dropout, is
added to the residual ``x`` and normalised. XLA fuses the element-wise part but keeps the LayerNorm reductions
apart on accelerators, so ``x + dropout(y)`` is written out and read back; the Pallas kernel here reads ``x``,
``y`` and the dropout bits once and writes the normalised rows (plus the pre-norm sum and per-row statistics
for the backward pass, which is a second Pallas kernel).

Two implementations with the same numerics and the same mask for the same key:

* ``"jnp"``: :func:`dropout_add_layer_norm_reference`, plain ``jax.numpy`` (XLA fuses it; autodiff backward).
* ``"pallas"``: :func:`dropout_add_layer_norm` with a ``jax.custom_vjp`` whose forward and backward are
  ``pallas_call`` kernels over blocks of rows of the flattened ``[N, H]`` input. On GPU it lowers through
  Triton (``triton.CompilerParams``), on TPU through Mosaic; ``"pallas_interpret"`` runs the same kernels in
  Pallas' interpret mode, which is how they are tested on CPU (slow: a loop over the grid).

The dropout mask comes from ``jax.random.bits(key, (N, H), uint32)``, drawn outside the kernel and passed in:
an element is kept when its bits are ``>= round(rate · 2**32)`` (keep probability exact to 2**-32). That works
in interpret mode, on Triton and on Mosaic alike, and the jnp reference reads the same bits, so both give the
same mask. The backward pass draws the bits again from the key instead of saving them (or the mask). TPU's
in-kernel PRNG (``pltpu.prng_seed``) would save the bits' memory traffic but has no interpret-mode or GPU
equivalent with the same stream; it is not used.

Statistics are fp32 whatever the input dtype; ``x + dropout(y)`` is rounded to the inputs' dtype before they
are taken (as the unfused bf16 model does), the output has ``x``'s dtype.

Sharded meshes: a Pallas kernel is a custom call that XLA cannot partition, so both kernels are wrapped in
``custom_partitioning`` by rows (each device normalises its own rows; the dscale/dbias sums are added up across
the row shards). libtpu's compile-only client (deviceless AOT) has no partitioner for it: there only a one-chip
compile works. The backend is read from ``jax.default_backend()`` at trace time.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from flax_narrow.errors import ConfigError, InputError

IMPLS = ("jnp", "pallas", "pallas_interpret")


# ------------------------------------------------------------------------------------------------- the mask
def check_rate(rate: float) -> float:
    """``rate`` as a float, or a ConfigError when it is not a probability in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"dropout rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def keep_threshold(rate: float) -> int:
    """The uint32 threshold t of dropout ``rate``: an element is kept when its random bits are >= t."""
    return min(int(round(check_rate(rate) * 2.0**32)), 2**32 - 1)


def dropout_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits of ``shape`` from ``key`` (one draw; any PRNG key type, e.g. threefry or rbg)."""
    return jax.random.bits(key, shape, jnp.uint32)


def keep_mask(bits: jax.Array, rate: float) -> jax.Array:
    """bool mask of kept elements (probability 1 - rate each) from uint32 ``bits``."""
    return bits >= jnp.uint32(keep_threshold(rate))


# ------------------------------------------------------------------------------------------------- reference
def dropout_add_layer_norm_reference(
    x: jax.Array,
    y: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    eps: float,
    rate: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """``LayerNorm(x + dropout(y))`` in plain jax.numpy (the unfused form; XLA autodiff gives its gradient).

    Args:
      x: (..., H) residual stream. y: (..., H) the sub-layer's dense output (same shape).
      scale, bias: (H,) LayerNorm parameters (any float dtype; the math is fp32).
      eps: LayerNorm epsilon. rate: dropout rate in [0, 1); 0 (or ``key=None`` with rate 0) applies none.
      key: PRNG key for the mask, required when rate > 0.

    Returns:
      (..., H) in ``x``'s dtype.
    """
    rate = _check_args(x, y, scale, bias, rate, key)
    zdt = jnp.result_type(x, y)
    y32 = y.astype(jnp.float32)
    if rate > 0.0:
        keep = keep_mask(dropout_bits(key, y.shape), rate)
        y32 = jnp.where(keep, y32 * (1.0 / (1.0 - rate)), 0.0)
    z = (x.astype(jnp.float32) + y32).astype(zdt).astype(jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    d = z - mean
    rstd = jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps)
    out = d * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def _check_args(x, y, scale, bias, rate, key) -> float:
    rate = check_rate(rate)
    if x.shape != y.shape:
        raise InputError(f"dropout_add_layer_norm: x {x.shape} and y {y.shape} must have the same shape")
    if x.ndim < 1 or scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise InputError(
            f"dropout_add_layer_norm: scale {scale.shape} and bias {bias.shape} must be ({x.shape[-1]},) "
            f"for inputs of shape {x.shape}"
        )
    if rate > 0.0 and key is None:
        raise InputError(f"dropout_add_layer_norm: rate {rate} > 0 needs a PRNG key")
    return rate


# ------------------------------------------------------------------------------------------------- Pallas
def dropout_add_layer_norm(
    x: jax.Array,
    y: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    eps: float,
    rate: float = 0.0,
    key: jax.Array | None = None,
    impl: str = "pallas",
    block_rows: int | None = None,
) -> jax.Array:
    """``LayerNorm(x + dropout(y))`` fused; the same values (and mask, for the same key) as the reference.

    Args:
      x, y: (..., H) residual stream and sub-layer output, same shape. scale, bias: (H,) LayerNorm params.
      eps: LayerNorm epsilon. rate: dropout rate in [0, 1). key: PRNG key (needed when rate > 0).
      impl: "jnp" (the reference), "pallas" (GPU/TPU kernels) or "pallas_interpret" (the kernels in Pallas'
        interpret mode: any backend, CPU included; for tests).
      block_rows: rows per kernel program (a power of two; default 4 on GPU, 256 on TPU and in interpret).

    Returns:
      (..., H) in ``x``'s dtype.

    Raises:
      ConfigError: an unknown ``impl``, ``impl="pallas"`` on a CPU backend, a bad rate or block size.
      InputError: shapes that do not match, or rate > 0 without a key.
    """
    if impl not in IMPLS:
        raise ConfigError(f"dropout_add_layer_norm: impl {impl!r} is not one of {IMPLS}")
    if impl == "jnp":
        return dropout_add_layer_norm_reference(x, y, scale, bias, eps=eps, rate=rate, key=key)
    rate = _check_args(x, y, scale, bias, rate, key)
    interpret = impl == "pallas_interpret"
    backend = "interpret" if interpret else jax.default_backend()
    if backend not in ("gpu", "tpu", "interpret"):
        raise ConfigError(
            f"the fused LayerNorm kernel (impl='pallas') needs a GPU or TPU, but JAX's backend is {backend!r}: "
            "use impl='jnp' (same numerics, unfused) or 'pallas_interpret' (the kernel in interpret mode, slow)"
        )
    if block_rows is None:
        block_rows = 4 if backend == "gpu" else 256
    if not (isinstance(block_rows, int) and block_rows >= 1 and block_rows & (block_rows - 1) == 0):
        raise ConfigError(f"dropout_add_layer_norm: block_rows must be a power of two, got {block_rows!r}")
    if backend == "tpu" and block_rows < 8:
        raise ConfigError(f"dropout_add_layer_norm: TPU blocks need block_rows >= 8, got {block_rows}")
    shape, h = x.shape, x.shape[-1]
    spec = _Spec(
        eps=float(eps),
        rate=rate,
        backend=backend,
        block_rows=block_rows,
        # Triton needs power-of-two tensors: a row of H is accessed as next_pow2(H) masked columns.
        masked=backend == "gpu" and h & (h - 1) != 0,
        x_dtype=jnp.dtype(x.dtype).name,
        y_dtype=jnp.dtype(y.dtype).name,
    )
    x2, y2 = x.reshape(-1, h), y.reshape(-1, h)
    if key is None:  # rate 0: a placeholder; no bits are drawn
        key = jax.random.key(0)
    out = _fused(spec, x2, y2, scale, bias, key)
    return out.reshape(shape)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one fused call (hashable: the ``custom_vjp``'s non-differentiable argument)."""

    eps: float
    rate: float
    backend: str  # "gpu" (Triton), "tpu" (Mosaic) or "interpret"
    block_rows: int
    masked: bool
    x_dtype: str
    y_dtype: str


def _pow2_divisor(n: int, limit: int) -> int:
    """The largest power of two <= ``limit`` that divides ``n``."""
    r = 1
    while 2 * r <= limit and n % (2 * r) == 0:
        r *= 2
    return r


def _row_blocks(spec: _Spec, n: int) -> tuple[int, int]:
    """(rows per program R, padded row count N'), R dividing N'.

    Triton and interpret mode: R is the largest power of two <= ``block_rows`` dividing N; nothing is padded.
    Mosaic (TPU) blocks need a multiple of 8 rows or the whole array: R = N when N fits one block, else the
    largest multiple of 8 <= ``block_rows`` dividing N, with N padded (a copy) to a multiple of 8 if it is not.
    """
    if spec.backend != "tpu":
        return _pow2_divisor(n, spec.block_rows), n
    if n <= spec.block_rows:
        return n, n
    n_pad = -(-n // 8) * 8
    return max(r for r in range(8, spec.block_rows + 1, 8) if n_pad % r == 0), n_pad


def _compiler_params(spec: _Spec, h: int):
    if spec.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        width = spec.block_rows * _pow2(h)
        return pltriton.CompilerParams(num_warps=min(max(width // 512, 1), 8), num_stages=1)
    if spec.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",))
    return None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Rows:
    """Loads and stores of a (R, H) block: plain ref indexing, or Triton masked accesses padded to pow2 H."""

    def __init__(self, masked: bool, rows: int, h: int):
        self.masked, self.rows, self.h = masked, rows, h
        if masked:
            cols = jnp.arange(_pow2(h))
            self.idx = (jnp.arange(rows)[:, None], cols[None, :])
            self.mask = jnp.broadcast_to((cols < h)[None, :], (rows, cols.size))

    def load(self, ref) -> jax.Array:
        if not self.masked:
            return ref[...]
        from jax.experimental.pallas import triton as pltriton

        return pltriton.load(ref.at[self.idx], mask=self.mask, other=0)

    def store(self, ref, value: jax.Array) -> None:
        if not self.masked:
            ref[...] = value.astype(ref.dtype)
            return
        from jax.experimental.pallas import triton as pltriton

        pltriton.store(ref.at[self.idx], value.astype(ref.dtype), mask=self.mask)

    def valid(self, value: jax.Array) -> jax.Array:
        """``value`` with the padding columns zeroed (a no-op when unmasked)."""
        return jnp.where(self.mask, value, 0.0) if self.masked else value


def _dropped(y: jax.Array, bits_ref, rows: _Rows, rate: float) -> jax.Array:
    if rate == 0.0:
        return y
    keep = rows.load(bits_ref) >= jnp.uint32(keep_threshold(rate))
    return jnp.where(keep, y * (1.0 / (1.0 - rate)), 0.0)


def _forward_kernel(x_ref, y_ref, bits_ref, scale_ref, bias_ref, *out_refs, spec: _Spec, h: int, zdt, save: bool):
    """One (R, H) block: out = LayerNorm(x + dropout(y)); with ``save``, also z = x + dropout(y) and the
    per-row mean and 1/std (R, 1) for the backward pass."""
    rows = _Rows(spec.masked, x_ref.shape[0], h)
    vec = _Rows(spec.masked, 1, h)
    y = _dropped(rows.load(y_ref).astype(jnp.float32), bits_ref, rows, spec.rate)
    z = (rows.load(x_ref).astype(jnp.float32) + y).astype(zdt).astype(jnp.float32)
    mean = jnp.sum(z, axis=-1, keepdims=True) / h
    d = rows.valid(z - mean)
    rstd = jax.lax.rsqrt(jnp.sum(d * d, axis=-1, keepdims=True) / h + spec.eps)
    scale = vec.load(scale_ref).astype(jnp.float32)
    bias = vec.load(bias_ref).astype(jnp.float32)
    rows.store(out_refs[0], d * rstd * scale + bias)
    if save:
        z_ref, mean_ref, rstd_ref = out_refs[1:]
        rows.store(z_ref, z)
        mean_ref[...] = mean
        rstd_ref[...] = rstd


def _backward_kernel(
    z_ref, g_ref, mean_ref, rstd_ref, bits_ref, scale_ref, dx_ref, dy_ref, dscale_ref, dbias_ref, *, spec, h
):
    """One (R, H) block of the LayerNorm backward: dz, then dx = dz and dy = dropout'(dz); per-block partial
    sums (1, H) of dscale and dbias (added up outside the kernel)."""
    rows = _Rows(spec.masked, z_ref.shape[0], h)
    vec = _Rows(spec.masked, 1, h)
    mean, rstd = mean_ref[...], rstd_ref[...]
    zhat = rows.valid((rows.load(z_ref).astype(jnp.float32) - mean) * rstd)
    g = rows.load(g_ref).astype(jnp.float32)
    gs = g * vec.load(scale_ref).astype(jnp.float32)
    c1 = jnp.sum(gs * zhat, axis=-1, keepdims=True) / h
    c2 = jnp.sum(gs, axis=-1, keepdims=True) / h
    dz = (gs - zhat * c1 - c2) * rstd
    rows.store(dx_ref, dz)
    rows.store(dy_ref, _dropped(dz, bits_ref, rows, spec.rate))
    vec.store(dscale_ref, jnp.sum(g * zhat, axis=0, keepdims=True))
    vec.store(dbias_ref, jnp.sum(g, axis=0, keepdims=True))


def _call(kernel, spec: _Spec, n: int, h: int, inputs, out_shapes, out_kinds):
    """``pallas_call`` over a grid of row blocks. Inputs and outputs are "row" ((N, H) blocked by rows),
    "stat" ((N, 1) blocked by rows), "vec" ((H,) whole, seen as (1, H)) or "part" ((blocks, 1, H), one each)."""
    from jax.experimental import pallas as pl

    r, n_pad = _row_blocks(spec, n)
    grid = (n_pad // r,)
    specs = {
        "row": pl.BlockSpec((r, h), lambda i: (i, 0)),
        "stat": pl.BlockSpec((r, 1), lambda i: (i, 0)),
        "vec": pl.BlockSpec((1, h), lambda i: (0, 0)),
        "part": pl.BlockSpec((None, 1, h), lambda i: (i, 0, 0)),
    }
    args, in_kinds = [], []
    for kind, a in inputs:
        if kind == "vec":
            a = a.reshape(1, h)
        elif n_pad != n:
            a = jnp.pad(a, ((0, n_pad - n), (0, 0)))
        args.append(a)
        in_kinds.append(kind)
    shapes = []
    for kind, (shape, dtype) in zip(out_kinds, out_shapes):
        if kind in ("row", "stat"):
            shape = (n_pad,) + shape[1:]
        elif kind == "part":
            shape = (grid[0], 1, h)
        shapes.append(jax.ShapeDtypeStruct(shape, dtype))
    outs = pl.pallas_call(
        kernel,
        out_shape=shapes,
        grid=grid,
        in_specs=[specs[k] for k in in_kinds],
        out_specs=[specs[k] for k in out_kinds],
        interpret=spec.backend == "interpret",
        compiler_params=_compiler_params(spec, h),
        name="dropout_add_layer_norm",
    )(*args)
    return [o[:n] if k in ("row", "stat") and n_pad != n else o for o, k in zip(outs, out_kinds)]


def _bits_input(spec: _Spec, key: jax.Array, n: int, h: int) -> jax.Array:
    """The kernels' dropout bits: (N, H) uint32 drawn from ``key``; at rate 0 a (H,) placeholder the kernels
    never read (no bits drawn, no (N, H) buffer)."""
    if spec.rate == 0.0:
        return jnp.zeros((h,), jnp.uint32)
    return dropout_bits(key, (n, h))


def _forward_local(spec: _Spec, save: bool, x, y, bits, scale, bias) -> tuple[jax.Array, ...]:
    """The forward kernel on (N, H) rows: (out,), or (out, z, mean, rstd) with ``save``."""
    n, h = x.shape
    zdt = jnp.result_type(x, y)
    kernel = functools.partial(_forward_kernel, spec=spec, h=h, zdt=zdt, save=save)
    bits_kind = "row" if bits.ndim == 2 else "vec"
    inputs = [("row", x), ("row", y), (bits_kind, bits), ("vec", scale), ("vec", bias)]
    shapes, kinds = [((n, h), x.dtype)], ["row"]
    if save:
        shapes += [((n, h), zdt), ((n, 1), jnp.float32), ((n, 1), jnp.float32)]
        kinds += ["row", "stat", "stat"]
    return tuple(_call(kernel, spec, n, h, inputs, shapes, kinds))


def _backward_local(spec: _Spec, z, g, mean, rstd, bits, scale) -> tuple[jax.Array, ...]:
    """The backward kernel on (N, H) rows: (dx, dy, dscale, dbias), the last two fp32 (H,) sums over the rows."""
    n, h = z.shape
    kernel = functools.partial(_backward_kernel, spec=spec, h=h)
    bits_kind = "row" if bits.ndim == 2 else "vec"
    inputs = [("row", z), ("row", g), ("stat", mean), ("stat", rstd), (bits_kind, bits), ("vec", scale)]
    shapes = [((n, h), spec.x_dtype), ((n, h), spec.y_dtype), (None, jnp.float32), (None, jnp.float32)]
    dx, dy, dscale, dbias = _call(kernel, spec, n, h, inputs, shapes, ["row", "row", "part", "part"])
    return dx, dy, dscale.sum(axis=(0, 1)), dbias.sum(axis=(0, 1))


_FACTORS = {"row": "n h", "stat": "n o", "vec": "h", "sum": "h"}


@functools.cache
def _row_partitioned(local_fn, in_kinds: tuple[str, ...], out_kinds: tuple[str, ...]):
    """``local_fn(*static, *arrays)`` as a ``custom_partitioning`` op that XLA splits by rows.

    A Pallas kernel is a custom call XLA cannot partition (a TPU compile over a sharded mesh fails). Rows are
    independent, so each device runs the kernel on its own rows: inputs and outputs of kind "row" (N, H) and
    "stat" (N, 1) are sharded like the first input's rows (its other dimensions replicated), "vec" (H,) inputs
    replicated, and "sum" outputs (H,) (sums over the rows) added up across the row shards with ``psum``. On one
    device (or inside ``shard_map``) this is ``local_fn`` itself.
    """
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def op(static, *arrays):
        return local_fn(*static, *arrays)

    def partition(static, mesh, arg_shapes, result_shape):
        spec0 = arg_shapes[0].sharding.spec
        axes = spec0[0] if len(spec0) else None

        def sharding(kind):
            return NamedSharding(mesh, PartitionSpec(axes, None) if kind in ("row", "stat") else PartitionSpec())

        def lower(*arrays):
            outs = local_fn(*static, *arrays)
            if axes is None:
                return outs
            return tuple(jax.lax.psum(o, axes) if k == "sum" else o for o, k in zip(outs, out_kinds))

        return mesh, lower, tuple(map(sharding, out_kinds)), tuple(map(sharding, in_kinds))

    rule = ", ".join(_FACTORS[k] for k in in_kinds) + " -> " + ", ".join(_FACTORS[k] for k in out_kinds)
    op.def_partition(partition=partition, sharding_rule=rule)
    return op


def _forward(spec: _Spec, x, y, scale, bias, key, save: bool) -> tuple[jax.Array, ...]:
    bits = _bits_input(spec, key, *x.shape)
    in_kinds = ("row", "row", "row" if bits.ndim == 2 else "vec", "vec", "vec")
    out_kinds = ("row", "row", "stat", "stat") if save else ("row",)
    return _row_partitioned(_forward_local, in_kinds, out_kinds)((spec, save), x, y, bits, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec: _Spec, x, y, scale, bias, key):
    return _forward(spec, x, y, scale, bias, key, save=False)[0]


def _fused_fwd(spec: _Spec, x, y, scale, bias, key):
    out, z, mean, rstd = _forward(spec, x, y, scale, bias, key, save=True)
    return out, (z, mean, rstd, scale, bias, key)


def _fused_bwd(spec: _Spec, res, g):
    z, mean, rstd, scale, bias, key = res
    bits = _bits_input(spec, key, *z.shape)
    in_kinds = ("row", "row", "stat", "stat", "row" if bits.ndim == 2 else "vec", "vec")
    op = _row_partitioned(_backward_local, in_kinds, ("row", "row", "sum", "sum"))
    dx, dy, dscale, dbias = op((spec,), z, g, mean, rstd, bits, scale)
    return dx, dy, dscale.astype(scale.dtype), dbias.astype(bias.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def expected_keep_fraction(rate: float) -> float:
    """The exact keep probability of :func:`keep_mask` at ``rate`` (1 - t / 2**32)."""
    return 1.0 - keep_threshold(rate) / 2.0**32


__all__ = [
    "IMPLS",
    "check_rate",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_reference",
    "dropout_bits",
    "expected_keep_fraction",
    "keep_mask",
    "keep_threshold",
]
