"""Helpers shared by the conversion CLI tests: in-process CLI runs, and an MXNet .params writer."""

from __future__ import annotations

import os
import struct

import numpy as np

from flax_narrow.cli import main

# The documented layout (SPEC-bort.md), written independently of the reader under test.
PARAMS_DTYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}


def write_params(
    path,
    arrays: dict[str, np.ndarray],
    *,
    ndim_width: int = 4,
    list_magic: int = 0x112,
    array_magic: int = 0xF993FAC9,
) -> str:
    """Write ``arrays`` as an MXNet ``NDArray::Save`` list file (what GluonNLP's save_parameters produces)."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<QQQ", list_magic, 0, len(arrays)))
        for a in arrays.values():
            a = np.ascontiguousarray(a)
            fh.write(struct.pack("<Ii", array_magic, 0))  # magic, dense storage
            fh.write(struct.pack("<I" if ndim_width == 4 else "<Q", a.ndim))
            fh.write(struct.pack(f"<{a.ndim}q", *a.shape))
            fh.write(struct.pack("<iii", 1, 0, PARAMS_DTYPE_FLAGS[a.dtype]))  # cpu(1), device 0, dtype flag
            fh.write(a.astype(a.dtype.newbyteorder("<")).tobytes())
        fh.write(struct.pack("<Q", len(arrays)))
        for name in arrays:
            raw = name.encode()
            fh.write(struct.pack("<Q", len(raw)) + raw)
    return str(path)


def hf_to_gluon_name(key: str) -> str | None:
    """SPEC-bort.md's name table, HF -> GluonNLP, spelled out (None: not stored by GluonNLP)."""
    fixed = {
        "bert.embeddings.word_embeddings.weight": "word_embed.0.weight",
        "bert.embeddings.position_embeddings.weight": "encoder.position_weight",
        "bert.embeddings.LayerNorm.weight": "encoder.layer_norm.gamma",
        "bert.embeddings.LayerNorm.bias": "encoder.layer_norm.beta",
        "cls.predictions.transform.dense.weight": "decoder.0.weight",
        "cls.predictions.transform.dense.bias": "decoder.0.bias",
        "cls.predictions.transform.LayerNorm.weight": "decoder.2.gamma",
        "cls.predictions.transform.LayerNorm.bias": "decoder.2.beta",
        "cls.predictions.bias": "decoder.3.bias",
    }
    if key in fixed:
        return fixed[key]
    if not key.startswith("bert.encoder.layer."):
        return None
    i, rest = key[len("bert.encoder.layer.") :].split(".", 1)
    cell = f"encoder.transformer_cells.{i}."
    per_layer = {
        "attention.self.query.weight": "attention_cell.proj_query.weight",
        "attention.self.query.bias": "attention_cell.proj_query.bias",
        "attention.self.key.weight": "attention_cell.proj_key.weight",
        "attention.self.key.bias": "attention_cell.proj_key.bias",
        "attention.self.value.weight": "attention_cell.proj_value.weight",
        "attention.self.value.bias": "attention_cell.proj_value.bias",
        "attention.output.dense.weight": "proj.weight",
        "attention.output.dense.bias": "proj.bias",
        "attention.output.LayerNorm.weight": "layer_norm.gamma",
        "attention.output.LayerNorm.bias": "layer_norm.beta",
        "intermediate.dense.weight": "ffn.ffn_1.weight",
        "intermediate.dense.bias": "ffn.ffn_1.bias",
        "output.dense.weight": "ffn.ffn_2.weight",
        "output.dense.bias": "ffn.ffn_2.bias",
        "output.LayerNorm.weight": "ffn.layer_norm.gamma",
        "output.LayerNorm.bias": "ffn.layer_norm.beta",
    }
    return cell + per_layer[rest]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``flax-narrow ARGS`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    """A failed command: non-zero exit, exactly one line on stderr, no traceback, mentioning ``fragments``."""
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))
