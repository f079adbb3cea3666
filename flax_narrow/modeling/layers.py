"""BERT-family building blocks in Flax NNX. Attribute names mirror transformers' PyTorch module tree.

Shape letters: B batch, L (or T) query length, S key length, H hidden, N heads, D head dim, F FFN width,
P selected rows of a narrow layer.

Parameters carry logical axis names in their ``logical_axes`` metadata (e.g. ``("embed", "mlp")``); the
training code maps them to mesh axes with one rules table (sharding is data, not code).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError, InputError
from flax_narrow.ops.dropout_norm import dropout_add_layer_norm
from flax_narrow.ops.gather import gather_rows
from flax_narrow.ops.packing import segment_attention_mask


def _init(config: EncoderConfig) -> Any:
    return nnx.initializers.normal(stddev=config.initializer_range)


def dense(config: EncoderConfig, n_in: int, n_out: int, axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer with BERT's init, the config's dtypes, and logical axis names ``axes`` on its kernel."""
    return nnx.Linear(
        n_in,
        n_out,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=_init(config),
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def layer_norm(config: EncoderConfig, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics are computed in fp32 whatever the compute dtype (flax promotes them).
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=eps,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        scale_metadata={"logical_axes": ("norm",)},
        bias_metadata={"logical_axes": ("norm",)},
        rngs=rngs,
    )


def activation(name: str):
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }[name]


def _table(embed: nnx.Embed) -> jax.Array:
    return embed.embedding[...].astype(embed.dtype)


@jax.custom_vjp
def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0)


def _take_rows_fwd(table, ids):
    return _take_rows(table, ids), (ids, table.shape[0])


