"""``from_pretrained`` / ``save_pretrained``: the user-facing composition of ``convert`` and ``modeling``.

Loading is the converter's one reader path: :func:`flax_narrow.convert.sources.open_source` (a local HF directory
with ``model.safetensors``, sharded safetensors or ``pytorch_model.bin`` read with ``weights_only=True``; a
flax-narrow directory written by ``save_pretrained`` or ``flax-narrow convert``; a pretraining or fine-tuning
step checkpoint (``RUN/checkpoints/N``, :mod:`flax_narrow.convert.readers_orbax`); a GluonNLP ``bort.params``; a
weights file with ``config=``; or a hub id, downloaded with ``huggingface_hub`` when online), then
:func:`flax_narrow.convert.loading.load_model`. The modeling package itself never imports the converters; its
classmethods call here, and nothing here imports the model classes back.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.convert import loading, sources, writers
from flax_narrow.convert.loading import check_layer_layout  # noqa: F401  (its old home; re-exported)
from flax_narrow.convert.sources import HUB_PATTERNS, read_checkpoint_config  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def resolve_path(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local directory for ``path_or_hub_id``: the path itself, or a hub snapshot (network needed).

    :func:`flax_narrow.convert.sources.resolve_path`, which ``from_pretrained`` calls through this name.
    """
    return sources.resolve_path(path_or_hub_id, revision=revision, cache_dir=cache_dir)


def from_pretrained(
    cls: type,
    path_or_hub_id: str | os.PathLike,
    *,
    config: EncoderConfig | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    seed: int = 0,
    strict: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    **config_overrides: Any,
) -> Any:
    """Build ``cls`` and fill it from a checkpoint.

    Args:
      cls: a model class (``BertModel``, ``BertForMaskedLM``, ...).
      path_or_hub_id: checkpoint directory, weights file (with ``config=``, unless a config.json is beside it),
        GluonNLP ``bort.params`` (config inferred from the shapes), a run's step checkpoint
        (``RUN/checkpoints/N``, or a run directory without config.json: its latest step), or hub id.
      config: use this config instead of the checkpoint's config.json.
      dtype / param_dtype: compute and parameter dtypes (weights are cast on load; fp16 checkpoints are
        computed in fp32 by default).
      seed: RNG seed for dropout and for freshly initialised heads.
      strict: refuse to initialise any parameter freshly (by default a head missing from the checkpoint is
        initialised and named in a warning, as when loading a base checkpoint into a task model).
      config_overrides: other EncoderConfig fields to change (e.g. ``num_labels=3``).

    Raises:
      CheckpointError: missing/unexpected/mis-shaped keys (all named), unreadable files.
      ConfigError: a config that contradicts the weights.
    """
    local = resolve_path(path_or_hub_id, revision=revision, cache_dir=cache_dir)
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    return loading.load_checkpoint(cls, local, config=config, seed=seed, strict=strict, **overrides)


def _flat(state: nnx.State) -> dict[str, Any]:
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def _config_parts(cls: type, config: EncoderConfig) -> dict[str, Any]:
    return {"config_dict": config.to_dict(), "hf_config": config.to_hf_config(), "architecture": cls.hf_architecture}


def model_config_json(model_or_cls: Any, config: EncoderConfig | None = None) -> dict[str, Any]:
    """The config.json that :func:`save_pretrained` writes for ``model_or_cls`` (a model, or a model class with
    ``config``): what a step checkpoint stores so that it reads as a checkpoint."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    config = model_or_cls.config if config is None else config
    return writers.config_json(**_config_parts(cls, config))


def save_pretrained(model: Any, directory: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Write ``model`` as a flax-narrow checkpoint directory that ``from_pretrained`` reads back exactly.

    ``config.json`` and ``flax_model.safetensors`` are written beside whatever the directory already holds
    (a tokenizer, a README), as transformers does; each file is replaced atomically.

    Raises:
      CheckpointError: ``overwrite=False`` and the directory already holds a checkpoint, or it is a file.
    """
    import shutil
    import tempfile

    from flax_narrow.errors import CheckpointError

    directory = os.path.abspath(os.fspath(directory))
    names = ("config.json", "flax_model.safetensors")
    if os.path.isfile(directory):
        raise CheckpointError(f"{directory}: is a file, not a directory")
    if not overwrite and any(os.path.exists(os.path.join(directory, n)) for n in names):
        raise CheckpointError(f"{directory}: a checkpoint already exists there (pass overwrite=True to replace it)")
    params = {p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(model, nnx.Param)).items()}
    config: EncoderConfig = model.config
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".save-", dir=parent)
    try:
        out = os.path.join(staging, "checkpoint")
        writers.write_flax_checkpoint(out, **_config_parts(type(model), config), params=params, overwrite=True)
        os.makedirs(directory, exist_ok=True)
        for name in sorted(os.listdir(out), key=lambda n: n == "config.json"):  # config.json last
            os.replace(os.path.join(out, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
