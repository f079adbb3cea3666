"""End-to-end pretraining in-process: a real corpus (loss falls, accuracy rises, metrics files), distillation
from a frozen teacher, initial weights from a checkpoint, and the non-finite guard."""

import glob
import math
import os
import struct

import numpy as np
import pytest
from train_helpers import small_overrides

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling import BertForMaskedLM
from flax_narrow.train import flops as F
from flax_narrow.train.config import load_config
from flax_narrow.train.loop import NonFiniteError, pretrain
from flax_narrow.train.metrics import read_jsonl


def _cfg(data_cache, **extra):
    return load_config("tiny", None, small_overrides(data_cache, **extra))


def read_event_scalars(directory):
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
def test_real_corpus_loss_falls_accuracy_rises_and_metrics_are_written(tmp_path, data_cache):
    steps = 150
    cfg = _cfg(
        data_cache,
        **{
            "train.steps": steps,
            "train.learning_rate": 3e-3,
            "train.warmup_ratio": 0.05,
            "train.eval_every": 50,
            "data.eval_fraction": 0.1,
            "train.peak_tflops": 1.0,
            "output_dir": str(tmp_path / "run"),
        },
    )
    r = pretrain(cfg)
    loss = np.array([h["loss"] for h in r.history])
    acc = np.array([h["accuracy"] for h in r.history])
    vocab = len(r.tokenizer)
    assert abs(loss[0] - math.log(cfg.model.vocab_size)) < 0.3  # starts near uniform over the vocabulary
    assert loss[-20:].mean() < loss[0] - 1.2, loss[::10]
    assert acc[:3].mean() < 0.02 and acc[-20:].mean() > 0.04, acc[::10]
    ev = [e["eval_loss"] for e in r.evals]
    assert [e["step"] for e in r.evals] == [50, 100, 150] and ev[0] > ev[1] > ev[2]
    assert r.evals[-1]["eval_accuracy"] > r.evals[0]["eval_accuracy"]
    assert vocab <= cfg.model.vocab_size and r.final_step == steps

    # JSON lines: one record per step plus the evaluations; throughput and MFU (peak given) at log points.
    recs = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert sorted(recs) == list(range(1, steps + 1))
    assert [recs[s]["loss"] for s in range(1, steps + 1)] == pytest.approx(loss.tolist())
    last = recs[steps]
    assert last["tokens_per_s"] == pytest.approx(last["steps_per_s"] * 16 * 64)
    expected_flops = F.train_step_flops(cfg.model, batch=16, seq_len=64, predictions=cfg.train.max_predictions)
    assert r.flops_per_step == expected_flops
    assert last["mfu"] == pytest.approx(expected_flops * last["steps_per_s"] / 1e12)
    assert 0 < last["learning_rate"] < 3e-3 and last["grad_norm"] > 0 and last["predictions"] > 0
    # TensorBoard event files hold the same scalars.
    tb = read_event_scalars(str(tmp_path / "run" / "tensorboard"))
    assert [s for s, _ in tb["train/loss"]] == list(range(1, steps + 1))
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], loss, rtol=1e-6)
    assert [s for s, _ in tb["eval/eval_loss"]] == [50, 100, 150]
    # The trained model comes back as a module, and its forward runs.
    model = r.model()
    ids = np.asarray([[2, 10, 11, 4, 12, 3]])
    assert model(ids, narrow_positions=np.asarray([[3]]), narrow_valid=np.ones((1, 1), bool)).logits.shape == (
        1,
        1,
        cfg.model.vocab_size,
    )


@pytest.mark.slow
def test_distillation_from_a_frozen_teacher(tmp_path, data_cache):
    # The teacher is a converted-style checkpoint on disk; the student starts from the same weights, so with
    # dropout off the distillation term is exactly zero at step 1 (same inputs, same rows) and grows after.
    shape = dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    teacher_cfg = EncoderConfig(**shape, max_position_embeddings=128, hidden_dropout_prob=0.0)
    teacher_dir = BertForMaskedLM.from_config(teacher_cfg, seed=7).save_pretrained(str(tmp_path / "teacher"))
    cfg = _cfg(
        data_cache,
        **{
            "model.full_length_layers": "none",
            "model.model_type": "bert",
            "model.hidden_dropout_prob": 0.0,
            "model.attention_probs_dropout_prob": 0.0,
            "kd.teacher": teacher_dir,
            "kd.mlm_weight": 0.1,
            "kd.kd_weight": 0.5,
            "kd.temperature": 2.0,
            "checkpoint.init_from": teacher_dir,
            "train.steps": 6,
            "train.learning_rate": 1e-2,
            "train.warmup_steps": 0,
        },
    )
    r = pretrain(cfg)
    kd = np.array([h["kd_loss"] for h in r.history])
    mlm = np.array([h["mlm_loss"] for h in r.history])
    assert abs(kd[0]) < 1e-6 and np.all(kd[2:] > 1e-4)
    np.testing.assert_allclose([h["loss"] for h in r.history], 0.1 * mlm + 0.5 * kd, rtol=1e-5)
    # The student started from the teacher: its first MLM loss is the teacher's, far below a random init's.
    assert mlm[0] < math.log(1024) + 0.5

    with pytest.raises(ConfigError, match="vocab_size 1024, the student 2048"):
        pretrain(cfg.replace(model=cfg.model.replace(vocab_size=2048), checkpoint=cfg.checkpoint.__class__()))
    with pytest.raises(ConfigError, match="does not match the model config: hidden_size: checkpoint 32 vs config 64"):
        pretrain(cfg.replace(model=cfg.model.replace(hidden_size=64), kd=cfg.kd.__class__()))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_diagnostic(data_cache):
    # A one-layer BERT (compiles fast); a learning rate of 1e30 overflows the parameters after one update.
    tiny = {"model.num_hidden_layers": 1, "model.full_length_layers": "none", "model.model_type": "bert"}
    tiny.update({"model.hidden_size": 16, "model.num_attention_heads": 2, "model.intermediate_size": 16})
    cfg = _cfg(data_cache, **tiny, **{"train.steps": 8, "train.learning_rate": 1e30, "train.clip_norm": "none"})
    with pytest.raises(NonFiniteError) as e:
        pretrain(cfg)
    msg = str(e.value)
    assert "non-finite training at step" in msg and "the update was not applied" in msg
    assert "['bert']" in msg and "train.on_nonfinite=skip" in msg
