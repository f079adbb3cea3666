"""Agora mechanics with tiny real (untrained-MLM / tiny-classifier) models: pruning, expansion with labelled
points, held-out selection, resume."""

from __future__ import annotations

import json
import os

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.train.agora import (
    AgoraConfig,
    CallableLabeller,
    ClassifierLabeller,
    KeepBetterHalf,
    MLMInfill,
    NotesPrefixRule,
    run_agora,
    split_dev,
)
from flax_narrow.train.candidates import Candidate, bort_grid
from flax_narrow.train.finetune import FinetuneConfig, build_model
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task


def test_pruning_rules():
    ranked = [(Candidate(seed=i), 1.0 - i / 10) for i in range(5)]
    assert [c.seed for c in KeepBetterHalf()(ranked)] == [0, 1, 2]
    assert KeepBetterHalf()(ranked[:1]) == []
    grid = [(Candidate(lr, wd, seed=s), 0.0) for lr in (1e-4, 1e-5) for wd in (0.0, 10.0) for s in (0, 1)]
    kept = NotesPrefixRule()(grid)  # worst: (1e-5, 10, seed 1) shares (1e-5, 10) with seed 0: both go
    assert [(c.learning_rate, c.weight_decay) for c in kept] == [(1e-4, 0.0)] * 2 + [(1e-4, 10.0)] * 2 + [
        (1e-5, 0.0)
    ] * 2
    assert len(bort_grid()) == 480 and len(set(bort_grid())) == 480


def test_split_dev_is_disjoint_and_fixed():
    dev = [{"text_a": str(i), "label": "a"} for i in range(10)]
    probe, held = split_dev(dev, 0.5, 3)
    assert len(probe) == len(held) == 5 and not {e["text_a"] for e in probe} & {e["text_a"] for e in held}
    assert split_dev(dev, 0.5, 3) == (probe, held)


def test_mlm_infill_changes_tokens_and_keeps_fields():
    tok = H.tokenizer()
    mlm = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    g = MLMInfill(mlm, tok, mask_prob=0.5, max_length=16, allow_untrained=True)  # a fresh head, on purpose
    ex = {"text_a": "w1 w2 w3 w4 w5 w6", "text_b": "w7 w8", "label": "pos"}
    out = g(ex, 3, np.random.default_rng(0))
    assert len(out) == 3 and all("label" not in o for o in out)
    assert all(o["text_a"] != ex["text_a"] for o in out)
    assert all(len(o["text_a"].split()) >= 1 and o["text_b"] for o in out)