def _take_rows_bwd(res, g):
    ids, n = res
    one_hot = jax.nn.one_hot(ids, n, dtype=g.dtype)  # exact 0/1 in any dtype; the sums accumulate in fp32
    grad = jnp.einsum(
        "...n,...h->nh", one_hot, g, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    return grad.astype(g.dtype), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def lookup_small_table(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
    """``embed(ids)`` for small tables (positions, token types) with a one-hot-matmul gradient.

    The plain gradient of a gather is a scatter-add; with many equal ids (every row of a batch uses the same
    positions and token types) it serialises on atomics: on an H100 it took 60 ms of a 90 ms BERT-base
    train step (B = 128, L = 128). The one-hot contraction is a dense matmul instead; forward is unchanged.
    """
    return _take_rows(embed.embedding[...], ids).astype(embed.dtype)


class BertEmbeddings(nnx.Module):
    """word + position (+ token type) embeddings, LayerNorm, dropout."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size

        def embed(n: int, axes: tuple[str, str]) -> nnx.Embed:
            return nnx.Embed(
                n,
                h,
                dtype=config.compute_dtype,
                param_dtype=config.params_dtype,
                embedding_init=_init(config),
                embedding_metadata={"logical_axes": axes},
                rngs=rngs,
            )

        self.word_embeddings = embed(config.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(config.max_position_embeddings, ("position", "embed"))
        self.token_type_embeddings = (
            embed(config.type_vocab_size, ("type", "embed")) if config.type_vocab_size else None
        )
        self.LayerNorm = layer_norm(config, config.layer_norm_eps, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def position_ids(self, input_ids_bl: jax.Array) -> jax.Array:
        """int32[B, L]: 0..L-1 (BERT), or RoBERTa's padding-aware ids starting at ``position_offset``."""
        cfg = self.config
        if cfg.position_offset == 0:
            return jnp.broadcast_to(jnp.arange(input_ids_bl.shape[1], dtype=jnp.int32), input_ids_bl.shape)
        not_pad = input_ids_bl != cfg.pad_token_id
        rank = jnp.cumsum(not_pad, axis=1, dtype=jnp.int32) - 1
        return jnp.where(not_pad, rank + cfg.position_offset, cfg.pad_token_id)

    def __call__(
        self,
        input_ids_bl: jax.Array,
        token_type_ids_bl: jax.Array | None = None,
        position_ids_bl: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """int32[B, L] ids -> (B, L, H) embeddings."""
        x = self.word_embeddings(input_ids_bl)
        if position_ids_bl is None and self.config.position_offset == 0:
            # BERT: positions 0..L-1 in every row, a slice of the table (its gradient is a sum over the batch)
            x = x + _table(self.position_embeddings)[: input_ids_bl.shape[1]]
        else:
            if position_ids_bl is None:
                position_ids_bl = self.position_ids(input_ids_bl)
            x = x + lookup_small_table(self.position_embeddings, position_ids_bl)
        if self.token_type_embeddings is not None:
            if token_type_ids_bl is None:
                x = x + _table(self.token_type_embeddings)[0]
            else:
                x = x + lookup_small_table(self.token_type_embeddings, token_type_ids_bl)
        x = self.LayerNorm(x)
        return self.dropout(x, deterministic=deterministic)


class BertSelfAttention(nnx.Module):
    """Multi-head attention. Queries come from ``hidden_btd``; keys/values from ``kv_bsd`` (default: the same).

    With ``kv_bsd`` distinct this is NarrowBERT's narrow attention: T selected rows attend over all S tokens.
    Two exact forms of it (chosen statically by the encoder):

    * standard: K = C·Wk + bk and V = C·Wv + bv over all S tokens (optionally precomputed: ``kv_proj``);
    * absorbed: per head h, scores = (q_h·Wk_hᵀ)·Cᵀ — the key bias adds the same q_h·bk_h to every score of a
      row, so it drops out of the softmax — and output = (A_h·C)·Wv_h + (Σ_s A_h)·bv_h. It never projects the
      S tokens, so it is cheaper when T·N < H (sentence tasks, small P).
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size
        self.query = dense(config, h, h, ("embed", "heads"), rngs)
        self.key = dense(config, h, h, ("embed", "heads"), rngs)
        self.value = dense(config, h, h, ("embed", "heads"), rngs)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

    def _split(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return x.reshape(x.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))

    def __call__(
        self,
        hidden_btd: jax.Array,
        key_mask_bs: jax.Array,
        kv_bsd: jax.Array | None = None,
        *,
        kv_proj: tuple[jax.Array, jax.Array] | None = None,
        absorbed: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns (context (B, T, H), attention probabilities (B, N, T, S) or None).

        Args:
          hidden_btd: (B, T, H) query rows. key_mask_bs: bool (B, S), True for real tokens, or bool (B, T, S)
            per query row (packed rows: a token sees only its own segment).
          kv_bsd: (B, S, H) key/value source (NarrowBERT's frozen C); None for self-attention.
          kv_proj: precomputed (K, V), each (B, S, H) — the encoder's fused projection for narrow layers.
          absorbed: use the absorbed form (needs ``kv_bsd``; exact, see the class docstring).
        """
        fused = self.config.fuse_qkv and kv_bsd is None and kv_proj is None and not absorbed
        kv_bsd = hidden_btd if kv_bsd is None else kv_bsd
        if fused:
            q_btd, k_btd, v_btd = self._fused_qkv(hidden_btd)
            kv_proj = (k_btd, v_btd)
        else:
            q_btd = self.query(hidden_btd)
        q_btnd = self._split(q_btd)
        # (B, S) key mask, or (B, T, S) per query (packed rows: segment-aware attention)
        mask_b11s = key_mask_bs[:, None, None, :] if key_mask_bs.ndim == 2 else key_mask_bs[:, None, :, :]
        if absorbed:
            ctx_btnd, probs = self._absorbed(q_btnd, kv_bsd, mask_b11s, deterministic)
            return ctx_btnd.reshape(ctx_btnd.shape[:-2] + (-1,)), (probs if output_attentions else None)
        k_bsd, v_bsd = kv_proj if kv_proj is not None else (self.key(kv_bsd), self.value(kv_bsd))
        k_bsnd, v_bsnd = self._split(k_bsd), self._split(v_bsd)
        use_dropout = not deterministic and self.config.attention_probs_dropout_prob > 0
        if use_dropout and self.config.attention_impl == "cudnn":
            raise ConfigError(
                "attention_impl='cudnn' has no attention-probability dropout (jax.nn.dot_product_attention); "
                f"set attention_probs_dropout_prob=0 (is {self.config.attention_probs_dropout_prob}) or use 'xla'"
            )
        if output_attentions or use_dropout:
            ctx_btnd, probs = self._explicit(q_btnd, k_bsnd, v_bsnd, mask_b11s, deterministic)
        else:
            mask = mask_b11s
            if self.config.attention_impl == "cudnn":  # cuDNN takes the mask as a (B, 1, T, S) bias
                b, t, s = q_btnd.shape[0], q_btnd.shape[1], k_bsnd.shape[1]
                mask = jnp.broadcast_to(mask_b11s, (b, 1, t, s))
            ctx_btnd = jax.nn.dot_product_attention(
                q_btnd, k_bsnd, v_bsnd, mask=mask, implementation=self.config.attention_impl
            )
            probs = None
        return ctx_btnd.reshape(ctx_btnd.shape[:-2] + (-1,)), (probs if output_attentions else None)

    def _fused_qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(Q, K, V), each (B, T, H), from one matmul with the three kernels side by side (H, 3H)."""
        dt = self.query.dtype or x_btd.dtype
        projections = (self.query, self.key, self.value)
        w_hk = jnp.concatenate([m.kernel[...] for m in projections], axis=1).astype(dt)
        b_k = jnp.concatenate([m.bias[...] for m in projections]).astype(dt)
        y = jnp.einsum("BTH,HK->BTK", x_btd.astype(dt), w_hk) + b_k
        return tuple(jnp.split(y, 3, axis=-1))

    def _softmax(self, scores_bnts, mask_b11s, deterministic):
        scores_bnts = jnp.where(mask_b11s, scores_bnts, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_bnts, axis=-1)
        return probs, self.dropout(probs, deterministic=deterministic)

    def _explicit(self, q_btnd, k_bsnd, v_bsnd, mask_b11s, deterministic):
        """Softmax attention written out (fp32 scores), for attention dropout and returned probabilities."""
        scale = 1.0 / jnp.sqrt(jnp.float32(self.config.head_dim))
        scores = jnp.einsum("BTND,BSND->BNTS", q_btnd, k_bsnd, preferred_element_type=jnp.float32) * scale
        probs, dropped = self._softmax(scores, mask_b11s, deterministic)
        return jnp.einsum("BNTS,BSND->BTND", dropped.astype(v_bsnd.dtype), v_bsnd), probs

    def _absorbed(self, q_btnd, c_bsh, mask_b11s, deterministic):
        cfg = self.config
        dt = q_btnd.dtype
        wk_hnd = self.key.kernel[...].astype(dt).reshape(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
        wv_hnd = self.value.kernel[...].astype(dt).reshape(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
        bv_nd = self.value.bias[...].astype(dt).reshape(cfg.num_attention_heads, cfg.head_dim)
        c_bsh = c_bsh.astype(dt)
        scale = 1.0 / jnp.sqrt(jnp.float32(cfg.head_dim))
        qk_btnh = jnp.einsum("BTND,HND->BTNH", q_btnd, wk_hnd)
        scores = jnp.einsum("BTNH,BSH->BNTS", qk_btnh, c_bsh, preferred_element_type=jnp.float32) * scale
        probs, dropped = self._softmax(scores, mask_b11s, deterministic)
        pc_btnh = jnp.einsum("BNTS,BSH->BTNH", dropped.astype(dt), c_bsh)
        weight_btn = dropped.sum(-1).transpose(0, 2, 1).astype(dt)  # 1 without dropout
        ctx = jnp.einsum("BTNH,HND->BTND", pc_btnh, wv_hnd) + weight_btn[..., None] * bv_nd
        return ctx, probs


def dropout_add_norm(
    config: EncoderConfig,
    norm: nnx.LayerNorm,
    dropout: nnx.Dropout,
    y_btd: jax.Array,
    residual_btd: jax.Array,
    *,
    deterministic: bool,
) -> jax.Array:
    """``norm(dropout(y) + residual)``, (B, T, H) -> (B, T, H): the modules, or the fused op of
    ``config.fused_dropout_norm`` with the same parameters (LayerNorm scale/bias, the dropout's RNG stream)."""
    if config.fused_dropout_norm == "off":
        return norm(dropout(y_btd, deterministic=deterministic) + residual_btd)
    if config.fused_dropout_norm == "pallas" and jax.default_backend() not in ("gpu", "tpu"):
        raise ConfigError(
            f"EncoderConfig.fused_dropout_norm='pallas' needs a GPU or TPU (JAX's backend is "
            f"{jax.default_backend()!r}): set it to 'off' or 'jnp' (e.g. --set model.fused_dropout_norm=off), "
            "or 'pallas_interpret' to run the kernels in interpret mode (slow)"
        )
    rate = 0.0 if deterministic else dropout.rate
    return dropout_add_layer_norm(
        residual_btd,
        y_btd.astype(residual_btd.dtype),
        norm.scale[...],
        norm.bias[...],
        eps=norm.epsilon,
        rate=rate,
        key=dropout.rngs() if rate > 0 else None,
        impl=config.fused_dropout_norm,
    )


class BertSelfOutput(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dense = dense(config, config.hidden_size, config.hidden_size, ("heads", "embed"), rngs)
        self.LayerNorm = layer_norm(config, config.layer_norm_eps, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, ctx_btd: jax.Array, residual_btd: jax.Array, *, deterministic: bool = True) -> jax.Array:
        y = self.dense(ctx_btd)
        return dropout_add_norm(self.config, self.LayerNorm, self.dropout, y, residual_btd, deterministic=deterministic)


class BertAttention(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, rngs=rngs)
        self.output = BertSelfOutput(config, rngs=rngs)

    def __call__(self, hidden_btd, key_mask_bs, kv_bsd=None, *, deterministic=True, output_attentions=False, **kw):
        ctx, probs = self.self(
            hidden_btd, key_mask_bs, kv_bsd, deterministic=deterministic, output_attentions=output_attentions, **kw
        )
        return self.output(ctx, hidden_btd, deterministic=deterministic), probs


class BertIntermediate(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = dense(config, config.hidden_size, config.intermediate_size, ("embed", "mlp"), rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.act(self.dense(x_btd))


class BertOutput(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dense = dense(config, config.intermediate_size, config.hidden_size, ("mlp", "embed"), rngs)
        self.LayerNorm = layer_norm(config, config.layer_norm_eps, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x_btf: jax.Array, residual_btd: jax.Array, *, deterministic: bool = True) -> jax.Array:
        y = self.dense(x_btf)
        return dropout_add_norm(self.config, self.LayerNorm, self.dropout, y, residual_btd, deterministic=deterministic)


class BertLayer(nnx.Module):
    """Post-LN transformer layer. ``kv_bsd`` given: a narrow layer (queries, residual and FFN on T rows only)."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(config, rngs=rngs)
        self.intermediate = BertIntermediate(config, rngs=rngs)
        self.output = BertOutput(config, rngs=rngs)

    def __call__(self, hidden_btd, key_mask_bs, kv_bsd=None, *, deterministic=True, output_attentions=False, **kw):
        """``kw``: ``kv_proj`` / ``absorbed`` for narrow layers (see :class:`BertSelfAttention`)."""
        x, probs = self.attention(
            hidden_btd, key_mask_bs, kv_bsd, deterministic=deterministic, output_attentions=output_attentions, **kw
        )
        return self.output(self.intermediate(x), x, deterministic=deterministic), probs


class BertPooler(nnx.Module):
    """tanh(Dense(first row))."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = dense(config, config.hidden_size, config.hidden_size, ("embed", "embed_out"), rngs)

    def __call__(self, hidden_btd: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden_btd[:, 0]))


class BertEncoder(nnx.Module):
    """N layers in one ``nnx.List``; behaviour switches at F = ``config.num_full_layers`` (NarrowBERT).

    Layers [0, F) run over all L tokens; their output C is frozen as the key/value source of every narrow layer
    [F, N), which updates only the P selected rows. With F = N (BERT) every layer is full length.
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layer = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def __call__(
        self,
        hidden_bld: jax.Array,
        key_mask_bl: jax.Array,
        narrow_positions_bp: jax.Array | None = None,
        *,
        segment_ids_bl: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[jax.Array, tuple | None, tuple | None]:
        """Returns (final hidden (B, L, H), or (B, P, H) when positions are given; hidden states; attentions).

        ``hidden_states`` holds the embeddings then each layer's output: full layers (B, L, H), narrow (B, P, H).
        ``segment_ids_bl``: packed rows (:mod:`flax_narrow.ops.packing`): every token, and every selected row,
        attends only to the real tokens of its own segment.
        """
        cfg = self.config
        full = cfg.num_full_layers
        layers = list(self.layer)
        kw = dict(deterministic=deterministic, output_attentions=output_attentions, collect=output_hidden_states)
        full_mask = key_mask_bl
        if segment_ids_bl is not None:
            full_mask = segment_attention_mask(segment_ids_bl, segment_ids_bl) & key_mask_bl[:, None, :]
        x, states, attns = self._segment(layers[:full], hidden_bld, full_mask, **kw)
        if narrow_positions_bp is not None:
            context_bld = x
            narrow_layers = layers[full:]
            absorbed = use_absorbed_attention(cfg, narrow_positions_bp.shape[1])
            kv = None
            if narrow_layers and not absorbed and cfg.fuse_narrow_kv and len(narrow_layers) > 1:
                kv = fused_kv_projection(narrow_layers, context_bld)
            narrow_mask = key_mask_bl
            if segment_ids_bl is not None:
                rows_seg = gather_rows(segment_ids_bl, narrow_positions_bp)
                narrow_mask = segment_attention_mask(rows_seg, segment_ids_bl) & key_mask_bl[:, None, :]
            x, s2, a2 = self._segment(
                narrow_layers,
                gather_rows(context_bld, narrow_positions_bp),
                narrow_mask,
                context_bld,
                kv,
                absorbed=absorbed,
                **kw,
            )
            states, attns = states + s2, attns + a2
        elif full < cfg.num_hidden_layers:
            raise InputError(
                f"a NarrowBERT encoder (full_length_layers={full} < {cfg.num_hidden_layers} layers) needs "
                "narrow positions: pass narrow_positions/narrow_valid (or narrow_mask outside jit)"
            )
        hidden_states = (hidden_bld, *states) if output_hidden_states else None
        return x, hidden_states, (tuple(attns) if output_attentions else None)

    def _segment(
        self,
        layers,
        x,
        key_mask_bl,
        context=None,
        kv=None,
        *,
        absorbed=False,
        deterministic=True,
        output_attentions=False,
        collect=False,
    ):
        """Run ``layers`` in order (a Python loop, or ``lax.scan`` over call-time-stacked weights), each under
        the configured remat policy. ``kv``: stacked (K, V), each (M, B, L, H), from the fused projection.

        Returns (x, per-layer outputs if ``collect``, per-layer attention probabilities if requested).
        """
        cfg = self.config

        def call(layer, x, kv_proj):
            return layer(
                x,
                key_mask_bl,
                context,
                kv_proj=kv_proj,
                absorbed=absorbed,
                deterministic=deterministic,
                output_attentions=output_attentions,
            )

        if cfg.remat_policy != "none":
            call = nnx.remat(call, policy=REMAT_POLICIES[cfg.remat_policy])
        if cfg.scan_layers and len(layers) > 1 and not collect and not output_attentions:
            return scan_layers(call, layers, x, kv), [], []
        outs, attns = [], []
        for i, layer in enumerate(layers):
            x, probs = call(layer, x, None if kv is None else (kv[0][i], kv[1][i]))
            if collect:
                outs.append(x)
            if output_attentions:
                attns.append(probs)
        return x, outs, attns


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(call, layers: list, x: jax.Array, kv=None) -> jax.Array:
    """``x = call(layer_i, x, kv_i)`` for every layer as one ``lax.scan``: the layer body compiles once.

    Weights are stacked at call time (parameters keep their per-layer, HF-mirroring paths); the layers'
    updated non-parameter state (dropout RNG counters) is written back after the scan.
    """
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])

    def body(carry, xs):
        state, kv_proj = xs
        layer = nnx.merge(graphdef, state)
        y, _ = call(layer, carry, kv_proj)
        return y, nnx.state(layer)

    x, new_states = jax.lax.scan(body, x, (stacked, kv))
    for i, layer in enumerate(layers):
        nnx.update(layer, jax.tree.map(lambda a, i=i: a[i], new_states))
    return x


def use_absorbed_attention(config: EncoderConfig, num_rows: int) -> bool:
    """The static choice of narrow-attention form for P = ``num_rows`` selected rows.

    Per narrow layer, standard costs ~4·B·L·H² (projecting K and V of all L tokens) + 4·B·P·L·H, absorbed
    ~4·B·P·H² + 4·B·P·N·L·H: absorbed wins when P·N < H.
    """
    mode = config.narrow_attention
    if mode == "auto":
        return num_rows * config.num_attention_heads < config.hidden_size
    return mode == "absorbed"


def fused_kv_projection(layers: list[BertLayer], context_bld: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K and V of every narrow layer from one matmul over the shared frozen context C.

    Returns (K, V), each (M, B, L, H) for M layers, with K[i] == layers[i]...key(C) (and V likewise).
    """
    selfs = [layer.attention.self for layer in layers]
    m = len(selfs)
    dt = selfs[0].query.dtype or context_bld.dtype
    w_h2mh = jnp.stack([jnp.stack([a.key.kernel[...], a.value.kernel[...]]) for a in selfs], axis=1)  # (2,M,H,H)
    b_2mh = jnp.stack([jnp.stack([a.key.bias[...], a.value.bias[...]]) for a in selfs], axis=1)
    h = context_bld.shape[-1]
    w = w_h2mh.transpose(2, 0, 1, 3).reshape(h, 2 * m * h).astype(dt)  # one (H, 2·M·H) matmul
    kv = jnp.einsum("BLH,HK->BLK", context_bld.astype(dt), w).reshape(context_bld.shape[:2] + (2, m, h))
    kv = kv.transpose(2, 3, 0, 1, 4) + b_2mh[:, :, None, None, :].astype(dt)
    return kv[0], kv[1]
