"""Fine-tuning with two ``jax.distributed`` processes (gloo on CPU, 4 devices each, one 8-device ``data`` mesh)
gives the metrics of one process on one device."""

from __future__ import annotations

import json
import os
import sys

import finetune_helpers as H
import numpy as np
import pytest
from train_helpers import cli_env, finish, free_port, log_tail, start

from flax_narrow.cli import main


def _files(tmp_path):
    tok = H.tokenizer()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 64), ("dev", 32)):
        paths[split] = str(tmp_path / f"{split}.jsonl")
        with open(paths[split], "w") as fh:
            for e in H.classification(rng, n):
                fh.write(json.dumps({"sentence": e["text_a"], "y": e["label"]}) + "\n")
    return str(tok_dir), paths


def _history(out):
    return [json.loads(x) for x in open(os.path.join(out, "history.jsonl"))]


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(tmp_path, jax_cache):
    tok, paths = _files(tmp_path)
    args = ["finetune", "--model", "tiny", "--tokenizer", tok, "--train", paths["train"], "--dev", paths["dev"]]
    args += ["--column", "text_a=sentence", "--column", "label=y", "--max-length", "16", "--lr", "3e-3"]
    args += ["--batch-size", "16", "--eval-batch-size", "16", "--epochs", "2", "--eval-every", "2", "--no-progress"]
    one = str(tmp_path / "one")
    assert main([*args, "--output-dir", one, "--set", "mesh.data=1"]) == 0
    port = free_port()
    env = cli_env(jax_cache)
    procs, logs = [], []
    two = str(tmp_path / "two")
    for pid in range(2):
        logs.append(str(tmp_path / f"p{pid}.log"))
        cmd = [sys.executable, "-m", "flax_narrow.cli", *args, "--output-dir", two, "--set", "mesh.data=8"]
        cmd += ["--cpu-devices", "4", "--coordinator-address", f"127.0.0.1:{port}"]
        cmd += ["--num-processes", "2", "--process-id", str(pid)]
        procs.append(start(cmd, env, logs[-1]))
    for p, log in zip(procs, logs):
        assert finish(p, log) == 0, log_tail(log)
    a, b = _history(one), _history(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["train_loss"], y["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(x["accuracy"], y["accuracy"], rtol=1e-5)
    assert '"best_accuracy"' in open(logs[0]).read() and '"best_accuracy"' not in open(logs[1]).read()
