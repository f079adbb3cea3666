"""An opened checkpoint (:mod:`~flax_narrow.convert.sources`) matched to a model class's parameters
(:func:`~flax_narrow.convert.keymap.plan_load`), and the model built from it.

``from_pretrained`` is :func:`load_model` on :func:`~flax_narrow.convert.sources.open_source`; ``convert``,
``export`` and ``inspect`` plan with :func:`plan_model_load` and stream the tensors instead. The class comes
from the caller: this module never imports the model classes (``flax_narrow.modeling`` calls down into it).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, ConfigError

from . import keymap, sources
from .readers import TensorSource
from .sources import OpenedSource

log = logging.getLogger(__name__)


def check_layer_layout(keys: list[str], config: EncoderConfig, where: str) -> None:
    """Cross-check the config's layer counts (and NarrowBERT's F) against the layer indices in HF-named weights.

    Raises:
      ConfigError: e.g. "config says num_hidden_layers=3 but the weights hold encoder.layer [0, 1]".
    """
    full = {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", k))}
    narrow = {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)encoder_narrow\.layer\.(\d+)\.", k))}
    if not full and not narrow:
        return
    if narrow:
        if not config.is_narrow:
            raise ConfigError(
                f"{where}: the weights hold NarrowBERT layers (encoder_narrow.layer.*) but the config "
                f"has no full_length_layers < num_hidden_layers"
            )
        if full != set(range(config.num_full_layers)) or narrow != set(range(config.num_narrow_layers)):
            raise ConfigError(
                f"{where}: config says full_length_layers={config.full_length_layers} of "
                f"{config.num_hidden_layers} layers, but the weights hold encoder.layer {sorted(full)} and "
                f"encoder_narrow.layer {sorted(narrow)}"
            )
    elif full != set(range(config.num_hidden_layers)):
        raise ConfigError(
            f"{where}: config says num_hidden_layers={config.num_hidden_layers} but the weights hold "
            f"encoder.layer {sorted(full)}"
        )


def _find(shapes: dict[str, tuple[int, ...]], pattern: str) -> tuple[str, tuple[int, ...]] | None:
    for key, shape in shapes.items():
        if re.search(pattern, key):
            return key, tuple(shape)
    return None


def check_config_against_shapes(config: EncoderConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Name the first config field that the weights contradict (instead of a list of every mis-shaped key).

    Raises:
      ConfigError: e.g. "config says hidden_size=512 but bert.embeddings.word_embeddings.weight is (99, 32)".
    """
    checks = [
        (r"embeddings\.word_embeddings\.(weight|embedding)$", ("vocab_size", "hidden_size")),
        (r"embeddings\.position_embeddings\.(weight|embedding)$", ("max_position_embeddings", "hidden_size")),
        (r"embeddings\.token_type_embeddings\.(weight|embedding)$", ("type_vocab_size", "hidden_size")),
        (r"encoder\.layer\.0\.intermediate\.dense\.weight$", ("intermediate_size", "hidden_size")),
        (r"encoder\.layer\.0\.intermediate\.dense\.kernel$", ("hidden_size", "intermediate_size")),
    ]
    for pattern, fields in checks:
        hit = _find(shapes, r"(^|\.)" + pattern)
        if hit is None:
            continue
        key, shape = hit
        want = tuple(getattr(config, f) for f in fields)
        if shape != want:
            said = ", ".join(f"{f}={getattr(config, f)}" for f in fields)
            raise ConfigError(
                f"{where}: the config says {said} but {key} has shape {shape}; fix config.json or pass --config"
            )
    if config.type_vocab_size and not _find(shapes, r"embeddings\.token_type_embeddings\."):
        if _find(shapes, r"embeddings\.word_embeddings\."):
            raise ConfigError(
                f"{where}: the config says type_vocab_size={config.type_vocab_size} but the weights have no "
                "token_type_embeddings; set type_vocab_size to 0 in the config"
            )


