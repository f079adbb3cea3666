"""Open any supported checkpoint as one lazy tensor source plus its config, detecting the format from content:
the one way in for ``from_pretrained``, ``convert``, ``export``, ``inspect`` and the PyTorch NarrowBERT.

Formats: a flax-narrow directory (``flax_model.safetensors`` + config.json, whose ``flax_narrow`` block, when
present, holds the exact config); a step checkpoint of a pretraining or fine-tuning run (``RUN/checkpoints/N``,
orbax; :mod:`~flax_narrow.convert.readers_orbax`), or a run directory that has step checkpoints but no
config.json yet (its latest step); HF BERT/RoBERTa/BORT/NarrowBERT directories or single files
(``model.safetensors``, sharded safetensors, ``pytorch_model.bin``, sharded .bin); the original GluonNLP
``bort.params`` (a file, or a directory holding one); a hub id (:func:`resolve_path`). Single files are
recognised by their first bytes, not their names, so a mislabelled file gets a clear error.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from typing import Any

from flax_narrow.config import EncoderConfig, read_json
from flax_narrow.errors import CheckpointError, ConfigError

from . import gluonnlp, readers, readers_orbax

HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt", "vocab.*"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
ZIP_MAGIC = b"PK\x03\x04"

_SAFETENSORS_NAMES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "bool": "bool"}


def dtype_name(name: str) -> str:
    """numpy-style dtype names for every reader's spelling (safetensors says 'f16', 'i64', ...)."""
    name = str(name).lower()
    if name in _SAFETENSORS_NAMES:
        return _SAFETENSORS_NAMES[name]
    if name[:1] in "iu" and name[1:].isdigit():
        return ("int" if name[0] == "i" else "uint") + name[1:]
    return name


