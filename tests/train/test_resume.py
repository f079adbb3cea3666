"""Preemption: a run killed with SIGKILL and resumed, and a run stopped with SIGTERM and resumed, log exactly
the per-step losses of an uninterrupted run (CLI subprocesses; checkpoints through orbax)."""

import os
import signal

import pytest
from train_helpers import cli_env, finish, log_tail, pretrain_cmd, small_overrides, start, wait_for

from flax_narrow.train.checkpoint import Checkpointer
from flax_narrow.train.metrics import read_jsonl

STEPS, EVERY = 30, 5


def _losses(run_dir):
    return {s: r["loss"] for s, r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")).items()}


def _steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(read_jsonl(path)) if os.path.exists(path) else 0


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_reproduce_the_uninterrupted_run(tmp_path, data_cache, jax_cache):
    env = cli_env(jax_cache)
    overrides = small_overrides(data_cache, **{"train.steps": STEPS, "checkpoint.every_steps": EVERY})

    def cmd(name, *extra):
        return pretrain_cmd(overrides, "--output-dir", str(tmp_path / name), *extra)

    # The uninterrupted reference (also fills the data and compilation caches).
    ref_log = str(tmp_path / "ref.log")
    assert finish(start(cmd("ref"), env, ref_log), ref_log) == 0, log_tail(ref_log)
    ref = _losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, STEPS + 1))

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

    # SIGTERM left a checkpoint at the step it stopped at (not a multiple of EVERY in general) that restores.
    term_steps = Checkpointer(str(term_dir / "checkpoints")).all_steps()
    stopped_at = max(_losses(term_dir))
    assert stopped_at in term_steps and stopped_at < STEPS
    killed_at = max(_losses(kill_dir))
    assert killed_at < STEPS

    # Resume both; together with the interrupted part they must log exactly the reference losses.
    r1_log, r2_log = str(tmp_path / "r1.log"), str(tmp_path / "r2.log")
    r1 = start(cmd("kill", "--resume"), env, r1_log)
    r2 = start(cmd("term", "--resume"), env, r2_log)
    assert finish(r1, r1_log) == 0, log_tail(r1_log)
    assert finish(r2, r2_log) == 0, log_tail(r2_log)
    for run_dir, log in ((kill_dir, r1_log), (term_dir, r2_log)):
        got = _losses(run_dir)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert got == ref, f"{run_dir.name}: " + str({s: (got[s], ref[s]) for s in ref if got[s] != ref[s]})
        assert "resumed from" in open(log).read()
