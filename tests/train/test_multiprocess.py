"""Two processes (jax.distributed, gloo collectives on CPU, 4 devices each) train together and match the
single-process run on the same 8-device mesh."""

import os

import numpy as np
import pytest
from train_helpers import cli_env, finish, free_port, log_tail, pretrain_cmd, small_overrides, start

from flax_narrow.train.metrics import read_jsonl

STEPS = 10


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, data_cache, jax_cache):
    env = cli_env(jax_cache)
    overrides = small_overrides(
        data_cache,
        **{
            "train.steps": STEPS,
            "mesh.data": 2,
            "mesh.fsdp": 4,
            "checkpoint.every_steps": 5,
            "train.eval_every": 5,
            "data.eval_fraction": 0.1,
        },
    )
    single_log = str(tmp_path / "single.log")
    single = start(
        pretrain_cmd(overrides, "--output-dir", str(tmp_path / "single"), "--cpu-devices", "8"), env, single_log
    )
    assert finish(single, single_log) == 0, log_tail(single_log)  # also fills the data cache

    port = free_port()
    procs, logs = [], []
    for pid in range(2):
        logs.append(str(tmp_path / f"p{pid}.log"))
        cmd = pretrain_cmd(
            overrides,
            *("--output-dir", str(tmp_path / "multi"), "--cpu-devices", "4"),
            *("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)),
        )
        procs.append(start(cmd, env, logs[-1]))
    for p, log in zip(procs, logs):
        assert finish(p, log) == 0, log_tail(log)
    assert '"final_step": 10' in open(logs[0]).read()
    assert '"final_step"' not in open(logs[1]).read()  # summaries and metrics come from process 0 only

    ref = read_jsonl(os.path.join(tmp_path / "single", "metrics.jsonl"))
    got = read_jsonl(os.path.join(tmp_path / "multi", "metrics.jsonl"))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s]["loss"] for s in ref], [ref[s]["loss"] for s in ref], rtol=1e-5)
    ref_eval = read_jsonl(os.path.join(tmp_path / "single", "metrics.jsonl"), kind="eval")
    got_eval = read_jsonl(os.path.join(tmp_path / "multi", "metrics.jsonl"), kind="eval")
    assert sorted(got_eval) == sorted(ref_eval) == [5, 10]
    for s in ref_eval:
        np.testing.assert_allclose(got_eval[s]["eval_loss"], ref_eval[s]["eval_loss"], rtol=1e-5)
    # Both processes wrote their shards of the checkpoints, and each its own data-iterator state.
    data_dir = tmp_path / "multi" / "checkpoints" / "10" / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
