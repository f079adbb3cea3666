"""Preemption: a run killed with SIGKILL and resumed logs exactly the per-step losses of an uninterrupted run;
a run stopped with SIGTERM saves the step it stopped at and exits 143, and that checkpoint restores
(CLI subprocesses; checkpoints through orbax)."""

import os
import signal

import numpy as np
import pytest
from train_helpers import cli_env, finish, log_tail, pretrain_cmd, reference_overrides, start, wait_for

from flax_narrow.train.checkpoint import Checkpointer
from flax_narrow.train.loop import restore_model
from flax_narrow.train.metrics import read_jsonl

STEPS = 50


def _losses(run_dir):
    return {s: r["loss"] for s, r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")).items()}


def _steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(read_jsonl(path)) if os.path.exists(path) else 0


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_reproduce_the_uninterrupted_run(
    tmp_path, data_cache, jax_cache, reference_run
):
    # The uninterrupted run is the session's in-process reference run (same config, checkpoints every 5 steps);
    # the CLI compiles the same program with the same XLA settings, so its losses are bitwise equal.
    ref = {h["step"]: h["loss"] for h in reference_run["history"]}
    env = cli_env(jax_cache, fast_compile=False)
    overrides = reference_overrides(data_cache)

    def cmd(name, *extra):
        # 8 CPU devices like the pytest process (the mesh uses one): XLA splits work over the same threads.
        return pretrain_cmd(overrides, "--output-dir", str(tmp_path / name), "--cpu-devices", "8", *extra)

    # SIGKILL right after the first checkpoint is on disk; SIGTERM after a few logged steps.
    kill_dir, term_dir = tmp_path / "kill", tmp_path / "term"
    kill_log, term_log = str(tmp_path / "kill.log"), str(tmp_path / "term.log")
    killed = start(cmd("kill"), env, kill_log)
    termed = start(cmd("term"), env, term_log)
    ckpts = kill_dir / "checkpoints"
    wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()), killed, kill_log)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    assert finish(killed, kill_log) == -signal.SIGKILL
    wait_for(lambda: _steps_logged(term_dir) >= 3, termed, term_log)
    assert termed.poll() is None, "the run finished before SIGTERM"
    termed.send_signal(signal.SIGTERM)
    assert finish(termed, term_log) == 143, log_tail(term_log)  # saved, then exited with 128 + SIGTERM

    # Resume the killed run; with its first part it must log exactly the reference losses.
    assert max(_losses(kill_dir)) < STEPS
    r1_log = str(tmp_path / "r1.log")
    assert finish(start(cmd("kill", "--resume"), env, r1_log), r1_log) == 0, log_tail(r1_log)
    got = _losses(kill_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref, str({s: (got[s], ref[s]) for s in ref if got[s] != ref[s]})
    assert "resumed from" in open(r1_log).read()
    assert Checkpointer(str(kill_dir / "checkpoints")).all_steps() == [40, 45, 50]  # every 5, keep the newest 3

    # SIGTERM left a checkpoint at the step it stopped at (not a multiple of EVERY in general), and it
    # restores (parameters, step and the run's config) into a working model.
    stopped_at = max(_losses(term_dir))
    assert stopped_at < STEPS and stopped_at in Checkpointer(str(term_dir / "checkpoints")).all_steps()
    model, meta = restore_model(str(term_dir))
    assert meta["step"] == stopped_at and meta["config"]["train"]["steps"] == STEPS
    ids = np.asarray([[2, 40, 41, 42, 43, 3]])
    out = model(ids, narrow_positions=np.asarray([[1, 3]]), narrow_valid=np.ones((1, 2), bool)).logits
    assert out.shape == (1, 2, 1024) and np.isfinite(np.asarray(out)).all()
