"""Pretraining configs: presets, file + --set overrides with type coercion, validation errors, round trip."""

import json

import pytest

from flax_narrow.errors import ConfigError
from flax_narrow.train import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
    cfg = C.preset(name)
    assert cfg.preset == name
    again = C.config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_presets_follow_the_published_recipes():
    nb = C.preset("narrowbert-base")
    assert nb.model.full_length_layers == 2 and nb.model.num_hidden_layers == 12
    assert (nb.data.seq_len, nb.train.max_predictions, nb.train.global_batch_size) == (512, 80, 128)
    assert (nb.train.learning_rate, nb.train.warmup_ratio, nb.train.steps) == (5e-4, 0.02, 70_000)
    bert = C.preset("bert-base")
    assert not bert.model.is_narrow and bert.train == nb.train
    bort = C.preset("bort")
    assert (bort.model.hidden_size, bort.model.num_hidden_layers, bort.model.intermediate_size) == (1024, 4, 768)
    assert (bort.kd.mlm_weight, bort.kd.kd_weight, bort.kd.temperature) == (0.1, 0.5, 2.0)
    assert (bort.train.learning_rate, bort.train.eps, bort.train.warmup_ratio) == (1e-4, 1e-6, 0.01)
    assert bort.model.dtype == "bfloat16" and bort.model.param_dtype == "float32"
    assert C.preset("tiny").model.is_narrow and not C.preset("tiny-bert").model.is_narrow


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: demo-narrowbert\n"
        "train: {steps: 7, learning_rate: 3.0e-4, clip_norm: null}\n"
        "data: {files: [a.txt, b.txt], source: files}\n"
        "model: {hidden_size: 64}\n"
    )
    cfg = C.load_config(None, path, ["train.steps=9", "mesh.fsdp=2", "model.full_length_layers=1", "output_dir=/x"])
    assert cfg.preset == "demo-narrowbert"
    assert cfg.train.steps == 9 and cfg.train.learning_rate == 3e-4 and cfg.train.clip_norm is None
    assert cfg.data.files == ("a.txt", "b.txt") and cfg.model.hidden_size == 64
    assert cfg.mesh.fsdp == 2 and cfg.model.full_length_layers == 1 and cfg.output_dir == "/x"
    # JSON files and CLI-style values: "1e-4" is a float, "none" is None, lists are comma separated.
    jpath = tmp_path / "run.json"
    jpath.write_text(json.dumps({"train": {"learning_rate": "1e-4"}}))
    cfg = C.load_config("tiny", jpath, ["train.warmup_steps=none", "data.eval_files=x.txt,y.txt"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.warmup_steps is None
    assert cfg.data.eval_files == ("x.txt", "y.txt")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.stepz=3"], "train has no field(s) ['stepz']"),
        (["trian.steps=3"], "section in"),
        (["train.steps=three"], "train.steps: expected an integer, got 'three'"),
        (["train.steps=2.5"], "expected an integer"),
        (["train.progress_bar=maybe"], "expected true/false"),
        (["train.global_batch_size=10", "train.grad_accum_steps=4"], "not a multiple of grad_accum_steps"),
        (["train.max_predictions=63"], "must be <= seq_len - 2"),
        (["data.seq_len=512"], "exceeds the model's 128 usable positions"),
        (["kd.kd_weight=0.5"], "needs kd.teacher"),
        (["train.optimizer=sgd"], "not one of ('adamw', 'lamb')"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
        (["model.hidden_size=30"], "not a multiple of num_attention_heads"),
        (["checkpoint.resume=true"], "needs checkpoint.directory or output_dir"),
        (["steps=3"], "must be <section>.<field>"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        C.load_config("tiny", None, overrides)
    assert message in str(e.value)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        C.load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load_config(None, bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        C.load_config(None, tmp_path / "missing.json")
    listy = tmp_path / "list.json"
    listy.write_text("[1]")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        C.load_config(None, listy)


def test_derived_values():
    t = C.TrainConfig(steps=1000, global_batch_size=64, grad_accum_steps=4, warmup_ratio=0.05)
    assert t.micro_batch_size == 16 and t.num_warmup_steps == 50
    assert C.TrainConfig(steps=100, warmup_steps=7).num_warmup_steps == 7
    cfg = C.load_config("tiny", None, ["output_dir=/tmp/run"])
    assert cfg.checkpoint_dir == "/tmp/run/checkpoints"
    assert C.load_config("tiny").checkpoint_dir is None


def test_preset_names_take_hyphens_or_underscores_everywhere():
    """One spelling for every command: pretrain presets, GLUE presets; listings use hyphens."""
    assert C.canonical_name("tiny_bert", C.PRESETS) == C.canonical_name("Tiny-Bert", C.PRESETS) == "tiny-bert"
    assert C.canonical_name("SST-2", ["sst2", "stsb"]) == C.canonical_name("sst_2", ["sst2"]) == "sst2"
    assert C.canonical_name("tiny_bort", ["tiny_bort", "tiny"]) == "tiny_bort"
    assert C.canonical_name("nope", C.PRESETS) is None
    assert C.load_config("demo_narrowbert").preset == "demo-narrowbert"
    saved = C.preset("tiny-bert").to_dict()
    assert C.config_from_dict({**saved, "preset": "tiny_bert"}).train == C.preset("tiny-bert").train
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny_bortt'; choose one of \['bert-base', "):
        C.preset("tiny_bortt")


def test_pretrain_flags_then_set(tmp_path):
    """pretrain's order is finetune's: preset, file, the flags given, then --set (a --set wins over a flag)."""
    import argparse

    from flax_narrow.train import cli

    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="command"))
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 7, log_every: 3}\n")
    cfg = cli.resolve_config(p.parse_args(["pretrain", "--config", str(path), "--steps", "5"]))
    assert (cfg.train.steps, cfg.train.log_every) == (5, 3)  # the flag wins over the file
    cfg = cli.resolve_config(p.parse_args(["pretrain", "--steps", "5", "--set", "train.steps=9"]))
    assert cfg.train.steps == 9


def test_mappings_and_top_level_overrides():
    assert C.coerce("{text_a: s, label: y}", dict[str, str], "data.columns") == {"text_a": "s", "label": "y"}
    assert C.coerce("text_a=s, label=y", dict[str, str], "data.columns") == {"text_a": "s", "label": "y"}
    assert C.coerce({"n": "3"}, dict[str, int], "x") == {"n": 3}
    with pytest.raises(ConfigError, match=r"x: expected key=value items or a \{key: value\} mapping, got 'a'"):
        C.coerce("a", dict[str, str], "x")
    with pytest.raises(ConfigError, match=r"x.n: expected an integer, got 'many'"):
        C.coerce({"n": "many"}, dict[str, int], "x")
    got = C.parse_overrides(["a.b=1", "output_dir=/x"], ["a"], ["output_dir"])
    assert got == {"a": {"b": "1"}, "output_dir": "/x"}
    with pytest.raises(ConfigError, match=r"override key 'resume' must be <section>.<field>"):
        C.parse_overrides(["resume=true"], ["a"], ["output_dir"])
