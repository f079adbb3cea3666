"""Step checkpoints (orbax) as checkpoints every command reads.

A step checkpoint is one directory of a run's ``checkpoints/`` (``RUN/checkpoints/40``), written by
:class:`flax_narrow.train.checkpoint.Checkpointer` for pretraining and fine-tuning alike. Besides the train state
(``state``), the data-iterator state (``data``) and the run's metadata (``meta``), each holds two JSON items that
make it self-contained:

* ``model_config``: the config.json that ``save_pretrained`` writes (HF fields plus the ``flax_narrow`` block);
* ``tokenizer``: the tokenizer's saved files, ``{"files": {name: text}, "base64": {name: base64 text}}``.

Its weights are the ``params`` of the train state at that step (for fine-tuning, of the ``train`` state, not
the best-so-far copy kept beside it), restored without the optimizer state as host numpy arrays, under the
keys ``flax_model.safetensors`` uses (``bert.encoder.layer.0.attention.self.query.kernel``). This module reads
them; :func:`flax_narrow.convert.sources.open_source` and :func:`flax_narrow.tokenization.load_tokenizer` call
it, so ``from_pretrained``, ``finetune --model``, ``export``, ``inspect`` and ``fill_mask`` take a step
directory, a copy of one, or a run directory still without config.json (its latest step).
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
from typing import Any

import numpy as np

from flax_narrow.errors import CheckpointError

from .readers import TensorSource

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
MODEL_CONFIG, TOKENIZER = "model_config", "tokenizer"
CHECKPOINTS = "checkpoints"  # a run directory's step checkpoints


# ------------------------------------------------------------------------------------------------ finding steps
def is_step_dir(path: str) -> bool:
    """True for an orbax step directory: a ``state`` item with orbax metadata (its name need not be a number)."""
    state = os.path.join(path, STATE)
    return os.path.isdir(state) and (
        os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) or os.path.isfile(os.path.join(state, "_METADATA"))
    )


def finished_steps(directory: str) -> list[int]:
    """The steps of the finished step checkpoints directly under ``directory`` (orbax's temporary directories of
    unfinished saves are not numbers and are skipped), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n) for n in os.listdir(directory) if n.isdigit() and is_step_dir(os.path.join(directory, n))
    )  # fmt: skip


def latest_step_dir(path: str) -> str | None:
    """The newest step directory of a run directory (``path/checkpoints/N``) or of a checkpoints directory
    (``path/N``); None when there is none."""
    for directory in (os.path.join(path, CHECKPOINTS), path):
        steps = finished_steps(directory)
        if steps:
            return os.path.join(directory, str(steps[-1]))
    return None


def finished_model_dir(path: str) -> str:
    """``path/best`` for a finished fine-tuning output directory (``summary.json`` and ``best/config.json``, no
    config.json of its own): the model the run chose, not its last step checkpoint (logged); else ``path``."""
    best = os.path.join(path, "best")
    if (
        os.path.isdir(path)
        and not os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "summary.json"))
        and os.path.isfile(os.path.join(best, "config.json"))
    ):
        log.info("%s: a finished fine-tuning run; reading the model it chose, %s", path, best)
        return best
    return path


def find_step_dir(path: str) -> str | None:
    """``path`` itself when it is a step directory; else the latest step of a run (or checkpoints) directory
    that has no ``config.json`` (a finished run's config.json + weights win), logged; else None."""
    if is_step_dir(path):
        return path
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    step_dir = latest_step_dir(path)
    if step_dir is not None:
        log.info("%s: no config.json (an unfinished run); reading its latest step checkpoint %s", path, step_dir)
    return step_dir


# ------------------------------------------------------------------------------------------------ JSON items
def _json_checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.JsonCheckpointHandler())


def has_item(step_dir: str, name: str) -> bool:
    return os.path.isdir(os.path.join(step_dir, name))


def read_json_item(step_dir: str, name: str) -> dict[str, Any]:
    """A JSON item of a step checkpoint.

    Raises:
      CheckpointError: the item is absent (a checkpoint written before flax-narrow stored it) or unreadable.
    """
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(step_dir), name)  # orbax wants absolute paths
    if not has_item(step_dir, name):
        raise CheckpointError(missing_item_message(step_dir, name))
    try:
        out = _json_checkpointer().restore(path, args=ocp.args.JsonRestore())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this step checkpoint item ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return dict(out)


