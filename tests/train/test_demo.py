"""The pretraining demo (``make demo``) end to end, shrunk: both runs, the table, the throughput ratio, the
checkpoint, the HF export and its reload."""

import os

import pytest

from flax_narrow.demo import PRESETS, loss_table, run_demo


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, data_cache, capsys):
    overrides = [
        f"data.cache_dir={data_cache}",
        "data.max_documents=400",
        "data.tokenizer_vocab_size=1024",
        "data.eval_fraction=0.1",
        "data.seq_len=64",
        "model.vocab_size=1024",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_hidden_layers=3",
        "train.eval_every=0",
        "train.max_predictions=10",
        "train.log_every=5",
        "mesh.data=1",
    ]
    figures = run_demo(str(tmp_path), steps=20, overrides=overrides)
    out = capsys.readouterr().out
    assert "NarrowBERT (F=2 full + 1 narrow layers)" in out and "pretraining BERT" in out
    assert "demo-narrowbert loss" in out and "demo-bert loss" in out
    assert "NarrowBERT/BERT = " in out and figures["throughput_ratio"] > 0
    assert figures["flops_ratio"] > 1.0  # the narrow layers do less work per step
    assert figures["export_reload_max_abs_diff"] == 0.0
    for name in PRESETS:
        assert os.path.isdir(tmp_path / name / "checkpoints" / "20")
    assert os.path.isfile(tmp_path / "narrowbert-hf" / "config.json")
    assert os.path.isfile(tmp_path / "narrowbert-hf" / "model.safetensors")
    assert os.path.isfile(tmp_path / "narrowbert-flax" / "tokenizer.json")


def test_loss_table_layout():
    class R:
        def __init__(self, base):
            self.history = [{"step": s, "loss": base + 1.0 / s, "accuracy": 0.1} for s in range(1, 21)]
            self.evals = [{"step": 20, "eval_loss": base, "eval_accuracy": 0.2}]

    lines = loss_table({"a": R(5.0), "b": R(6.0)}, every=10)
    assert lines[0].split() == ["step", "a", "loss", "acc", "b", "loss", "acc"]
    assert lines[2].split()[0] == "10" and lines[3].split()[0] == "20" and lines[4].split()[0] == "eval@20"
    mean_a = sum(5.0 + 1.0 / s for s in range(1, 11)) / 10
    assert float(lines[2].split()[1]) == pytest.approx(mean_a, abs=1e-3)
    assert lines[4].split()[1:] == ["5.000", "0.200", "6.000", "0.200"]
