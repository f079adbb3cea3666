"""The base class of every public model: construction from a config, and the HF-style pretrained I/O."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import InputError
from flax_narrow.ops.gather import positions_from_mask


class PreTrainedEncoder(nnx.Module):
    """Common API: ``from_config``, ``from_pretrained``, ``save_pretrained``, ``num_parameters``.

    ``hf_architecture`` is the class's own name, which is the transformers (or NarrowBERT authors') class name
    that config.json's ``architectures`` carries; the other names of each class are in
    :data:`flax_narrow.modeling.ARCHITECTURES`. A subclass defined outside flax-narrow keeps its parent's
    (its checkpoints are the parent's architecture). Subclasses set ``base_model_prefix`` (``"bert"`` for task
    models holding ``self.bert``; ``""`` for the base model).
    """

    hf_architecture: ClassVar[str] = ""
    base_model_prefix: ClassVar[str] = "bert"

    config: EncoderConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("flax_narrow.modeling."):
            cls.hf_architecture = cls.__name__

    @classmethod
    def from_config(cls, config: EncoderConfig, *, seed: int = 0, **kwargs: Any) -> PreTrainedEncoder:
        """A randomly initialised model (BERT's N(0, initializer_range) init)."""
        return cls(config, rngs=nnx.Rngs(seed), **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **kwargs: Any) -> PreTrainedEncoder:
        """Load a HF PyTorch checkpoint directory/hub id, or a flax-narrow checkpoint directory.

        See :func:`flax_narrow.pretrained.from_pretrained` for the keyword arguments (``dtype``,
        ``param_dtype``, ``config``, ``seed``, ``strict``, ``revision``, config overrides).
        """
        from flax_narrow import pretrained  # the user-facing composition of convert + modeling

        return pretrained.from_pretrained(cls, path_or_hub_id, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = True) -> str:
        """Write a flax-narrow checkpoint (config.json + flax_model.safetensors) atomically; returns the path."""
        from flax_narrow import pretrained

        return pretrained.save_pretrained(self, directory, overwrite=overwrite)

    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def resolve_narrow(
    config: EncoderConfig,
    input_ids_bl: jax.Array,
    narrow_positions: jax.Array | None,
    narrow_valid: jax.Array | None,
    narrow_mask: Any | None,
    *,
    cls_only: bool = False,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Decide which rows a model computes: explicit positions, a host-side mask, the CLS row, or none.

    Returns (positions int32[B, P], valid bool[B, P]) or (None, None) for the dense path. Narrow models
    without any selection compute every row (positions 0..L-1), which is the dense mode for fill-mask.
    """
    if narrow_mask is not None:
        if narrow_positions is not None:
            raise InputError("pass either narrow_mask or narrow_positions, not both")
        narrow_positions, narrow_valid = positions_from_mask(np.asarray(narrow_mask))
    if narrow_positions is None and cls_only and config.is_narrow:
        narrow_positions = jnp.zeros((input_ids_bl.shape[0], 1), jnp.int32)
    if narrow_positions is None and config.is_narrow:
        narrow_positions = jnp.broadcast_to(jnp.arange(input_ids_bl.shape[1], dtype=jnp.int32), input_ids_bl.shape)
    if narrow_positions is not None and narrow_valid is None:
        narrow_valid = jnp.ones(narrow_positions.shape, bool)
    return narrow_positions, narrow_valid
