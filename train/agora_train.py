"""Training one Agora round's candidates on the mesh, interruptible at the current optimizer step.

The round's Θ is split into units: a group of candidates sharing batch size and epochs trained side by side
(one vmapped step, :class:`~flax_narrow.train.candidates.GroupTrainer`), or, with ``side_by_side=False``, each
candidate alone (the same step, not vmapped). On SIGINT/SIGTERM the unit in progress stops after its current
step and one orbax checkpoint (:class:`~flax_narrow.train.checkpoint.Checkpointer`) is written under
``round_XXX/checkpoint``: the train state of that unit (stacked over its K candidates) and its step, and the
parameters of the units already finished. A rerun with the same ``out_dir`` restores it and continues that
unit from that step (same data order, dropout keys and optimizer state), so the round ends as an uninterrupted
one would, bit for bit on CPU. ``run_agora`` removes the checkpoint once the round's ``state.json`` is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from flax_narrow.errors import ConfigError

from . import checkpoint as ckpt
from .candidates import Candidate, GroupTrainer, abstract_params, groups, mesh_rest, models_from_params
from .finetune import FinetuneConfig, split_model
from .metrics import progress_bar
from .tasks import Task

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


def units(theta: Sequence[Candidate], side_by_side: bool) -> list[list[Candidate]]:
    """What trains together: each group of :func:`~flax_narrow.train.candidates.groups` (side by side), or
    each candidate of it alone; the order of the models a round scores."""
    return [list(g) for g in groups(theta)] if side_by_side else [[c] for g in groups(theta) for c in g]


def checkpoint_dir(round_dir: str) -> str:
    return os.path.join(round_dir, CHECKPOINT)


def remove_checkpoint(round_dir: str) -> None:
    """Drop a finished round's interruption checkpoint (no-op when there is none)."""
    shutil.rmtree(checkpoint_dir(round_dir), ignore_errors=True)


def train_round(
    model_factory: Callable[[int], Any],
    task: Task,
    data: dict[str, np.ndarray],
    theta: Sequence[Candidate],
    base: FinetuneConfig,
    mesh: Mesh,
    *,
    side_by_side: bool,
    round_dir: str,
    should_stop: Callable[[], bool],
    desc: str = "agora",
) -> list[Any] | None:
    """The trained models of ``theta`` in :func:`units` order, or None when ``should_stop()`` turned true
    (after saving the checkpoint described in the module docstring). Resumes from that checkpoint when
    ``round_dir`` holds one.

    Raises:
      ConfigError: the checkpoint was written for other candidates or another number of training rows.
    """
    us = units(theta, side_by_side)
    n = len(data["input_ids"])
    totals = [u[0].config(base).total_steps(n) for u in us]
    meta = {"units": [[c.name for c in u] for u in us], "train_size": n, "side_by_side": side_by_side}
    ck_dir = checkpoint_dir(round_dir)

    def trainer_for(i: int) -> GroupTrainer:
        return GroupTrainer(model_factory, task, data, us[i], base, mesh=mesh, vmapped=side_by_side)

    def k_of(i: int) -> int | None:
        return len(us[i]) if side_by_side else None

    start_unit, start_step, restored, trainer = 0, 0, {}, None
    if ckpt.has_checkpoints(ck_dir):
        ck = ckpt.Checkpointer(ck_dir, keep=1, async_save=False)
        try:
            latest = ck.latest_step()
            saved = ck.read_meta(latest)
            if {k: saved.get(k) for k in meta} != meta:
                raise ConfigError(
                    f"{ck_dir}: this interrupted round trained other candidates or another training set "
                    f"({len(saved.get('units', []))} units, {saved.get('train_size')} rows; now {len(us)} units, "
                    f"{n} rows); delete that directory to redo the round"
                )
            start_unit, start_step = int(saved["unit"]), int(saved["step"])
            trainer = trainer_for(start_unit) if start_unit < len(us) else None
            model0 = trainer.model0 if trainer is not None else model_factory(us[0][0].seed)
            _, one_params, _ = split_model(model0)
            target = {f"u{i:03d}": abstract_params(one_params, mesh, k_of(i)) for i in range(start_unit)}
            if start_step:
                target["current"] = trainer.abstract_state()
            restored, _ = ck.restore(latest, target, None)
        finally:
            ck.close()
        log.info("%s: resuming unit %d of %d at step %d", ck_dir, start_unit + 1, len(us), start_step)

    finished = [restored[f"u{i:03d}"] for i in range(start_unit)]
    models: list[Any] = []
    if finished:
        model0 = trainer.model0 if trainer is not None else model_factory(us[0][0].seed)
        graphdef, _, rest = split_model(model0)
        rest = mesh_rest(rest, mesh)
        for i, p in enumerate(finished):
            models += models_from_params(graphdef, rest, p, k_of(i))

    def save(unit: int, step: int, state: Any) -> None:
        items = {f"u{i:03d}": p for i, p in enumerate(finished)}
        if state is not None:
            items["current"] = state
        ck = ckpt.Checkpointer(ck_dir, keep=1, async_save=False)
        try:
            ck.save(sum(totals[:unit]) + step, items, None, {**meta, "unit": unit, "step": step})
        finally:
            ck.close()
        log.warning("%s: stopped at step %d of unit %d of %d; checkpoint saved, a rerun continues there",
                    desc, step, unit + 1, len(us))  # fmt: skip

    bar = progress_bar(sum(totals), sum(totals[:start_unit]) + start_step, base.progress_bar, desc=desc)

    def progress(steps: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix({"loss": f"{loss:.4f}"}, refresh=False)
            bar.update(steps)

    try:
        for ui in range(start_unit, len(us)):
            if trainer is None or ui != start_unit:
                trainer = trainer_for(ui)
            resume = ui == start_unit and start_step > 0
            state = restored["current"] if resume else trainer.init_state()
            state, step = trainer.run(state, start_step if resume else 0, should_stop=should_stop,
                                      progress=progress)  # fmt: skip
            if step < trainer.total:
                save(ui, step, state)
                return None
            finished.append(state.params)
            models += trainer.models(state.params)
            if should_stop():
                save(ui + 1, 0, None)
                return None
    finally:
        if bar is not None:
            bar.close()
    return models