@dataclasses.dataclass
class OpenedSource:
    """A checkpoint ready to convert: lazy tensors (HF names, or flax paths for flax-narrow) and a config."""

    path: str  # the local file or directory
    kind: str  # 'flax-narrow' | 'safetensors' | 'pytorch' | 'gluonnlp'
    files: list[str]
    source: readers.TensorSource
    config: EncoderConfig | None
    config_origin: str  # where the config came from
    architecture: str | None  # from config.json, if any
    raw_config: dict[str, Any] | None
    step: int | None = None  # a step checkpoint's step (``path`` is then its directory)
    _scratch: str | None = None  # a step checkpoint's tokenizer files, written out on demand

    @property
    def key_format(self) -> str:
        """'flax' (keys are flax parameter paths) or 'hf' (PyTorch state-dict names)."""
        return "flax" if self.kind == "flax-narrow" else "hf"

    @property
    def directory(self) -> str:
        return self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))

    @property
    def layout(self) -> str:
        """A human description: 'HF BERT (pytorch_model.bin, float16)', "NarrowBERT, authors' layout", ..."""
        keys = self.source.keys()
        raw = self.raw_config or {}
        if self.kind == "flax-narrow" and self.is_step_checkpoint:
            return "flax-narrow step checkpoint (orbax" + (f", step {self.step})" if self.step is not None else ")")
        if self.kind == "flax-narrow":
            return "flax-narrow checkpoint"
        if self.kind == "gluonnlp":
            return "GluonNLP/MXNet .params (original BORT layout)"
        if any(k.startswith("narrow_bert.") for k in keys) or raw.get("model_type") == "narrow_bert":
            family = "NarrowBERT, port layout (narrow_bert.*)"
        elif any(".encoder_narrow." in f".{k}" for k in keys) or "full_length_layers" in raw:
            family = "NarrowBERT, authors' layout (encoder_narrow.*)"
        elif any(k.startswith("roberta.") for k in keys) or raw.get("model_type") in ("roberta", "xlm-roberta"):
            family = "HF RoBERTa"
        elif self.config is not None and _is_bort_shaped(self.config):
            family = "HF BERT, BORT-shaped"
        else:
            family = "HF BERT"
        what = {"safetensors": "safetensors", "pytorch": "PyTorch pickle (.bin)"}[self.kind]
        if len(self.files) > 1:
            what += f", {len(self.files)} shards"
        return f"{family}; {what}"

    @property
    def is_step_checkpoint(self) -> bool:
        return isinstance(self.source, readers_orbax.OrbaxParamsSource)

    def tokenizer_files(self) -> dict[str, str]:
        """Tokenizer files beside the weights (name -> path), to copy along; a step checkpoint's are written
        out of its ``tokenizer`` item into a scratch directory (removed by :meth:`close`), none if it has none."""
        if self.is_step_checkpoint:
            if not readers_orbax.has_item(self.path, readers_orbax.TOKENIZER):
                return {}
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="flax-narrow-tokenizer-")
                readers_orbax.write_tokenizer_files(self.path, self._scratch)
            return {n: os.path.join(self._scratch, n) for n in sorted(os.listdir(self._scratch))}
        d = self.directory
        return {n: os.path.join(d, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(d, n))}

    def close(self) -> None:
        self.source.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _is_bort_shaped(cfg: EncoderConfig) -> bool:
    bort = EncoderConfig.bort()
    return (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (
        bort.hidden_size,
        bort.num_hidden_layers,
        bort.intermediate_size,
        bort.vocab_size,
    )


def load_config_arg(config: EncoderConfig | str | os.PathLike | dict | None) -> EncoderConfig | None:
    """A ``--config`` value: an EncoderConfig, or a JSON file (HF config.json, or a flax-narrow one)."""
    if config is None or isinstance(config, EncoderConfig):
        return config
    where = "config" if isinstance(config, dict) else os.fspath(config)
    raw = config if isinstance(config, dict) else read_json(where, what="config file")
    if "flax_narrow" in raw:
        return flax_narrow_block(raw, where)[0]
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    if "model_type" not in raw and set(raw) <= names:  # an EncoderConfig.to_dict() dump
        return _config(EncoderConfig.from_dict, raw, where)
    return _config(EncoderConfig.from_hf_config, raw, where)


def resolve_path(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local file or directory for ``path_or_hub_id``: the path itself, or a hub snapshot (network needed).

    Raises:
      CheckpointError: neither a local path nor a hub id that can be downloaded (offline, unknown, gated).
    """
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


def flax_narrow_block(raw: dict[str, Any], where: str) -> tuple[EncoderConfig, str | None]:
    """(config, architecture) of the ``flax_narrow`` block of a config.json (``convert`` / ``save_pretrained``).

    Raises:
      ConfigError: a block that is not ``{"config": {...}, "architecture": ...}``, or an invalid config.
    """
    block = raw["flax_narrow"]
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise ConfigError(f"{where}: the flax_narrow block must be an object with a 'config' object")
    arch = block.get("architecture")
    return _config(EncoderConfig.from_dict, block["config"], where), arch if isinstance(arch, str) else None


def _config(build: Any, raw: dict[str, Any], where: str) -> EncoderConfig:
    """``build(raw)``, its ConfigError naming the file the fields came from."""
    try:
        return build(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_checkpoint_config(directory: str) -> tuple[EncoderConfig, str | None, dict[str, Any]]:
    """(config, architecture or None, raw config.json) of a checkpoint directory.

    A ``flax_narrow`` block (written by ``convert`` and ``save_pretrained``) wins over the HF fields beside it.
    A step checkpoint (or a run directory without config.json: its latest step) gives its ``model_config``.

    Raises:
      CheckpointError: no config.json (or a step checkpoint without its model config).
      ConfigError: config.json is not valid JSON or not a valid config.
    """
    directory = readers_orbax.finished_model_dir(directory)
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        step_dir = readers_orbax.find_step_dir(directory) if os.path.isdir(directory) else None
        if step_dir is not None:
            where = os.path.join(step_dir, readers_orbax.MODEL_CONFIG)
            return parse_checkpoint_config(readers_orbax.read_json_item(step_dir, readers_orbax.MODEL_CONFIG), where)
        raise CheckpointError(f"{directory}: no config.json (pass config=EncoderConfig(...) to load bare weights)")
    return parse_checkpoint_config(read_json(path, what="config file"), path)


def parse_checkpoint_config(raw: dict[str, Any], path: str) -> tuple[EncoderConfig, str | None, dict[str, Any]]:
    """(config, architecture or None, raw) of a config.json's content; ``path`` names it in errors."""
    if "flax_narrow" in raw:
        return (*flax_narrow_block(raw, path), raw)
    archs = raw.get("architectures") or [None]
    return _config(EncoderConfig.from_hf_config, raw, path), archs[0] if isinstance(archs, list) else None, raw


def sniff_file(path: str) -> str:
    """'safetensors', 'pytorch' or 'gluonnlp' from a weights file's first bytes.

    Raises:
      CheckpointError: an empty or unrecognised file.
    """
    if path.endswith(".params"):
        return "gluonnlp"  # the reader checks the magic numbers and says what is wrong
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: empty or truncated ({len(head)} bytes); re-download it")
    if int.from_bytes(head[:8], "little") == gluonnlp.LIST_MAGIC:
        return "gluonnlp"
    if head[:4] == ZIP_MAGIC or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "pytorch"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if path.endswith(".safetensors"):
        return "safetensors"  # let the reader say why it is invalid
    raise CheckpointError(
        f"{path}: unrecognised weights file (starts with {head[:8].hex()}); expected safetensors, a PyTorch .bin "
        "or an MXNet .params file"
    )


def open_source(
    path: str,
    *,
    config: EncoderConfig | str | os.PathLike | dict | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> OpenedSource:
    """Open a checkpoint (directory, weights file, or hub id) lazily and find its config.

    ``from_pretrained``, ``convert``, ``export``, ``inspect`` and the PyTorch NarrowBERT all open checkpoints here.

    Args:
      path: local directory or file (a step checkpoint, or a run directory without config.json: its latest
        step, included), or a hub id (downloaded when online).
      config: overrides the checkpoint's config.json (an EncoderConfig or a JSON path). Needed for a bare
        weights file without config.json beside it; optional for GluonNLP (inferred from the shapes).

    Raises:
      CheckpointError: unreadable, unrecognised, corrupt or refused files.
      ConfigError: an invalid config.
    """
    local = resolve_path(path, revision=revision, cache_dir=cache_dir)
    given = load_config_arg(config)
    local = readers_orbax.finished_model_dir(local)
    step_dir = readers_orbax.find_step_dir(local) if os.path.isdir(local) else None
    if step_dir is not None:
        return open_step_checkpoint(step_dir, given)
    if os.path.isdir(local):
        params = sorted(f for f in os.listdir(local) if f.endswith(".params"))
        try:
            kind, files = readers.find_weight_files(local)
        except CheckpointError as e:
            if len(params) == 1:
                kind, files = "gluonnlp", [os.path.join(local, params[0])]
            elif given is None and not os.path.isfile(os.path.join(local, "config.json")):
                raise CheckpointError(f"{local}: no config.json, and {str(e).removeprefix(f'{local}: ')}") from None
            else:
                raise
        config_dir = local
    elif os.path.isfile(local):
        kind, files = sniff_file(local), [local]
        if kind == "safetensors" and os.path.basename(local) == readers.FLAX_WEIGHTS:
            kind = "flax-narrow"
        config_dir = os.path.dirname(os.path.abspath(local))
    else:
        raise CheckpointError(f"{local}: no such file or directory")
    if kind == "flax":
        kind = "flax-narrow"

    if kind == "gluonnlp":
        source: readers.TensorSource = gluonnlp.open_gluon_params(files[0])
    elif kind == "pytorch":
        source = readers.TorchPickleSource(files)
    else:
        source = readers.SafetensorsSource(files)

    cfg, origin, arch, raw = given, "--config", None, None
    has_config = os.path.isfile(os.path.join(config_dir, "config.json"))
    if has_config and kind != "gluonnlp":
        try:
            file_cfg, arch, raw = read_checkpoint_config(config_dir)
        except Exception:
            source.close()
            raise
        if cfg is None:
            cfg, origin = file_cfg, "config.json"
    if cfg is None and kind == "gluonnlp":
        shapes = {k: source.shape(k) for k in source.keys()}
        cfg, origin = gluonnlp.infer_config(shapes, files[0]), "inferred from the weights' shapes (BORT defaults)"
    if cfg is None:
        source.close()
        raise CheckpointError(
            f"{local}: no config.json beside the weights; pass --config path/to/config.json (or config=...)"
        )
    return OpenedSource(local, kind, files, source, cfg, origin, arch, raw)


def open_step_checkpoint(step_dir: str, config: EncoderConfig | None = None) -> OpenedSource:
    """A step checkpoint opened as a flax-narrow checkpoint: the train state's parameters at that step (for a
    fine-tuning run, those of its ``train`` state) and the config of its ``model_config`` item (or ``config``).

    Raises:
      CheckpointError: not readable, or no ``model_config`` item and no ``config`` given.
      ConfigError: an invalid stored config.
    """
    cfg, origin, arch, raw = config, "--config", None, None
    if readers_orbax.has_item(step_dir, readers_orbax.MODEL_CONFIG) or config is None:
        where = os.path.join(step_dir, readers_orbax.MODEL_CONFIG)
        stored, arch, raw = parse_checkpoint_config(
            readers_orbax.read_json_item(step_dir, readers_orbax.MODEL_CONFIG), where
        )
        if cfg is None:
            cfg, origin = stored, f"the step checkpoint's {readers_orbax.MODEL_CONFIG} item"
    source = readers_orbax.OrbaxParamsSource(step_dir)
    step = readers_orbax.step_number(step_dir)
    return OpenedSource(step_dir, "flax-narrow", [], source, cfg, origin, arch, raw, step=step)
