"""Orbax behind one small interface: one directory per step holding the train state, each process's
data-iterator state and JSON metadata; asynchronous saves; keep the newest N.

A step may also hold the model config (the config.json ``save_pretrained`` writes) and the tokenizer's files
(``model_config`` and ``tokenizer`` items): then the step directory alone is a checkpoint that
``from_pretrained``, ``finetune --model``, ``export``, ``inspect`` and ``load_tokenizer`` read
(:mod:`flax_narrow.convert.readers_orbax`). Steps written without them still resume.

Restores go against abstract targets that carry the shardings to restore into, so a checkpoint is read
straight onto its shards (and may be restored onto a different mesh).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from flax_narrow.convert.readers_orbax import MODEL_CONFIG, TOKENIZER, tokenizer_item  # noqa: F401
from flax_narrow.errors import CheckpointError

from .sharding import abstract_with_shardings  # noqa: F401  (its old home; restore targets use it)

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"


class Checkpointer:
    """``save(step, state, iterator, meta)`` / ``restore(step, abstract_state, iterator)`` over an orbax
    ``CheckpointManager``."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
                MODEL_CONFIG: ocp.JsonCheckpointHandler(),
                TOKENIZER: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        iterator: Any | None,
        meta: dict[str, Any],
        *,
        model_config: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
    ) -> bool:
        """Start saving (asynchronously when enabled); the iterator state is taken now.

        Args:
          model_config: the model's config.json (:func:`flax_narrow.pretrained.model_config_json`), so that the
            step is a checkpoint every command reads.
          tokenizer: the tokenizer's files (:func:`tokenizer_item` of the tokenizer).
        """
        items: dict[str, Any] = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(iterator)
        if model_config is not None:
            items[MODEL_CONFIG] = ocp.args.JsonSave(model_config)
        if tokenizer is not None:
            items[TOKENIZER] = ocp.args.JsonSave(tokenizer)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        log.info("checkpoint %d %s under %s", step, "started" if saved else "skipped", self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> tuple[Any, dict[str, Any]]:
        """(state on the shardings of ``abstract_state``, metadata); ``iterator`` is set in place."""
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})")
        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out[STATE], dict(out[META])

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(out[META])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the coordination service saw a preemption notice (multi-host TPU)."""
        if jax.process_count() == 1:
            return False
        return bool(self._manager.reached_preemption(step))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def has_checkpoints(directory: str) -> bool:
    """True when ``directory`` holds at least one finished step checkpoint (a numbered sub-directory)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    return os.path.isdir(directory) and any(x.isdigit() for x in os.listdir(directory))