def missing_item_message(step_dir: str, name: str) -> str:
    what = {MODEL_CONFIG: "model config", TOKENIZER: "tokenizer"}.get(name, name)
    run_tok = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), "tokenizer")
    hint = {
        MODEL_CONFIG: "give its config (config=EncoderConfig(...); inspect and convert: --config), or load it "
        "with flax_narrow.train.loop.restore_model(RUN, STEP)",
        TOKENIZER: f"use the run's tokenizer directory ({run_tok if os.path.isdir(run_tok) else 'RUN/tokenizer'})",
    }.get(name, "")
    message = f"{step_dir}: this step checkpoint has no {what} (item {name!r}; written by an older flax-narrow)"
    return f"{message}; {hint}" if hint else message


def step_number(step_dir: str) -> int | None:
    """The step of a step checkpoint: its ``meta`` item's ``step``, else its directory name when a number."""
    if has_item(step_dir, META):
        try:
            step = read_json_item(step_dir, META).get("step")
            if isinstance(step, int):
                return step
        except CheckpointError:
            pass
    name = os.path.basename(os.path.normpath(step_dir))
    return int(name) if name.isdigit() else None


# ------------------------------------------------------------------------------------------------ tokenizer item
def tokenizer_item(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer's saved files (``tokenizer.save_pretrained``) as the JSON of a step checkpoint's
    ``tokenizer`` item: text files as text, any other file base64-encoded."""
    files: dict[str, str] = {}
    binary: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="flax-narrow-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                binary[name] = base64.b64encode(data).decode("ascii")
    return {"files": files, "base64": binary}


def write_tokenizer_files(step_dir: str, directory: str) -> list[str]:
    """Write the step checkpoint's tokenizer files into ``directory``; returns their names.

    Raises:
      CheckpointError: the step checkpoint has no tokenizer item, or it is malformed.
    """
    item = read_json_item(step_dir, TOKENIZER)
    files, binary = item.get("files", {}), item.get("base64", {})
    if not isinstance(files, dict) or not isinstance(binary, dict) or not (files or binary):
        raise CheckpointError(f"{os.path.join(step_dir, TOKENIZER)}: not a tokenizer item (no files)")
    os.makedirs(directory, exist_ok=True)
    names = []
    for name, content in [*files.items(), *binary.items()]:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{os.path.join(step_dir, TOKENIZER)}: bad file name {name!r}")
        data = content.encode("utf-8") if name in files else base64.b64decode(content)
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(data)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------ weights
def _params_path(tree: dict[str, Any], where: str) -> tuple[str, ...]:
    """Where the parameters sit in the saved ``state`` tree: ``params`` (pretraining's TrainState) or
    ``train.params`` (fine-tuning's ``{"train": TrainState, "best": params}``)."""
    if isinstance(tree, dict) and isinstance(tree.get("params"), dict):
        return ("params",)
    train = tree.get("train") if isinstance(tree, dict) else None
    if isinstance(train, dict) and isinstance(train.get("params"), dict):
        return ("train", "params")
    raise CheckpointError(f"{where}: the train state holds no params (keys: {sorted(tree) if tree else []})")


def _key(path: tuple[Any, ...]) -> str:
    parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if parts and parts[-1] == "value":  # nnx.State leaves are saved as {..., "kernel": {"value": array}}
        parts = parts[:-1]
    return ".".join(parts)


def restore_params(step_dir: str) -> dict[str, np.ndarray]:
    """The step's parameters (flax path -> host array, stored dtype), without the optimizer state.

    Raises:
      CheckpointError: not a readable step checkpoint.
    """
    import jax
    import orbax.checkpoint as ocp

    where = os.path.join(os.path.abspath(step_dir), STATE)  # orbax wants absolute paths
    ck = ocp.PyTreeCheckpointer()
    try:
        from etils import epath

        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where)).tree
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read the step checkpoint ({type(e).__name__}: {e})") from None
    at = _params_path(tree, where)
    sub = tree
    for k in at:
        sub = sub[k]

    def nest(leaf_fn: Any) -> dict[str, Any]:
        out: Any = jax.tree.map(leaf_fn, sub)
        for k in reversed(at):
            out = {k: out}
        return out

    item = nest(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype))
    restore_args = nest(lambda m: ocp.RestoreArgs(restore_type=np.ndarray))
    try:
        out = ck.restore(where, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"{where}: cannot restore the parameters ({type(e).__name__}: {e})") from None
    for k in at:
        out = out[k]
    return {_key(path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(out)[0]}


class OrbaxParamsSource(TensorSource):
    """A step checkpoint's parameters under flax-narrow keys (read into host memory once, on open)."""

    def __init__(self, step_dir: str):
        self.path = step_dir
        self._tensors = restore_params(step_dir)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._tensors[key].dtype)

    def get(self, key: str) -> np.ndarray:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}
