"""The original BORT checkpoint: an MXNet/GluonNLP ``bort.params`` file, read without MXNet.

File layout (MXNet ``NDArray::Save`` of a named list, little-endian)::

    uint64 0x112 (list magic) | uint64 reserved | uint64 number of arrays
    per array: uint32 0xF993FAC9 (NDArray V2 magic; 0xF993FACA, V3, has the same layout) | int32 storage type
               (0 = dense) | uint32 ndim | int64 dims[ndim] | int32 dev_type | int32 dev_id | int32 dtype flag
               | raw data
    uint64 number of names | per name: uint64 length | bytes

The width of ``ndim`` is 4 bytes in MXNet's ``TShape::Save`` (``int ndim_``); SPEC-bort.md asks to check it on
a real file, and none was available when this reader was written, so the reader tries 4 bytes and falls back to
8 bytes when the 4-byte reading does not parse. Arrays are memory-mapped views, read lazily.

Names map to HF BERT names through ``GLUON_MODULES`` (module prefixes) and ``GLUON_LEAVES`` (gamma/beta are
LayerNorm's weight/bias); GluonNLP Dense weights are (out, in) like PyTorch's, so the usual HF → flax transforms
apply afterwards. The config is inferred from the shapes (:func:`infer_config`) or given explicitly.
"""

from __future__ import annotations

import logging
import os
import re
import struct

import numpy as np

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, ConfigError

from .readers import TensorSource

log = logging.getLogger(__name__)

LIST_MAGIC = 0x112
NDARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)  # V2, V3 (numpy-shape semantics; same byte layout)
# mshadow type flags
DTYPE_FLAGS = {
    0: np.float32,
    1: np.float64,
    2: np.float16,
    3: np.uint8,
    4: np.int32,
    5: np.int8,
    6: np.int64,
}

# GluonNLP module prefix -> HF BERT module prefix ({i}: transformer cell / layer index).
GLUON_MODULES: list[tuple[str, str]] = [
    ("word_embed.0", "bert.embeddings.word_embeddings"),
    ("token_type_embed.0", "bert.embeddings.token_type_embeddings"),
    ("encoder.layer_norm", "bert.embeddings.LayerNorm"),
    ("encoder.transformer_cells.{i}.attention_cell.proj_query", "bert.encoder.layer.{i}.attention.self.query"),
    ("encoder.transformer_cells.{i}.attention_cell.proj_key", "bert.encoder.layer.{i}.attention.self.key"),
    ("encoder.transformer_cells.{i}.attention_cell.proj_value", "bert.encoder.layer.{i}.attention.self.value"),
    ("encoder.transformer_cells.{i}.proj", "bert.encoder.layer.{i}.attention.output.dense"),
    ("encoder.transformer_cells.{i}.layer_norm", "bert.encoder.layer.{i}.attention.output.LayerNorm"),
    ("encoder.transformer_cells.{i}.ffn.ffn_1", "bert.encoder.layer.{i}.intermediate.dense"),
    ("encoder.transformer_cells.{i}.ffn.ffn_2", "bert.encoder.layer.{i}.output.dense"),
    ("encoder.transformer_cells.{i}.ffn.layer_norm", "bert.encoder.layer.{i}.output.LayerNorm"),
    ("pooler", "bert.pooler.dense"),
    ("decoder.0", "cls.predictions.transform.dense"),
    ("decoder.2", "cls.predictions.transform.LayerNorm"),
]
GLUON_LEAVES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
GLUON_SPECIAL = {
    "encoder.position_weight": "bert.embeddings.position_embeddings.weight",
    "decoder.3.bias": "cls.predictions.bias",
    "decoder.3.weight": "cls.predictions.decoder.weight",  # the tied word embedding: ignored on load
}

# What the shapes cannot tell: BORT's values (GluonNLP's BORT is the only model we know shipped this way).
BORT_HEAD_DIM = 128
GLUON_DEFAULTS = dict(layer_norm_eps=1e-5, mlm_head_layer_norm_eps=1e-12, pad_token_id=1, hidden_act="gelu")