def _flat(state: nnx.State) -> dict[str, Any]:
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def param_shapes(cls: type, config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """flax path -> shape of every parameter of ``cls(config)``, from ``nnx.eval_shape`` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return {p: tuple(v.shape) for p, v in _flat(nnx.state(abstract, nnx.Param)).items()}


def plan_model_load(
    opened: OpenedSource,
    cls: type,
    config: EncoderConfig,
    *,
    strict: bool = False,
    raise_problems: bool = True,
    action: str = "load into",
    targets: dict[str, tuple[int, ...]] | None = None,
) -> keymap.LoadPlan:
    """Match an opened checkpoint to the parameters of ``cls(config)``, strictly, checking the config first.

    Args:
      strict: parameters absent from the checkpoint are an error (by default heads and the pooler may be
        left to a fresh initialisation, reported in ``plan.fresh``).
      raise_problems: raise on key problems (else they stay in ``plan.problems``, for ``inspect``).
      action: the verb of the error message ('load into', 'convert to').
      targets: :func:`param_shapes` of ``cls(config)``, when the caller has them already.

    Raises:
      ConfigError: the config contradicts the weights (layer counts, sizes).
      CheckpointError: missing, unexpected or mis-shaped keys (all named, on one line).
    """
    src = opened.source
    shapes = {k: tuple(src.shape(k)) for k in src.keys()}
    if opened.key_format == "hf":
        check_layer_layout(list(shapes), config, opened.path)
    check_config_against_shapes(config, shapes, opened.path)
    plan = keymap.plan_load(
        param_shapes(cls, config) if targets is None else targets,
        shapes,
        source_format=opened.key_format,
        full_length_layers=config.full_length_layers,
        allow_fresh=not strict,
    )
    if plan.problems and raise_problems:
        raise CheckpointError(f"{opened.path}: cannot {action} {cls.__name__}: " + "; ".join(plan.problems))
    return plan


def stale_decoder_gap(src: TensorSource, load: keymap.LoadPlan, blocks: int = 64, rows: int = 32) -> float:
    """Max |decoder copy - word embeddings| over evenly spread row blocks, when a checkpoint stores an untied
    copy; 0 when it does not. Sampled, so as not to read the (ignored) copy whole: the copy is dropped either
    way, the figure only tells the user how stale it was."""
    dec = next((k for k in load.ignored if k.endswith("decoder.weight")), None)
    emb = next((key for key, _ in load.assignments.values() if key.endswith("word_embeddings.weight")), None)
    if dec is None or emb is None or src.shape(dec) != src.shape(emb):
        return 0.0
    n = src.shape(dec)[0]
    gap = 0.0
    for start in sorted({int(s) for s in np.linspace(0, max(n - rows, 0), blocks)}):
        a = src.get_rows(dec, start, start + rows).astype(np.float32)
        b = src.get_rows(emb, start, start + rows).astype(np.float32)
        gap = max(gap, float(np.abs(a - b).max(initial=0.0)))
    return gap


def load_model(cls: type, opened: OpenedSource, *, seed: int = 0, strict: bool = False) -> Any:
    """``cls(opened.config)`` filled from the opened checkpoint (cast to the config's param dtype).

    Heads absent from the checkpoint are initialised from ``seed`` and named in a warning (unless ``strict``);
    heads the model lacks are dropped with a warning.

    Raises:
      ConfigError / CheckpointError: as :func:`plan_model_load`.
    """
    config = opened.config
    assert config is not None
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed))))
    flat_abs = _flat(abstract)
    targets = {p: tuple(v.shape) for p, v in flat_abs.items() if isinstance(v, nnx.Param)}
    plan = plan_model_load(opened, cls, config, strict=strict, targets=targets)
    if plan.fresh:
        log.warning("%s: newly initialised (not in the checkpoint): %s", cls.__name__, ", ".join(plan.fresh))
    if plan.dropped_heads:
        log.warning("%s: checkpoint weights not used by this model: %s", cls.__name__, ", ".join(plan.dropped_heads))
    gap = stale_decoder_gap(opened.source, plan)  # sampled row blocks: never reads the copy whole
    if gap > 0:
        log.warning(
            "checkpoint holds an untied MLM decoder copy differing from the word embeddings by up to %.3g; "
            "ignored: the decoder is tied to the word embeddings",
            gap,
        )

    # Non-parameter state (dropout RNG streams) and fresh parameters come from one jitted constructor call;
    # XLA drops the random init of every parameter that is loaded, so that costs nothing. The jitted function
    # is cached per (class, config, wanted paths) with the seed as an argument: loading the same kind of
    # checkpoint again compiles nothing.
    want = frozenset(plan.fresh) | {p for p, v in flat_abs.items() if not isinstance(v, nnx.Param)}
    values: dict[str, Any] = dict(_jitted_init(cls, config, want)(jax.random.key(seed)))
    pdtype = config.params_dtype
    for path, (key, transform) in plan.assignments.items():
        values[path] = jnp.asarray(keymap.TRANSFORMS[transform](opened.source.get(key)).astype(pdtype))
    for path, var in flat_abs.items():
        var.set_value(values[path]) if hasattr(var, "set_value") else setattr(var, "value", values[path])
    return nnx.merge(graphdef, abstract)


def load_checkpoint(
    cls: type,
    path: str,
    *,
    config: EncoderConfig | None = None,
    seed: int = 0,
    strict: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    **config_overrides: Any,
) -> Any:
    """:func:`load_model` of ``cls`` from a checkpoint path (anything
    :func:`~flax_narrow.convert.sources.open_source` opens), its config changed by ``config_overrides``."""
    opened = sources.open_source(path, config=config, revision=revision, cache_dir=cache_dir)
    try:
        if config_overrides:
            opened.config = opened.config.replace(**config_overrides)
        return load_model(cls, opened, seed=seed, strict=strict)
    finally:
        opened.close()


@functools.lru_cache(maxsize=64)
def _jitted_init(cls: type, config: EncoderConfig, want: frozenset[str]) -> Any:
    """A jitted ``key -> {path: value}`` of the freshly constructed model's state at the ``want`` paths
    (``nnx.Rngs(jax.random.key(seed))`` is ``nnx.Rngs(seed)``)."""

    def init(key: jax.Array) -> dict[str, Any]:
        model = cls(config, rngs=nnx.Rngs(key))
        return {p: v.get_value() for p, v in _flat(nnx.state(model)).items() if p in want}

    return jax.jit(init)
