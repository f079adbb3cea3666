"""``flax-narrow finetune`` / ``agora`` on local JSONL files with a column map (the parser built from the
module's own ``register``, so the test does not depend on other sub-commands), and their one config: every
section from a file and from ``--set``, every flag one field, the order file < flags < ``--set``, the run's
recorded config checked on resume, one spelling of preset names."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.train import finetune_cli
from flax_narrow.train.agora import AgoraConfig
from flax_narrow.train.finetune_config import AgoraSettings, config_from_dict, load_finetune_config


def _parser():
    p = argparse.ArgumentParser()
    finetune_cli.register(p.add_subparsers(dest="command"))
    return p


def _files(tmp_path):
    tok = H.tokenizer()
    tok_dir = tmp_path / "tok"
    os.makedirs(tok_dir)
    with open(tok_dir / "vocab.txt", "w") as fh:
        fh.write("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 128), ("dev", 48), ("test", 8)):
        paths[split] = str(tmp_path / f"{split}.jsonl")
        with open(paths[split], "w") as fh:
            for e in H.classification(rng, n):
                fh.write(json.dumps({"sentence": e["text_a"], "y": e["label"]}) + "\n")
    return str(tok_dir), paths


@pytest.mark.slow
def test_finetune_and_agora_cli(tmp_path, capsys):
    tok_dir, paths = _files(tmp_path)
    common = ["--model", "tiny", "--tokenizer", tok_dir, "--train", paths["train"], "--dev", paths["dev"]]
    common += ["--column", "text_a=sentence", "--column", "label=y", "--max-length", "16", "--lr", "3e-3"]
    common += ["--batch-size", "16", "--epochs", "10"]
    out = str(tmp_path / "ft")
    args = _parser().parse_args(["finetune", *common, "--test", paths["test"], "--output-dir", out])
    assert args.func(args) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best["best_accuracy"] >= 0.9
    preds = [json.loads(x)["prediction"] for x in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 8 and set(preds) <= {"neg", "pos"}
    mlm_dir = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=57), seed=0).save_pretrained(
        str(tmp_path / "mlm")
    )
    assert json.load(open(os.path.join(out, "finetune_config.json")))["config"]["finetune"]["learning_rate"] == 3e-3
    # Agora's settings from a config file take effect (and a flag given on the command line wins over it).
    conf = tmp_path / "agora.yaml"
    conf.write_text("agora: {max_rounds: 1, points_per_mistake: 3, replay: 5, allow_untrained_mlm: true}\n")
    ag = ["agora", *common, "--mlm", mlm_dir, "--labeller", os.path.join(out, "best"), "--config", str(conf)]
    ag += ["--epochs", "1", "--lr", "1e-4"]  # weak candidates: the probe part has mistakes to mine
    args = _parser().parse_args([*ag, "--replay", "0", "--output-dir", str(tmp_path / "agora")])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rounds"] == 1 and os.path.isfile(tmp_path / "agora" / "summary.md")
    state = json.load(open(tmp_path / "agora" / "round_000" / "state.json"))
    assert state["mistakes"] > 0 and state["added"] == 3 * state["mistakes"]  # points_per_mistake: 3
    recorded = json.load(open(tmp_path / "agora" / "finetune_config.json"))
    assert recorded["command"] == "agora" and recorded["config"]["agora"]["replay"] == 0


# ------------------------------------------------------------------------------------------------ the config
def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_every_section_is_settable_from_a_file_and_from_set(tmp_path):
    conf = _write(
        tmp_path / "run.yaml",
        "model: {name_or_path: tiny_bort, tokenizer: tok}\n"
        "data: {train: t.jsonl, columns: {text_a: sentence, label: y, choices: [c1, c2]}, max_length: 32}\n"
        "finetune: {learning_rate: 1.0e-3, patience: 2}\n"
        "mesh: {data: 2}\n"
        "output_dir: runs/a\n",
    )
    cfg = load_finetune_config(conf)
    assert (cfg.model.name_or_path, cfg.model.tokenizer) == ("tiny_bort", "tok")
    assert cfg.data.columns == {"text_a": "sentence", "label": "y", "choices": ("c1", "c2")}
    assert (cfg.data.train, cfg.data.max_length, cfg.finetune.learning_rate, cfg.finetune.patience) == (
        "t.jsonl", 32, 1e-3, 2,
    )  # fmt: skip
    assert cfg.mesh.data == 2 and cfg.output_dir == "runs/a" and cfg.agora is None
    sets = ["model.tokenizer=tok2", "data.max_length=64", "data.columns={text_a: s}", "finetune.epochs=2"]
    sets += ["mesh.fsdp=2", "output_dir=runs/b", "resume=true"]
    cfg = load_finetune_config(conf, sets)
    assert (cfg.model.name_or_path, cfg.model.tokenizer, cfg.data.max_length) == ("tiny_bort", "tok2", 64)
    assert cfg.data.columns == {"text_a": "s"}  # --set replaces the field
    assert (cfg.finetune.epochs, cfg.finetune.learning_rate, cfg.mesh.data, cfg.mesh.fsdp) == (2.0, 1e-3, 2, 2)
    assert (cfg.output_dir, cfg.resume) == ("runs/b", True)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the record reads back
    aconf = _write(tmp_path / "agora.yaml", "agora: {max_rounds: 3, points_per_mistake: 4, g: dropout}\n")
    cfg = load_finetune_config(aconf, command="agora")
    assert (cfg.agora.max_rounds, cfg.agora.points_per_mistake, cfg.agora.g) == (3, 4, "dropout")
    cfg = load_finetune_config(aconf, ["agora.max_rounds=1", "agora.side_by_side=false"], command="agora")
    assert (cfg.agora.max_rounds, cfg.agora.side_by_side, cfg.agora.points_per_mistake) == (1, False, 4)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_typo_in_any_section_lists_its_fields(tmp_path):
    for section, field in (("model", "name_or_path"), ("data", "max_length"), ("finetune", "learning_rate"),
                           ("mesh", "fsdp"), ("agora", "max_rounds")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"--set: {section} has no field\(s\) \['bogus'\]; fields are .*{field}"):
            load_finetune_config(None, [f"{section}.bogus=1"], command="agora")
        conf = _write(tmp_path / f"{section}.json", json.dumps({section: {"bogus": 1}}))
        with pytest.raises(ConfigError, match=rf"{section}.json: {section} has no field\(s\) \['bogus'\]"):
            load_finetune_config(conf, command="agora")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['agora'\]"):
        load_finetune_config(_write(tmp_path / "a.json", '{"agora": {}}'), command="finetune")


# flag -> (its value on the command line, the field it sets, the value the field gets)
FLAG_CASES = [
    ("--model", "tiny-bort", "model.name_or_path", "tiny-bort"),
    ("--tokenizer", "tok", "model.tokenizer", "tok"),
    ("--task", "regression", "data.task", "regression"),
    ("--glue", "RTE", "data.glue", "rte"),
    ("--train", "t.csv", "data.train", "t.csv"),
    ("--dev", "d.csv", "data.dev", "d.csv"),
    ("--dataset-config", "c", "data.dataset_config", "c"),
    ("--train-split", "tr", "data.train_split", "tr"),
    ("--dev-split", "dv", "data.dev_split", "dv"),
    ("--test-split", "ts", "data.test_split", "ts"),
    ("--column", "choices=a,b", "data.columns", {"choices": ("a", "b")}),
    ("--max-length", "32", "data.max_length", 32),
    ("--pair-format", "double_sep", "data.pair_format", "double_sep"),
    ("--metric", "f1", "data.metric", "f1"),
    ("--positive-label", "pos", "data.positive_label", "pos"),
    ("--holdout-fraction", "0.2", "data.holdout_fraction", 0.2),
    ("--lr", "0.001", "finetune.learning_rate", 1e-3),
    ("--weight-decay", "0.1", "finetune.weight_decay", 0.1),
    ("--warmup-ratio", "0.4", "finetune.warmup_ratio", 0.4),
    ("--epochs", "5", "finetune.epochs", 5.0),
    ("--batch-size", "8", "finetune.batch_size", 8),
    ("--eval-batch-size", "8", "finetune.eval_batch_size", 8),
    ("--eval-every", "7", "finetune.eval_every", 7),
    ("--patience", "3", "finetune.patience", 3),
    ("--seed", "4", "finetune.seed", 4),
    ("--head", "bort", "finetune.head", "bort"),
    ("--no-progress", None, "finetune.progress_bar", False),
    ("--output-dir", "runs/x", "output_dir", "runs/x"),
    ("--resume", None, "resume", True),
    ("--theta", "bort", "agora.theta", "bort"),
    ("--g", "swap", "agora.g", "swap"),
    ("--mlm", "m", "agora.mlm", "m"),
    ("--allow-untrained-mlm", None, "agora.allow_untrained_mlm", True),
    ("--labeller", "s", "agora.labeller", "s"),
    ("--rounds", "2", "agora.max_rounds", 2),
    ("--replay", "1", "agora.replay", 1),
    ("--probe-fraction", "0.3", "agora.probe_fraction", 0.3),
    ("--points-per-mistake", "5", "agora.points_per_mistake", 5),
    ("--prune", "notes", "agora.prune", "notes"),
    ("--sequential", None, "agora.side_by_side", False),
]


def _field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_flag_sets_its_one_field():
    argv = ["agora"]
    for flag, value, _, _ in FLAG_CASES:
        argv += [flag] if value is None else [flag, value]
    cfg = finetune_cli.config_from_args(_parser().parse_args(argv))
    got = {dotted: _field(cfg, dotted) for _, _, dotted, _ in FLAG_CASES}
    assert got == {dotted: want for _, _, dotted, want in FLAG_CASES}
    assert {d for _, _, d, _ in FLAG_CASES} | {"data.test"} >= {
        f if s is None else f"{s}.{f}" for s, f, _ in finetune_cli.FLAGS.values()
    }
    defaults = finetune_cli.config_from_args(_parser().parse_args(["agora"]))
    assert defaults == load_finetune_config(command="agora")  # a flag left out leaves the default
    test = finetune_cli.config_from_args(_parser().parse_args(["finetune", "--test", "x.csv"]))
    assert test.data.test == "x.csv" and test.agora is None


def test_the_file_then_the_flags_given_then_set(tmp_path):
    """A flag typed on the command line wins over the config file (on main the file won); --set comes last; a
    flag left out leaves the file's value."""
    conf = _write(tmp_path / "ft.yaml", "finetune: {learning_rate: 1.0e-3, batch_size: 8, patience: 4}\n")
    p = _parser()
    base = ["finetune", "--model", "tiny", "--output-dir", "o", "--config", conf]
    cfg, _ = finetune_cli.resolve_configs(p.parse_args([*base, "--lr", "5e-4"]))
    assert (cfg.learning_rate, cfg.batch_size, cfg.patience) == (5e-4, 8, 4)
    cfg, _ = finetune_cli.resolve_configs(p.parse_args([*base, "--lr", "5e-4", "--set", "finetune.learning_rate=2e-4"]))
    assert cfg.learning_rate == 2e-4
    conf2 = _write(tmp_path / "cols.yaml", "data: {columns: {text_a: sentence, label: y}}\n")
    run = finetune_cli.config_from_args(p.parse_args([*base[:-1], conf2, "--column", "label=z"]))
    assert run.data.columns == {"text_a": "sentence", "label": "z"}  # --column adds to the file's columns