def _compile_modules() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for gluon, hf in GLUON_MODULES:
        pattern = re.escape(gluon).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(rf"^{pattern}\.(?P<leaf>\w+)$"), hf))
    return out


_MODULES = _compile_modules()


def gluon_to_hf_key(name: str) -> str | None:
    """The HF BERT key of a GluonNLP parameter name, or None when the name is not in the table."""
    if name in GLUON_SPECIAL:
        return GLUON_SPECIAL[name]
    for pattern, hf in _MODULES:
        m = pattern.match(name)
        if m and m.group("leaf") in GLUON_LEAVES:
            return hf.replace("{i}", m.groupdict().get("i") or "") + "." + GLUON_LEAVES[m.group("leaf")]
    return None


class GluonParamsSource(TensorSource):
    """An MXNet ``.params`` file as a lazy tensor source, keyed by the file's own (GluonNLP) names."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise CheckpointError(f"{path}: cannot read ({e}); is it an MXNet .params file?") from None
        if len(self._mm) < 24:
            raise CheckpointError(f"{path}: truncated ({len(self._mm)} bytes; an MXNet .params header is 24 bytes)")
        magic = int.from_bytes(bytes(self._mm[:8]), "little")
        if magic != LIST_MAGIC:
            raise CheckpointError(
                f"{path}: not an MXNet .params file (magic 0x{magic:X} at offset 0, expected 0x{LIST_MAGIC:X}); "
                "pass the GluonNLP bort.params file, or an HF checkpoint"
            )
        first_error: CheckpointError | None = None
        for ndim_width in (4, 8):
            try:
                self._entries = self._parse(ndim_width)
                self.ndim_width = ndim_width
                break
            except CheckpointError as e:
                first_error = first_error or e
        else:
            raise first_error  # type: ignore[misc]
        if self.ndim_width != 4:
            log.warning("%s: parsed with 8-byte ndim fields (4-byte did not parse)", path)

    def _parse(self, ndim_width: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
        mm, path, size = self._mm, self.path, len(self._mm)
        pos = 16

        def truncated() -> CheckpointError:
            return CheckpointError(
                f"{path}: truncated ({size} bytes; the data ends early at offset {pos}); re-download bort.params"
            )

        def read(fmt: str) -> tuple:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise truncated()
            out = struct.unpack_from(fmt, mm, pos)
            pos += n
            return out

        (count,) = read("<Q")
        if count > size:
            raise CheckpointError(f"{path}: corrupt header (claims {count} arrays in {size} bytes)")
        arrays = []
        for index in range(count):
            (nd_magic, stype) = read("<Ii")
            if nd_magic not in NDARRAY_MAGICS:
                raise CheckpointError(
                    f"{path}: array {index} at offset {pos - 8}: magic 0x{nd_magic:X}, expected 0xF993FAC9 "
                    "(MXNet NDArray V2); the file is corrupt or from an unsupported MXNet version"
                )
            if stype != 0:
                raise CheckpointError(f"{path}: array {index} has storage type {stype}; only dense (0) is read")
            (ndim,) = read("<I" if ndim_width == 4 else "<Q")
            if ndim > 32:
                raise CheckpointError(f"{path}: array {index}: implausible ndim {ndim}")
            shape = read(f"<{ndim}q")
            if any(d < 0 for d in shape):
                raise CheckpointError(f"{path}: array {index}: negative dimension in shape {shape}")
            _dev_type, _dev_id, flag = read("<iii")
            if flag not in DTYPE_FLAGS:
                raise CheckpointError(f"{path}: array {index}: unsupported dtype flag {flag}")
            dtype = np.dtype(DTYPE_FLAGS[flag])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if pos + nbytes > size:
                raise truncated()
            arrays.append((dtype, tuple(shape), pos))
            pos += nbytes
        (n_names,) = read("<Q")
        if n_names != count:
            raise CheckpointError(f"{path}: {count} arrays but {n_names} names; the file is corrupt")
        names = []
        for _ in range(n_names):
            (length,) = read("<Q")
            if pos + length > size:
                raise truncated()
            names.append(bytes(mm[pos : pos + length]).decode("utf-8", errors="replace"))
            pos += length
        if pos != size:
            raise CheckpointError(f"{path}: {size - pos} unexpected bytes after the name table; the file is corrupt")
        if len(set(names)) != len(names):
            raise CheckpointError(f"{path}: duplicate array names {sorted({n for n in names if names.count(n) > 1})}")
        return {name: arr for name, arr in zip(names, arrays)}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0].name

    def get(self, key: str) -> np.ndarray:
        dtype, shape, offset = self._entries[key]
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._mm, dtype=dtype.newbyteorder("<"), count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        self._mm = None  # type: ignore[assignment]


class RenamedSource(TensorSource):
    """A view of another source under new key names (``names``: new key -> key in ``inner``)."""

    def __init__(self, inner: TensorSource, names: dict[str, str]):
        self.inner, self.names, self.path = inner, names, inner.path

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self.names[key])

    def dtype(self, key: str) -> str:
        return self.inner.dtype(self.names[key])

    def get(self, key: str) -> np.ndarray:
        return self.inner.get(self.names[key])

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self.inner.get_rows(self.names[key], start, stop)

    def close(self) -> None:
        self.inner.close()


def open_gluon_params(path: str) -> RenamedSource:
    """Open ``bort.params`` under HF BERT key names. Names the table does not know keep their GluonNLP spelling
    (so that a strict load reports them as unexpected keys)."""
    raw = GluonParamsSource(path)
    names: dict[str, str] = {}
    for name in raw.keys():
        hf = gluon_to_hf_key(name) or name
        if hf in names:
            raise CheckpointError(f"{path}: {name!r} and {names[hf]!r} both map to {hf}")
        names[hf] = name
    return RenamedSource(raw, names)


def infer_config(shapes: dict[str, tuple[int, ...]], where: str, **overrides) -> EncoderConfig:
    """An EncoderConfig from HF-named shapes of a GluonNLP BERT/BORT checkpoint.

    Sizes come from the shapes; what shapes cannot tell comes from BORT (LayerNorm eps 1e-5, MLM-head eps 1e-12,
    pad id 1, erf GELU, head dim 128 -> ``num_attention_heads = hidden / 128``). No token-type table means
    ``type_vocab_size=0``.

    Raises:
      ConfigError: a size that cannot be read from the shapes (pass a config instead).
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ConfigError(f"{where}: cannot infer the config: no {key} in the file; pass --config")
        return shapes[key]

    vocab, hidden = need("bert.embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    if not layers:
        raise ConfigError(f"{where}: cannot infer the config: no transformer cells in the file; pass --config")
    if hidden % BORT_HEAD_DIM:
        raise ConfigError(
            f"{where}: the number of attention heads is not stored in a .params file and hidden size {hidden} is not "
            f"a multiple of BORT's head dim {BORT_HEAD_DIM}; pass --config with num_attention_heads"
        )
    kw = dict(GLUON_DEFAULTS)
    kw.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=hidden // BORT_HEAD_DIM,
        intermediate_size=need("bert.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=need("bert.embeddings.position_embeddings.weight")[0],
        type_vocab_size=shapes.get("bert.embeddings.token_type_embeddings.weight", (0,))[0],
    )
    kw.update(overrides)
    if kw["pad_token_id"] >= vocab:
        kw["pad_token_id"] = 0
    return EncoderConfig(**kw)


def is_gluon_params(path: str) -> bool:
    """True when ``path`` is a file starting with the MXNet list magic (or named ``*.params``)."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".params"):
        return True
    with open(path, "rb") as fh:
        return int.from_bytes(fh.read(8), "little") == LIST_MAGIC