def test_classifier_labeller_compiles_once_across_rounds():
    import jax

    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    model = build_model(task, EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    labeller = ClassifierLabeller(model, task, Encoder(tok, max_length=16), batch_size=8)
    examples = [{k: v for k, v in e.items() if k != "label"} for e in H.classification(np.random.default_rng(0), 12)]
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = labeller(examples[:5])
        assert compiles, "no compilation seen at all: the count below would prove nothing"
        n = len(compiles)
        second = labeller(examples[5:])  # another round, another count of examples: same padded batch shape
        assert len(compiles) == n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(first) == 5 and len(second) == 7 and set(first + second) <= {"neg", "pos"}


@pytest.mark.slow
def test_agora_rounds_expand_prune_select_and_resume(tmp_path):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    train, dev = H.classification(rng, 64), H.classification(rng, 64)
    task = Task("classification", ("neg", "pos"))
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    mlm = BertForMaskedLM.from_config(mcfg, seed=1)
    theta = [Candidate(3e-3, 0.01, 0.1, 16, 0, 2), Candidate(1e-4, 0.01, 0.1, 16, 1, 2)]
    labeller = CallableLabeller(lambda e: "pos" if "good" in e["text_a"].split() else "neg")
    cfg = AgoraConfig(str(tmp_path), max_rounds=1, seed=0, finetune=FinetuneConfig(eval_batch_size=32))

    def factory(seed):
        return build_model(task, mcfg, seed=seed)

    args = (task, enc, train, dev, theta, factory, MLMInfill(mlm, tok, max_length=16, allow_untrained=True), labeller)
    first = run_agora(*args, cfg)
    assert len(first.rounds) == 1 and len(first.rounds[0]["theta_left"]) == 1  # better half kept
    s0 = first.rounds[0]
    assert s0["added"] == 2 * s0["mistakes"] and sum(s0["added_labels"].values()) == s0["added"]
    added = [json.loads(x) for x in open(tmp_path / "round_000" / "added.jsonl")]
    assert all(a["label"] == ("pos" if "good" in a["text_a"].split() else "neg") for a in added)
    mtime = os.path.getmtime(tmp_path / "round_000" / "state.json")
    # Resume: round 0 is not re-run; round 1 (the survivor, then Θ is empty) and one replay follow.
    import dataclasses

    second = run_agora(*args, dataclasses.replace(cfg, max_rounds=None, replay=1))
    assert os.path.getmtime(tmp_path / "round_000" / "state.json") == mtime
    rounds = second.rounds
    assert [s["round"] for s in rounds] == [0, 1, 2] and rounds[2]["replay"]
    assert len(rounds[1]["theta"]) == 1 and rounds[1]["theta"] == s0["theta_left"] and rounds[1]["pruned"]
    assert rounds[0]["pruned"] == [c.name for c in theta if c.name != s0["best"]]
    assert rounds[1]["train_size"] == 64 + s0["added"] + rounds[1]["added"]
    assert second.heldout == max(s["heldout"] for s in rounds) and second.round in (0, 1, 2)
    assert len(open(tmp_path / "log.jsonl").read().splitlines()) == 3
    assert "Final model" in open(tmp_path / "summary.md").read()


def _small_agora(tmp_path_name, **kw):
    import dataclasses

    from flax_narrow.train.augment import TokenDropout

    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    train, dev = H.classification(rng, 32), H.classification(rng, 32)
    task = Task("classification", ("neg", "pos"))
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    theta = [Candidate(3e-3, 0.01, 0.1, 16, 0, 1), Candidate(1e-3, 0.01, 0.1, 8, 1, 1)]  # 2 groups: 2 + 4 steps
    labeller = CallableLabeller(lambda e: "pos" if "good" in e["text_a"].split() else "neg")
    ft = FinetuneConfig(eval_batch_size=16, progress_bar=False)
    cfg = dataclasses.replace(AgoraConfig(tmp_path_name, max_rounds=1, seed=0, finetune=ft), **kw)

    def run(out):
        return run_agora(task, enc, train, dev, theta, lambda s: build_model(task, mcfg, seed=s), TokenDropout(),
                         labeller, dataclasses.replace(cfg, out_dir=str(out)))  # fmt: skip

    return run


def _interrupt_after(monkeypatch, k):
    """A real SIGINT while the k-th optimizer step's batch is built (counted over the whole round)."""
    import signal

    from flax_narrow.train import candidates as cand_lib

    real, calls = cand_lib.global_batch, []

    def batch_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(cand_lib, "global_batch", batch_then_interrupt)
    return calls


def _round_files(out):
    state = json.load(open(out / "round_000" / "state.json"))
    state.pop("time_s")
    summary = [line.rsplit("|", 2)[0] for line in open(out / "summary.md").read().splitlines()]  # drop time s
    best = open(out / "round_000" / "best" / "flax_model.safetensors", "rb").read()
    return state, summary, best, open(out / "round_000" / "added.jsonl").read()


@pytest.mark.parametrize("side_by_side", [True, False])
def test_agora_interrupted_mid_group_continues_at_that_step_bit_exactly(tmp_path, monkeypatch, side_by_side):
    import signal

    from flax_narrow.train import checkpoint as ckpt

    run = _small_agora(str(tmp_path), side_by_side=side_by_side)
    full = run(tmp_path / "full")
    calls = _interrupt_after(monkeypatch, 4)  # group 1 (bs 16) done in 2 steps; stop after step 2 of group 2
    part = run(tmp_path / "part")
    assert part.preempted and part.stop_signal == signal.SIGINT and part.rounds == [] and len(calls) == 4
    # Nothing looks finished; the checkpoint holds the round's progress.
    assert not (tmp_path / "part" / "summary.md").exists() and not (tmp_path / "part" / "log.jsonl").exists()
    assert not (tmp_path / "part" / "round_000" / "state.json").exists()
    ck_dir = tmp_path / "part" / "round_000" / "checkpoint"
    meta = ckpt.Checkpointer(str(ck_dir), keep=1).read_meta(4)
    assert (meta["unit"], meta["step"]) == (1, 2)
    again = run(tmp_path / "part")
    assert len(calls) == 4 + 2  # only the 2 remaining steps were trained
    assert not again.preempted and [s["round"] for s in again.rounds] == [0]
    assert _round_files(tmp_path / "part") == _round_files(tmp_path / "full")
    assert not ck_dir.exists()  # removed once the round finished
    for x, y in zip(H_params(full.model), H_params(again.model)):
        np.testing.assert_array_equal(x, y)


def H_params(model):
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_agora_interrupted_between_groups_and_after_training(tmp_path, monkeypatch):
    """A stop at a group boundary saves the finished groups; the rerun trains only the rest."""
    run = _small_agora(str(tmp_path))
    full = run(tmp_path / "full")
    calls = _interrupt_after(monkeypatch, 2)  # the last step of group 1
    assert run(tmp_path / "part").preempted
    again = run(tmp_path / "part")
    assert len(calls) == 2 + 4 and not again.preempted
    assert _round_files(tmp_path / "part") == _round_files(tmp_path / "full")
    calls = _interrupt_after(monkeypatch, 6)  # the last step of the round: every group is saved
    assert run(tmp_path / "last").preempted and not (tmp_path / "last" / "round_000" / "state.json").exists()
    again = run(tmp_path / "last")
    assert len(calls) == 6 and not again.preempted  # nothing retrained
    assert _round_files(tmp_path / "last") == _round_files(tmp_path / "full")
    for x, y in zip(H_params(full.model), H_params(again.model)):
        np.testing.assert_array_equal(x, y)


def test_agora_cli_stops_with_its_message_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    import argparse

    from flax_narrow.train import finetune_cli

    tok = H.tokenizer()
    os.makedirs(tmp_path / "tok")
    with open(tmp_path / "tok" / "vocab.txt", "w") as fh:
        fh.write("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rng = np.random.default_rng(0)
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in H.classification(rng, 32))
    with open(tmp_path / "theta.json", "w") as fh:
        json.dump([{"learning_rate": 3e-3, "batch_size": 16, "seed": 0, "epochs": 1},
                   {"learning_rate": 1e-3, "batch_size": 8, "seed": 1, "epochs": 1}], fh)  # fmt: skip
    parser = argparse.ArgumentParser()
    finetune_cli.register(parser.add_subparsers(dest="command"))

    def cli(out, *extra):
        argv = ["agora", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--max-length", "16",
                "--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"),
                "--theta", str(tmp_path / "theta.json"), "--g", "dropout", "--rounds", "1", "--eval-batch-size", "16",
                "--no-progress", "--output-dir", str(tmp_path / out), *extra]  # fmt: skip
        args = parser.parse_args(argv)
        return args.func(args)

    from flax_narrow.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"candidate \S+_bs16\S*: batch_size 16 is not divisible by the mesh's data x fsdp = 3"
    ):
        cli("refused", "--set", "mesh.data=3")  # the mesh section reaches Agora
    assert not (tmp_path / "refused").exists()
    assert cli("full") == 0
    capsys.readouterr()
    calls = _interrupt_after(monkeypatch, 3)
    assert cli("part") == 130
    assert "flax-narrow agora: stopped in round 0; run again to resume" in capsys.readouterr().err
    assert cli("part", "--resume") == 0 and len(calls) == 6
    assert _round_files(tmp_path / "part") == _round_files(tmp_path / "full")


def test_agora_round_progress_counts_optimizer_steps_with_the_loss(tmp_path, monkeypatch):
    from flax_narrow.train import agora_train

    bars = []

    class Bar:
        def __init__(self, total, initial, enabled, desc):
            self.total, self.n, self.enabled, self.desc, self.postfix = total, initial, enabled, desc, None

        def set_postfix(self, post, refresh=True):
            self.postfix = post

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(agora_train, "progress_bar", lambda *a, **kw: bars.append(Bar(*a, **kw)) or bars[-1])
    _small_agora(str(tmp_path))(tmp_path / "run")  # progress_bar=False: the bar is asked for, disabled
    (bar,) = bars
    assert (bar.desc, bar.total, bar.n, bar.enabled) == ("agora round 0", 6, 6, False)  # 2 + 4 optimizer steps
    assert float(bar.postfix["loss"]) > 0