def test_agora_settings_become_the_agora_config(tmp_path):
    conf = _write(tmp_path / "a.yaml", "agora: {max_rounds: 1, points_per_mistake: 3, max_mistakes: 5}\n")
    args = _parser().parse_args(["agora", "--config", conf, "--sequential", "--seed", "7", "--output-dir", "o"])
    a = finetune_cli.config_from_args(args).agora_config()
    assert isinstance(a, AgoraConfig)
    assert (a.max_rounds, a.points_per_mistake, a.max_mistakes, a.side_by_side, a.seed, a.out_dir) == (
        1, 3, 5, False, 7, "o",
    )  # fmt: skip
    assert a.finetune.seed == 7


def test_the_agora_section_has_every_field_of_agora_config():
    """By name: a field added to AgoraConfig is settable in the agora section (with its default)."""
    settings = {f.name: f for f in dataclasses.fields(AgoraSettings)}
    hints = typing.get_type_hints(AgoraConfig)
    for f in dataclasses.fields(AgoraConfig):
        if f.name in ("out_dir", "seed") or dataclasses.is_dataclass(hints[f.name]):  # filled by the run
            continue
        assert f.name in settings and settings[f.name].default == f.default, f.name


def test_print_config_and_preset_spellings(tmp_path, capsys):
    """--glue SST-2 / sst_2 is sst2, a model preset takes hyphens or underscores, and --print-config shows it."""
    from flax_narrow.cli import main

    out = tmp_path / "never"
    for glue in ("SST-2", "sst_2", "sst2"):
        assert (
            main(["finetune", "--model", "tiny_bort", "--glue", glue, "--output-dir", str(out), "--print-config"]) == 0
        )
        printed = json.loads(capsys.readouterr().out)
        assert printed["data"]["glue"] == "sst2" and printed["model"]["name_or_path"] == "tiny_bort"
    assert not out.exists()
    tok = H.tokenizer()
    configs = [finetune_cli.model_source(name, tok)[1] for name in ("tiny_bort", "tiny-bort", "Tiny-Bort")]
    assert configs[0] == configs[1] == configs[2] == EncoderConfig.tiny_bort(vocab_size=len(tok), pad_token_id=0)
    assert "tiny-bort" in finetune_cli.model_presets() and "tiny_bort" not in finetune_cli.model_presets()


