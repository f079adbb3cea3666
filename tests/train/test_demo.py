"""The demo (``make demo``), shrunk to seconds: both runs at equal time, the entropy line, the eval table, the
fill-mask lines and the fine-tuning command, which must run as printed. Whether the real-size demo learns
(losses below the entropy, NarrowBERT ahead) is measured in benchmarks/RESULTS.md, not here."""

import contextlib
import io
import json
import math
import os
import re
import shlex

import numpy as np
import pytest

from flax_narrow.errors import InputError
from flax_narrow.train import demo
from flax_narrow.train.demo import PRESETS, loss_table, run_demo, unigram_entropy

SECONDS = 2.0


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, data_cache):
    out = str(tmp_path_factory.mktemp("demo"))
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
        "model.max_position_embeddings=64",
        "train.max_predictions=10",
        "train.log_every=2",
        "train.eval_batches=2",
        "mesh.data=1",
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        figures = run_demo(out, seconds=SECONDS, overrides=overrides)
    return out, figures, buf.getvalue()


@pytest.mark.slow
def test_demo_prints_each_part_from_computed_values(small_demo):
    out_dir, figures, out = small_demo
    lines = out.splitlines()
    assert lines[0].startswith("NarrowBERT, 2 full + 1 narrow layers: hidden 32,")
    assert lines[1].startswith("BERT: hidden 32,")

    # the entropy line: the figure computed from the eval rows, finite and below the uniform distribution's
    m = re.search(r"the unigram entropy of the eval tokens, ([0-9.]+) nats", out)
    assert m and float(m.group(1)) == pytest.approx(figures["entropy"], abs=5e-4)
    assert 0 < figures["entropy"] < math.log(1024)
    # the plateau: the eval tokens' cross-entropy under the training split's frequencies, never below the entropy
    m = re.search(r"costs ([0-9.]+) nats with the training split's frequencies", out)
    assert m and float(m.group(1)) == pytest.approx(figures["plateau"], abs=5e-4)
    assert figures["plateau"] >= figures["entropy"]
    a, b = (figures["runs"][n]["evals"][-1]["eval_loss"] for n in PRESETS)
    assert "  " + demo._verdict(a, b, figures["entropy"]) in lines

    # the table: one row per evaluation of each run, its numbers those of the runs' evals
    head = next(i for i, line in enumerate(lines) if line.split() == ["NarrowBERT", "BERT"])
    assert lines[head + 1].split() == ["time", "step", "eval", "loss", "accuracy"] * 2
    runs = [figures["runs"][n]["evals"] for n in PRESETS]
    n_rows = max(len(e) for e in runs)
    assert n_rows >= 1 and lines[head + 2 + n_rows] == ""
    width = (len(lines[head + 1]) - 4) // 2  # "  " + cell + "  " + cell
    for i in range(n_rows):
        row = lines[head + 2 + i].ljust(2 * width + 4)
        for j, evals in enumerate(runs):
            cell = row[2 + j * (width + 2) : 2 + j * (width + 2) + width].split()
            if i >= len(evals):  # the other run evaluated more often: a blank cell
                assert cell == []
                continue
            e = evals[i]
            t, step, loss, acc = cell
            assert t == f"{e['train_seconds']:.1f}s" and int(step) == e["step"]
            assert float(loss) == pytest.approx(e["eval_loss"], abs=5e-4)
            assert float(acc) == pytest.approx(e["eval_accuracy"], abs=5e-4)
            assert e["train_seconds"] >= SECONDS / demo.EVALS * (i + 1) - 1e-9  # evaluated on the clock
    for evals in runs:
        assert evals[-1]["train_seconds"] >= SECONDS and np.isfinite([e["eval_loss"] for e in evals]).all()

    # fill-mask: per probe, each model's top 3 from fill_mask on the saved model
    from flax_narrow.inference import fill_mask
    from flax_narrow.modeling import BertForMaskedLM
    from flax_narrow.tokenization import load_tokenizer

    saved = figures["runs"]["demo-narrowbert"]["saved"]
    model, tok = BertForMaskedLM.from_pretrained(saved), load_tokenizer(saved)
    assert model.config.is_narrow
    expected = fill_mask(model, tok, list(demo.FILL_MASK_TEXTS), top_k=3)
    for text, preds in zip(demo.FILL_MASK_TEXTS, expected):
        i = lines.index("  " + text)
        want = ", ".join(f"{c['token_str']} ({c['score']:.2f})" for c in preds[0])
        assert lines[i + 1] == f"    NarrowBERT: {want}" and lines[i + 2].startswith("    BERT:")

    # the command, as printed
    argv = figures["finetune_command"]
    assert f"  {shlex.join(argv)}" in lines and argv[argv.index("--model") + 1] == saved
    assert os.path.isfile(os.path.join(out_dir, "stdlib-packages", "train.jsonl"))
    assert f"everything is under {out_dir}" in out


