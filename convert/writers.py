"""Checkpoint writers. Every write goes to a temporary directory beside the destination and is renamed into
place only when complete, so an interrupted or failed write never leaves a half-written checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from flax_narrow.errors import CheckpointError

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory; on success it replaces ``destination`` (atomically where the OS allows).

    Raises:
      CheckpointError: ``destination`` exists and ``overwrite`` is False, or its parent is not writable.
    """
    dest = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(dest)
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise CheckpointError(f"{dest}: exists and is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        if os.path.exists(dest):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_flax_checkpoint(
    destination: str | os.PathLike,
    *,
    config_dict: dict[str, Any],
    hf_config: dict[str, Any],
    architecture: str,
    params: dict[str, np.ndarray],
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write config.json (HF-readable, plus a ``flax_narrow`` block) and ``flax_model.safetensors``.

    ``params`` maps flax parameter paths (``bert.encoder.layer.0.attention.self.query.kernel``) to arrays.
    ``extra_files`` maps names to existing files copied alongside (tokenizer files).
    """
    from safetensors.numpy import save_file

    with atomic_directory(destination, overwrite=overwrite) as tmp:
        cfg = dict(hf_config)
        cfg["architectures"] = [architecture]
        cfg["flax_narrow"] = {"format_version": FORMAT_VERSION, "architecture": architecture, "config": config_dict}
        write_json(os.path.join(tmp, "config.json"), cfg)
        save_file(
            {k: np.ascontiguousarray(v) for k, v in params.items()},
            os.path.join(tmp, "flax_model.safetensors"),
            metadata={"format": "flax-narrow"},
        )
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
    return os.path.abspath(os.fspath(destination))
