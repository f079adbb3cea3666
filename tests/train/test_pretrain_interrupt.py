"""Ctrl-C in pretrain: SIGINT saves a checkpoint at the step it stopped at and exits 130, leaving nothing that
looks like a finished run; ``--resume`` finishes the run with one metrics row per step (a CLI subprocess)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from train_helpers import cli_env, finish, log_tail, pretrain_cmd, small_overrides, start, wait_for

from flax_narrow.train.checkpoint import Checkpointer

STEPS = 60


def _rows(run_dir: str) -> list[tuple[str, int]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [(r["kind"], r["step"]) for r in map(json.loads, fh) if r]


@pytest.mark.slow
def test_sigint_saves_the_current_step_and_resume_finishes_without_repeated_rows(tmp_path, data_cache, jax_cache):
    run = str(tmp_path / "run")
    # Checkpoints every 1000 steps: the only one before the end is the one SIGINT asks for.
    overrides = small_overrides(data_cache, **{"train.steps": STEPS, "checkpoint.every_steps": 1000})
    env = cli_env(jax_cache)
    log_path = str(tmp_path / "first.log")
    proc = start(pretrain_cmd(overrides, "--output-dir", run), env, log_path)
    wait_for(lambda: len(_rows(run)) >= 3, proc, log_path)
    assert proc.poll() is None, "the run finished before SIGINT"
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log_path) == 128 + signal.SIGINT, log_tail(log_path)
    assert "Traceback" not in open(log_path).read(), log_tail(log_path)

    stopped = max(step for _, step in _rows(run))
    assert 3 <= stopped < STEPS
    assert Checkpointer(os.path.join(run, "checkpoints")).all_steps() == [stopped]
    # Nothing that looks like a finished run: no model at the top of the run directory.
    assert not {"config.json", "flax_model.safetensors"} & set(os.listdir(run))

    resume_log = str(tmp_path / "resume.log")
    assert finish(start(pretrain_cmd(overrides, "--output-dir", run, "--resume"), env, resume_log), resume_log) == 0
    assert f"resumed from {os.path.join(run, 'checkpoints')} step {stopped}" in open(resume_log).read()
    train_rows = [step for kind, step in _rows(run) if kind == "train"]
    assert train_rows == list(range(1, STEPS + 1))  # every step once, in order
    assert len(set(_rows(run))) == len(_rows(run))
    assert os.path.isfile(os.path.join(run, "config.json"))