def test_prepare_takes_a_config_or_the_former_namespace(tmp_path):
    tok_dir, paths = _files(tmp_path)
    argv = ["finetune", "--model", "tiny", "--tokenizer", tok_dir, "--train", paths["train"], "--dev", paths["dev"]]
    argv += ["--column", "text_a=sentence", "--column", "label=y", "--max-length", "16", "--output-dir", "o"]
    args = _parser().parse_args(argv)
    from flax_narrow.train.finetune_run import prepare

    a, b = prepare(finetune_cli.config_from_args(args)), finetune_cli.prepare(args)
    assert a.task.label_names == b.task.label_names == ("neg", "pos")
    assert a.train == b.train and a.dev == b.dev and len(a.train) == 128


def test_resume_refuses_a_changed_shape_in_one_line(tmp_path, capsys):
    """The run directory's finetune_config.json (what a run writes; test_finetune_and_agora_cli checks a real
    run writes it) against the resumed command line: a shape-relevant change is refused before any work."""
    from flax_narrow.cli import main
    from flax_narrow.train.finetune_config import check_resume, run_record, write_record

    tok_dir, paths = _files(tmp_path)
    out = str(tmp_path / "ft")
    argv = ["finetune", "--model", "tiny", "--tokenizer", tok_dir, "--train", paths["train"], "--dev", paths["dev"]]
    argv += ["--column", "text_a=sentence", "--column", "label=y", "--batch-size", "64", "--output-dir", out]
    cfg = finetune_cli.config_from_args(_parser().parse_args([*argv, "--max-length", "16"]))
    prep = finetune_cli.prepare(cfg)
    record = json.loads(json.dumps(run_record(cfg, prep.model_config, prep.task.label_names)))
    assert record["labels"] == ["neg", "pos"] and record["model"]["hidden_size"] == prep.model_config.hidden_size
    record_path = write_record(out, record)
    os.makedirs(os.path.join(out, "checkpoints", "2"))  # the run has a checkpoint
    assert main([*argv, "--max-length", "32", "--resume"]) == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if "error" in x] == [
        f"flax-narrow finetune: error: {out}: cannot resume, the run changed: data.max_length: run 16 vs now 32"
    ] and "Traceback" not in err
    assert main([*argv, "--max-length", "16", "--batch-size", "32", "--resume"]) == 2
    assert "cannot resume, the run changed: finetune.batch_size: run 64 vs now 32" in capsys.readouterr().err
    assert main([*argv, "--max-length", "16", "--model", "tiny_bort", "--resume"]) == 2
    assert "the run changed: model hidden_size: run" in capsys.readouterr().err
    assert json.load(open(record_path)) == record  # nothing rewritten
    assert sorted(os.listdir(out)) == ["checkpoints", "finetune_config.json"]
    check_resume(record, record, out)  # the same run resumes
