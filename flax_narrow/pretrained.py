"""``from_pretrained`` / ``save_pretrained``: the user-facing composition of ``convert`` (readers, key maps,
writers) and ``modeling``. The modeling package itself never imports the converters; its classmethods call here.

Sources: a local HF directory (``model.safetensors``, sharded safetensors, ``pytorch_model.bin`` read with
``weights_only=True``), a flax-narrow directory written by ``save_pretrained``, or a hub id (downloaded with
``huggingface_hub`` when online).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.convert import conversion, keymap, readers, writers
from flax_narrow.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt", "vocab.*"]


def resolve_path(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local directory for ``path_or_hub_id``: the path itself, or a hub snapshot (network needed)."""
    path = os.fspath(path_or_hub_id)
    if os.path.exists(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", path):
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo...
        raise CheckpointError(
            f"{path}: not a local path, and downloading it from the hub failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_checkpoint_config(directory: str) -> tuple[EncoderConfig, str | None, dict[str, Any]]:
    """(config, architecture or None, raw config.json) of a checkpoint directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json (pass config=EncoderConfig(...) to load bare weights)")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if "flax_narrow" in raw:
        block = raw["flax_narrow"]
        return EncoderConfig.from_dict(block["config"]), block.get("architecture"), raw
    archs = raw.get("architectures") or [None]
    return EncoderConfig.from_hf_config(raw), archs[0], raw


def check_layer_layout(keys: list[str], config: EncoderConfig, where: str) -> None:
    """Cross-check the config's layer counts (and NarrowBERT's F) against the layer indices in the weights."""
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


def _flat(state: nnx.State) -> dict[str, Any]:
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


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
      path_or_hub_id: checkpoint directory, weights file (with ``config=``), or hub id.
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
    if config is None:
        config, _, _ = read_checkpoint_config(local if os.path.isdir(local) else os.path.dirname(local))
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if overrides:
        config = config.replace(**overrides)
    fmt, source = readers.open_weights(local)
    keys = source.keys()
    if fmt != "flax":
        check_layer_layout(keys, config, local)

    def ctor():
        return cls(config, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    flat_abs = _flat(abstract)
    params_abs = {p: v for p, v in flat_abs.items() if isinstance(v, nnx.Param)}
    plan = keymap.plan_load(
        {p: tuple(v.shape) for p, v in params_abs.items()},
        {k: source.shape(k) for k in keys},
        source_format="flax" if fmt == "flax" else "hf",
        full_length_layers=config.full_length_layers,
        allow_fresh=not strict,
    )
    if plan.problems:
        raise CheckpointError(f"{local}: cannot load into {cls.__name__}: " + "; ".join(plan.problems))
    if plan.fresh:
        log.warning("%s: newly initialised (not in the checkpoint): %s", cls.__name__, ", ".join(plan.fresh))
    if plan.dropped_heads:
        log.warning("%s: checkpoint weights not used by this model: %s", cls.__name__, ", ".join(plan.dropped_heads))
    _warn_stale_decoder(source, plan)

    # Non-parameter state (dropout RNG streams) and fresh parameters come from one jitted constructor call;
    # XLA drops the random init of every parameter that is loaded, so that costs nothing. The jitted function
    # is cached per (class, config, wanted paths) with the seed as an argument: loading the same kind of
    # checkpoint again compiles nothing.
    want = frozenset(plan.fresh) | {p for p, v in flat_abs.items() if not isinstance(v, nnx.Param)}
    init_rest = _jitted_init(cls, config, want)(jax.random.key(seed))
    pdtype = config.params_dtype
    values: dict[str, Any] = dict(init_rest)
    for path, (key, transform) in plan.assignments.items():
        values[path] = jnp.asarray(keymap.TRANSFORMS[transform](source.get(key)).astype(pdtype))
    source.close()
    for path, var in flat_abs.items():
        var.set_value(values[path]) if hasattr(var, "set_value") else setattr(var, "value", values[path])
    return nnx.merge(graphdef, abstract)


@functools.lru_cache(maxsize=64)
def _jitted_init(cls: type, config: EncoderConfig, want: frozenset[str]) -> Any:
    """A jitted ``key -> {path: value}`` of the freshly constructed model's state at the ``want`` paths
    (``nnx.Rngs(jax.random.key(seed))`` is ``nnx.Rngs(seed)``)."""

    def init(key: jax.Array) -> dict[str, Any]:
        model = cls(config, rngs=nnx.Rngs(key))
        return {p: v.get_value() for p, v in _flat(nnx.state(model)).items() if p in want}

    return jax.jit(init)


def _warn_stale_decoder(source: readers.TensorSource, plan: keymap.LoadPlan) -> None:
    """The MLM decoder is always tied to the word embeddings; say so when a checkpoint's copy differs."""
    gap = conversion.stale_decoder_gap(source, plan)  # sampled row blocks: never reads the copy whole
    if gap > 0:
        log.warning(
            "checkpoint holds an untied MLM decoder copy differing from the word embeddings by up to %.3g; "
            "ignored: the decoder is tied to the word embeddings",
            gap,
        )


def save_pretrained(model: Any, directory: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Write ``model`` as a flax-narrow checkpoint directory that ``from_pretrained`` reads back exactly.

    ``config.json`` and ``flax_model.safetensors`` are written beside whatever the directory already holds
    (a tokenizer, a README), as transformers does; each file is replaced atomically.

    Raises:
      CheckpointError: ``overwrite=False`` and the directory already holds a checkpoint, or it is a file.
    """
    import shutil
    import tempfile

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
        writers.write_flax_checkpoint(
            out,
            config_dict=config.to_dict(),
            hf_config=config.to_hf_config(),
            architecture=type(model).hf_architecture,
            params=params,
            overwrite=True,
        )
        os.makedirs(directory, exist_ok=True)
        for name in sorted(os.listdir(out), key=lambda n: n == "config.json"):  # config.json last
            os.replace(os.path.join(out, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
