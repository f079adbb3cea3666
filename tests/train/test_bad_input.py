"""Bad input to ``pretrain``, ``finetune`` and ``agora``: one line naming the problem on stderr, exit code 2, no
traceback and nothing written under the output directory. Every case here is listed in docs/errors.md."""

from __future__ import annotations

import json
import os
import re

import finetune_helpers as H
import pytest

from flax_narrow.cli import main

# (id, command, argv with {d} for the fixture directory, regex of the message after "error: ")
FINETUNE = [
    ("missing-train", ["--train", "{d}/missing.jsonl"], r"{d}/missing.jsonl: no such file$"),
    ("empty-file", ["--train", "{d}/empty.csv"], r"{d}/empty.csv: the file is empty$"),
    ("header-only", ["--train", "{d}/header.csv"], r"{d}/header.csv: no rows \(only a header\?\)$"),
    ("epochs-0", ["--epochs", "0"], r"epochs must be > 0, got 0.0$"),
    ("negative-lr", ["--lr", "-0.001"], r"learning rate must be > 0, got -0.001$"),
    ("max-length-over", ["--max-length", "4096"], r"--max-length 4096 exceeds the model's 64 positions \(tiny\)$"),
    ("max-length-tiny", ["--max-length", "4"], r"data.max_length \(--max-length\): must be >= 8, got 4$"),
    ("nan-label", ["--train", "{d}/nan.csv"], r"{d}/nan.csv: row 2: empty or NaN label in column 'y'$"),
    ("empty-label", ["--train", "{d}/blank.jsonl"], r"{d}/blank.jsonl: row 3: empty or NaN label in column 'y'$"),
    (
        "column-typo",
        ["--column", "text_a=sentense"],
        r"{d}/train.jsonl: column 'sentense' \(for text_a\) not found; columns: sentence, y$",
    ),
    ("field-typo", ["--column", "labl=y"], r"--column labl=\.\.\.: 'labl' is not a field of task 'classification'"),
    ("column-no-equals", ["--column", "text_a"], r"--column 'text_a': expected FIELD=COLUMN"),
    ("unknown-glue", ["--glue", "mrcp"], r"unknown preset 'mrcp'; choose one of boolq, cb, cola, mnli, mrpc"),
    (
        "unknown-model-preset",
        ["--model", "tinyy"],
        r"--model 'tinyy': not a directory, and not a preset; presets: bert-base, bert-large, bort, .*, tiny-bort,",
    ),
    ("missing-model", ["--model", "{d}/nope"], r"{d}/nope: no such file or directory$"),
    ("not-a-checkpoint", ["--model", "{d}/tok"], r"{d}/tok: no config.json"),
    ("missing-tokenizer", ["--tokenizer", "{d}/nope"], r"{d}/nope: no such directory$"),
    ("batch-size-0", ["--batch-size", "0"], r"batch_size must be >= 1, got 0$"),
    ("negative-weight-decay", ["--weight-decay", "-1"], r"weight decay must be >= 0, got -1.0$"),
    ("warmup-ratio", ["--warmup-ratio", "2"], r"warmup_ratio must be in \[0, 1\], got 2.0$"),
    ("eval-every", ["--eval-every", "-1"], r"eval_every must be >= 0 \(0: every epoch\), got -1$"),
    ("patience", ["--patience", "-2"], r"patience must be >= 0 \(0: off\), got -2$"),
    (
        "positive-label",
        ["--positive-label", "maybe"],
        r"positive label 'maybe' is not one of the labels \['neg', 'pos'\]$",
    ),
    ("dev-label-unseen", ["--dev", "{d}/dev_other.jsonl"], r"dev labels \['meh'\] never occur in the training data"),
    ("unsupported-type", ["--train", "{d}/train.txt"], r"{d}/train.txt: unsupported file type '.txt'"),
    (
        "holdout-fraction",
        ["--holdout-fraction", "1.5"],
        r"data.holdout_fraction \(--holdout-fraction\): must be in \(0, 1\), got 1.5$",
    ),
    ("output-is-file", ["--output-dir", "{d}/train.jsonl"], r"--output-dir {d}/train.jsonl: is a file$"),
    ("finished-output", ["--output-dir", "{d}/finished"], r"--output-dir {d}/finished holds a finished run"),
    (
        "finetune-set-typo",
        ["--set", "finetune.lerning_rate=1e-4"],
        r"--set: finetune has no field\(s\) \['lerning_rate'\]; fields are \['b1', 'b2', ",
    ),
    (
        "finetune-set-section",
        ["--set", "train.steps=8"],
        r"override key 'train.steps' must be <section>.<field> with section in \['data', 'finetune', 'mesh', "
        r"'model'\]$",
    ),
    *[
        (
            f"finetune-set-{section}-typo",
            ["--set", f"{section}.bogus=1"],
            rf"--set: {section} has no field\(s\) "
            rf"\['bogus'\]; fields are \[{first!r}, ",
        )  # fmt: skip
        for section, first in (("model", "name_or_path"), ("data", "columns"), ("mesh", "data"))
    ],
    *[
        (
            f"finetune-config-{section}-typo",
            ["--config", f"{{d}}/typo_{section}.yaml"],
            rf"{{d}}/typo_{section}.yaml: {section} has no field\(s\) \['bogus'\]; fields are \[{first!r}, ",
        )  # fmt: skip
        for section, first in (("model", "name_or_path"), ("data", "columns"), ("finetune", "b1"), ("mesh", "data"))
    ],
    (
        "finetune-agora-section",
        ["--set", "agora.max_rounds=2"],
        r"override key 'agora.max_rounds' must be <section>.<field> with section in \['data', 'finetune', 'mesh', "
        r"'model'\]$",
    ),
    (
        "finetune-config-value",
        ["--config", "{d}/pair_format.yaml"],
        r"data.pair_format \(--pair-format\): 'triple' is not one of \('single_sep', 'double_sep'\)$",
    ),
    ("finetune-config-type", ["--set", "finetune.epochs=many"], r"finetune.epochs: expected a number, got 'many'$"),
    (
        "finetune-set-columns",
        ["--set", "data.columns=text_a"],
        r"data.columns: expected key=value items or a \{key: value\} mapping, got 'text_a'$",
    ),
    (
        "no-model",
        ["--model", None],
        r"give --model \(model.name_or_path\): a checkpoint directory, a hub id or a preset$",
    ),
    ("no-output-dir", ["--output-dir", None], r"give --output-dir \(output_dir\)$"),
    ("no-train", ["--train", None], r"give --train \(a file or hub name\) or --glue"),
    ("finetune-config-section", ["--config", "{d}/ft.json"], r"{d}/ft.json: unknown section\(s\) \['train'\]"),
    (
        "mesh-batch",
        ["--set", "mesh.data=3"],
        r"batch_size 16 is not divisible by the mesh's data x fsdp = 3 batch shards$",
    ),
]
AGORA = [
    ("agora-test", ["--test", "{d}/train.jsonl"], r"agora does not score a test set; drop --test"),
    ("mlm-without-head", ["--mlm", "{d}/classifier"], r"{d}/classifier: cannot load into BertForMaskedLM: "),
    (
        "labeller-labels",
        ["--labeller", "{d}/other_labels"],
        r"the labeller's labels \['yes', 'no'\] are not the task's \['neg', 'pos'\]",
    ),
    ("labeller-without-head", ["--labeller", "{d}/mlm"], r"{d}/mlm: cannot load into BertForSequenceClassification: "),
    ("theta-missing", ["--theta", "{d}/theta.json"], r"--theta {d}/theta.json: not 'bort' or 'small', and cannot read"),
    ("theta-field", ["--theta", "{d}/theta_bad.json"], r"candidate 0: unknown field\(s\) \['lr'\]"),
    ("rounds-0", ["--rounds", "0"], r"agora.max_rounds \(--rounds\): must be >= 1, got 0$"),
    ("replay-negative", ["--replay", "-1"], r"agora.replay \(--replay\): must be >= 0, got -1$"),
    (
        "points-per-mistake-0",
        ["--config", "{d}/agora_ppm.yaml"],
        r"agora.points_per_mistake \(--points-per-mistake\): must be >= 1, got 0$",
    ),
    (
        "agora-set-typo",
        ["--set", "agora.rounds=2"],
        r"--set: agora has no field\(s\) \['rounds'\]; fields are \['allow_untrained_mlm', 'g', 'labeller', ",
    ),
    (
        "agora-config-typo",
        ["--config", "{d}/typo_agora.yaml"],
        r"{d}/typo_agora.yaml: agora has no field\(s\) \['bogus'\]; fields are \['allow_untrained_mlm', ",
    ),
    ("agora-g-mlm", ["--mlm", None], r"--g mlm needs --mlm \(an MLM checkpoint dir\); or use --g dropout"),
]
PRETRAIN = [
    ("unknown-preset", ["--preset", "tinyy"], r"unknown preset 'tinyy'; choose one of \["),
    ("set-typo", ["--set", "train.stesp=5"], r"--set: train has no field\(s\) \['stesp'\]; fields are \["),
    ("files-no-match", ["--set", "data.files={d}/nomatch/*.txt"], r"data.files: '{d}/nomatch/\*.txt' matches no file$"),
    ("empty-corpus", ["--set", "data.files={d}/empty.txt"], r"data.files: {d}/empty.txt is empty$"),
    ("pretrain-negative-lr", ["--set", "train.learning_rate=-1"], r"train: learning_rate must be > 0, got -1.0$"),
    ("steps-0", ["--steps", "0"], r"train: steps must be >= 1, got 0$"),
    ("missing-config", ["--config", "{d}/run.yaml"], r"{d}/run.yaml: cannot read config file"),
    ("seq-len-over", ["--set", "data.seq_len=4096"], r"data.seq_len: 4096 exceeds the model's 128 usable positions"),
    (
        "files-with-stdlib",
        ["--set", "data.files={d}/train.txt", "--set", "data.source=stdlib"],
        r"data: files are set but source is 'stdlib', which ignores them; set data.source=files$",
    ),
]


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> str:
    from flax_narrow.config import EncoderConfig
    from flax_narrow.modeling import BertForMaskedLM, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    tok = H.tokenizer()
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rows = [{"sentence": f"w{i} good" if i % 2 else f"w{i} bad", "y": "pos" if i % 2 else "neg"} for i in range(20)]
    for name, data in (("train", rows), ("dev_other", [*rows[:4], {"sentence": "w1", "y": "meh"}])):
        with open(root / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in data)
    with open(root / "blank.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in [*rows[:2], {"sentence": "w3", "y": ""}])
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("sentence,y\n")
    (root / "nan.csv").write_text("sentence,y\nw1 good,pos\nw2 bad,\n")
    (root / "train.txt").write_text("w1 good\n")
    (root / "empty.txt").write_text("")
    (root / "finished").mkdir()
    (root / "finished" / "summary.json").write_text("{}")
    (root / "theta_bad.json").write_text(json.dumps([{"lr": 1e-3}]))
    (root / "ft.json").write_text(json.dumps({"train": {"steps": 3}}))
    for section in ("model", "data", "finetune", "mesh", "agora"):
        (root / f"typo_{section}.yaml").write_text(f"{section}: {{bogus: 1}}\n")
    (root / "pair_format.yaml").write_text("data: {pair_format: triple}\n")
    (root / "agora_ppm.yaml").write_text("agora: {points_per_mistake: 0}\n")
    cfg = EncoderConfig.tiny(vocab_size=len(tok))
    BertForMaskedLM.from_config(cfg, seed=0).save_pretrained(root / "mlm")
    two = cfg.replace(num_labels=2, problem_type="single_label_classification")
    BertForSequenceClassification.from_config(two.replace(label_names=("neg", "pos")), seed=0).save_pretrained(
        root / "classifier"
    )
    BertForSequenceClassification.from_config(two.replace(label_names=("yes", "no")), seed=0).save_pretrained(
        root / "other_labels"
    )
    return str(root)


def _argv(command: str, extra: list[str], d: str) -> list[str]:
    extra = [x if x is None else x.replace("{d}", d) for x in extra]
    if command == "pretrain":
        return ["pretrain", "--output-dir", f"{d}/out-pretrain", "--set", f"data.cache_dir={d}/cache", *extra]
    flags = {
        "--model": "tiny",
        "--tokenizer": f"{d}/tok",
        "--train": f"{d}/train.jsonl",
        "--output-dir": f"{d}/out-{command}",
        "--max-length": "16",
    }
    if command == "agora":
        flags.update({"--mlm": f"{d}/mlm", "--labeller": f"{d}/classifier"})
    columns = {"text_a": "text_a=sentence", "label": "label=y"}
    asked = []
    for k, v in zip(extra[::2], extra[1::2]):
        if k == "--column":
            columns.pop(v.partition("=")[0], None)
            asked.append(v)
        else:
            flags[k] = v
    out = [command]
    for k, v in flags.items():
        if v is not None:  # None: the flag left out
            out += [k, v]
    for c in [*columns.values(), *asked]:
        out += ["--column", c]
    return out


CASES = [("finetune", *c) for c in FINETUNE] + [("agora", *c) for c in AGORA] + [("pretrain", *c) for c in PRETRAIN]


@pytest.mark.parametrize(("command", "name", "extra", "pattern"), CASES, ids=[c[1] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(command, name, extra, pattern, d, capsys):
    argv = _argv(command, extra, d)
    before = set(os.listdir(d))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if x.startswith(f"flax-narrow {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    message = lines[0].split(": error: ", 1)[1]
    assert re.search(pattern.replace("{d}", re.escape(d)), message), message
    assert set(os.listdir(d)) <= before | {"cache"}, f"written: {set(os.listdir(d)) - before}"


def test_finetune_config_file_and_set_apply_after_the_flags(d):
    import argparse

    from flax_narrow.train import finetune_cli

    p = argparse.ArgumentParser()
    finetune_cli.register(p.add_subparsers(dest="command"))
    path = os.path.join(d, "ft-ok.yaml")
    with open(path, "w") as fh:
        fh.write("finetune: {patience: 4, eval_every: 7}\nmesh: {data: 2}\n")
    argv = _argv("finetune", ["--lr", "0.003", "--config", path, "--set", "finetune.learning_rate=1e-4"], d)
    cfg, mesh = finetune_cli.resolve_configs(p.parse_args(argv))
    assert (cfg.learning_rate, cfg.patience, cfg.eval_every, cfg.batch_size) == (1e-4, 4, 7, 16)
    assert mesh.data == 2


def test_every_case_is_listed_in_docs_errors():
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "errors.md"), encoding="utf-8").read()
    missing = [name for _, name, _, _ in CASES if f"`{name}`" not in text]
    assert not missing, f"docs/errors.md does not list: {missing}"
