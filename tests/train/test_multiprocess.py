"""Two processes (jax.distributed, gloo collectives on CPU, 4 devices each, one 8-device mesh) train together
and reproduce the single-process run (the session's one-device reference run, same config); resumed, and one
of them sent SIGTERM, both stop at the same step, save it and exit 143."""

import os
import signal

import numpy as np
import pytest
from train_helpers import cli_env, finish, free_port, log_tail, pretrain_cmd, reference_overrides, start, wait_for

from flax_narrow.train.metrics import read_jsonl

STOP = 10


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, data_cache, jax_cache, reference_run):
    env = cli_env(jax_cache)
    overrides = reference_overrides(data_cache, **{"mesh.data": 2, "mesh.fsdp": 4})

    def launch(phase, *extra):
        port = free_port()
        procs, logs = [], []
        for pid in range(2):
            logs.append(str(tmp_path / f"{phase}-p{pid}.log"))
            # Process 1 starts from an empty data cache: it must receive process 0's tokenizer (WordPiece
            # training is not deterministic) and pack the same rows itself.
            cache = data_cache if pid == 0 else str(tmp_path / "cache1")
            cmd = pretrain_cmd(
                [*overrides, f"data.cache_dir={cache}"],
                *("--output-dir", str(tmp_path / "multi"), "--cpu-devices", "4", *extra),
                *("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)),
            )
            procs.append(start(cmd, env, logs[-1]))
        return procs, logs

    procs, logs = launch("a", "--stop-at", str(STOP))
    for p, log in zip(procs, logs):
        assert finish(p, log) == 0, log_tail(log)
    assert "over 2 processes" in open(logs[0]).read()
    assert f'"final_step": {STOP}' in open(logs[0]).read()
    assert '"final_step"' not in open(logs[1]).read()  # summaries and metrics come from process 0 only

    got = read_jsonl(os.path.join(tmp_path / "multi", "metrics.jsonl"))
    assert sorted(got) == list(range(1, STOP + 1))
    ref = reference_run["history"][:STOP]
    np.testing.assert_allclose([got[s]["loss"] for s in range(1, STOP + 1)], [h["loss"] for h in ref], rtol=1e-5)
    got_eval = read_jsonl(os.path.join(tmp_path / "multi", "metrics.jsonl"), kind="eval")
    assert sorted(got_eval) == [10]
    np.testing.assert_allclose(got_eval[10]["eval_loss"], reference_run["evals"][0]["eval_loss"], rtol=1e-5)
    assert os.listdir(tmp_path / "cache1" / "received")  # process 1 used the broadcast tokenizer
    # Both processes wrote their shards of the checkpoint, and each its own data-iterator state.
    data_dir = tmp_path / "multi" / "checkpoints" / str(STOP) / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))

    # Resume together; SIGTERM to process 1 only: jax.distributed's preemption notice reaches both, they agree
    # on a step, save it and exit 143; the resumed steps still follow the reference run.
    procs, logs = launch("b", "--resume")
    metrics = os.path.join(tmp_path / "multi", "metrics.jsonl")
    wait_for(lambda: max(read_jsonl(metrics)) >= STOP + 3, procs[0], logs[0])
    assert all(p.poll() is None for p in procs), "the resumed run finished before SIGTERM"
    procs[1].send_signal(signal.SIGTERM)
    for p, log in zip(procs, logs):
        assert finish(p, log) == 143, log_tail(log)
    got = read_jsonl(metrics)
    stopped = max(got)
    assert STOP + 3 <= stopped < 50 and f"Reached preemption sync point, step={stopped}" in open(logs[1]).read()
    assert (tmp_path / "multi" / "checkpoints" / str(stopped)).is_dir()
    assert "resumed from" in open(logs[0]).read()
    ref = reference_run["history"][:stopped]
    np.testing.assert_allclose([got[s]["loss"] for s in range(1, stopped + 1)], [h["loss"] for h in ref], rtol=1e-5)