@pytest.mark.slow
def test_the_printed_finetune_command_runs(small_demo, capsys):
    from flax_narrow.cli import main

    _, figures, _ = small_demo
    argv = figures["finetune_command"]
    assert argv[:2] == ["flax-narrow", "finetune"]
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert '"best_accuracy"' in out
    assert os.listdir(argv[argv.index("--output-dir") + 1])


def test_unigram_entropy_of_known_counts():
    # specials 0 and 2 are left out: tokens 5, 5, 6, 7 -> p = (1/2, 1/4, 1/4)
    rows = [np.array([[2, 5, 5, 0]]), np.array([[2, 6, 7, 0]])]
    assert unigram_entropy(rows, [0, 2]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert unigram_entropy([np.array([9, 9, 9])], [0]) == 0.0
    with pytest.raises(InputError, match="no non-special token"):
        unigram_entropy([np.array([0, 2])], [0, 2])


def test_finetune_task_is_labelled_by_package_and_split_by_text(tmp_path):
    counts = demo.write_finetune_task(str(tmp_path), packages=("json", "http"))
    train = [json.loads(x) for x in open(tmp_path / "train.jsonl", encoding="utf-8")]
    dev = [json.loads(x) for x in open(tmp_path / "dev.jsonl", encoding="utf-8")]
    assert counts == {"train": len(train), "dev": len(dev)} and len(dev) > 0
    assert {e["label"] for e in train} == {"json", "http"}
    assert not {e["text_a"] for e in train} & {e["text_a"] for e in dev}
    assert all(len(e["text_a"]) >= 40 for e in train + dev)


@pytest.mark.parametrize("argv", [["demo", "--seconds", "0"], ["demo", "--steps", "0"]])
def test_demo_cli_refuses_bad_budgets(argv, capsys):
    from flax_narrow.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argv[1] in err[0]


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


def test_unigram_cross_entropy_of_known_counts():
    # eval tokens 5, 6; training tokens 5, 5, 5, 7 (+ specials 0, 2, left out); alpha 0.5 over ids 0..7
    rows, train = [np.array([[2, 5, 6, 0]])], [np.array([[2, 5, 5, 5, 7, 0]])]
    q = np.full(8, 0.5)
    q[5] += 3
    q[7] += 1
    q /= q.sum()
    want = -(math.log(q[5]) + math.log(q[6])) / 2
    assert demo.unigram_cross_entropy(rows, train, [0, 2]) == pytest.approx(want)
    # the training split's own tokens under its own frequencies: close to its entropy, never below
    assert demo.unigram_cross_entropy(train, train, [0, 2], alpha=1e-9) == pytest.approx(
        unigram_entropy(train, [0, 2]), rel=1e-6
    )
    with pytest.raises(InputError, match="no non-special token"):
        demo.unigram_cross_entropy([np.array([[0, 2]])], train, [0, 2])


@pytest.mark.parametrize(
    ("narrow", "bert", "says"),
    [
        (5.5, 5.7, "NarrowBERT has the lower eval loss (by 0.200 nats); both are below the unigram entropy"),
        (6.1, 5.8, "BERT has the lower eval loss (by 0.300 nats); only BERT is below the unigram entropy"),
        (6.2, 6.3, "NarrowBERT has the lower eval loss (by 0.100 nats); neither is below the unigram entropy yet"),
    ],
)
def test_verdict_follows_the_numbers(narrow, bert, says):
    assert demo._verdict(narrow, bert, 6.0).startswith(says)
