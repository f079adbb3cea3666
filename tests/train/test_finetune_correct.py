"""Correct results and no silent data mistakes: token types follow the checkpoint, binary F1 scores the data
set's positive class, a labeller maps its labels by name (or is refused), Agora replays the same Θ fresh and
resumed, a held-out part of train replaces a missing dev set, test labels give test metrics, predictions
carry id / gold / prediction / probabilities, and ``data.files`` takes effect on any preset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.train import finetune_cli
from flax_narrow.train import sharding as shd
from flax_narrow.train.agora import AgoraConfig, CallableLabeller, ClassifierLabeller, MLMInfill, run_agora
from flax_narrow.train.candidates import Candidate
from flax_narrow.train.config import DataConfig, MeshConfig, load_config
from flax_narrow.train.finetune import FinetuneConfig, build_model, finetune
from flax_narrow.train.finetune_data import Encoder, infer_label_names, load_split
from flax_narrow.train.tasks import Task, compute_metrics


def _tok_dir(tmp_path) -> str:
    tok = H.tokenizer()
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    return str(d)


def _args(tmp_path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    finetune_cli.register(p.add_subparsers(dest="command"))
    argv = ["finetune", "--model", "tiny", "--tokenizer", _tok_dir(tmp_path), "--output-dir", str(tmp_path / "o")]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        for x in v if isinstance(v, list) else [v]:
            argv += [flag, str(x)]
    return p.parse_args(argv)


def _jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_binary_f1_scores_the_positive_class_in_the_datasets_label_order(tmp_path):
    import datasets

    feats = datasets.Features(
        {"sentence1": datasets.Value("string"), "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"])}
    )
    ds = datasets.Dataset.from_dict({"sentence1": ["a", "b", "c", "d"], "label": [1, 1, 0, 1]}, features=feats)
    path = str(tmp_path / "mrpc.parquet")
    ds.to_parquet(path)
    examples, order = load_split(path, "train", "classification", {"text_a": "sentence1"})
    assert order == ("not_equivalent", "equivalent")  # not sorted alphabetically
    task = Task("classification", infer_label_names("classification", examples, order))
    assert task.label_names == order and task.positive == "equivalent"
    refs = np.array([1, 1, 0, 1])  # label ids in GLUE order: 1 = equivalent
    preds = np.array([1, 0, 0, 1])
    from sklearn.metrics import f1_score

    got = compute_metrics(task, preds, refs)["f1"]
    assert got == pytest.approx(f1_score(refs, preds, pos_label=1))  # the F1 of "equivalent": 0.8
    assert got == pytest.approx(0.8)
    neg = compute_metrics(Task("classification", order, positive_label="not_equivalent"), preds, refs)["f1"]
    assert neg == pytest.approx(f1_score(refs, preds, pos_label=0))
    with pytest.raises(ConfigError, match="positive label 'maybe' is not one of the labels"):
        Task("classification", order, positive_label="maybe")


def test_token_types_follow_the_checkpoints_type_vocab_size(tmp_path):
    """A BORT-like checkpoint (type_vocab_size=1) gets type 0 for both segments; with type 1 it was NaN."""
    from flax_narrow.modeling import BertForSequenceClassification

    tok = H.tokenizer()
    ckpt = str(tmp_path / "bortlike")
    cfg = EncoderConfig.tiny(vocab_size=len(tok), type_vocab_size=1, num_labels=2)
    BertForSequenceClassification.from_config(cfg, seed=0).save_pretrained(ckpt)
    rows = [{"a": f"w{i} w2", "b": "w3 good", "y": "pos" if i % 2 else "neg"} for i in range(20)]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    args = _args(tmp_path, train=train, column=["text_a=a", "text_b=b", "label=y"], max_length=16)
    args.model = ckpt
    prep = finetune_cli.prepare(args)
    assert prep.encoder.token_types is False
    batch = prep.encoder.encode(prep.task, prep.train)
    assert batch["token_type_ids"].max() == 0
    preset = finetune_cli.prepare(
        _args(tmp_path, train=train, column=["text_a=a", "text_b=b", "label=y"], max_length=16)
    )
    assert preset.encoder.token_types is True  # a model with two token types keeps them


def test_labeller_maps_its_labels_by_name_or_is_refused():
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    own = Task("classification", ("pos", "neg"))  # the labeller was fine-tuned with this order
    model = build_model(own, mcfg, seed=3)
    examples = [{"text_a": e["text_a"]} for e in H.classification(np.random.default_rng(0), 16)]
    expected = ClassifierLabeller(model, own, enc)(examples)  # its own task: names by its own ids
    got = ClassifierLabeller(model, Task("classification", ("neg", "pos")), enc)(examples)
    assert got == expected  # the same names, whatever order the task lists them in (id 0 is "pos" for it)
    with pytest.raises(ConfigError, match=r"the labeller's labels \['pos', 'neg'\] are not the task's"):
        ClassifierLabeller(model, Task("classification", ("yes", "no")), enc)


@pytest.mark.slow
def test_agora_replay_is_the_same_fresh_and_resumed(tmp_path):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    train, dev = H.classification(rng, 32), H.classification(rng, 32)
    task = Task("classification", ("neg", "pos"))
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    theta = [Candidate(3e-3, 0.01, 0.1, 16, 0, 1), Candidate(1e-4, 0.01, 0.1, 16, 1, 1)]
    labeller = CallableLabeller(lambda e: "pos" if "good" in e["text_a"].split() else "neg")
    ft = FinetuneConfig(eval_batch_size=32, progress_bar=False)

    def run(out, **kw):
        cfg = AgoraConfig(str(out), max_rounds=1, seed=0, finetune=ft, **kw)
        mlm = MLMInfill(
            BertForMaskedLM.from_config(mcfg, seed=1), tok, max_length=16, allow_untrained=True
        )  # a fresh head, on purpose
        return run_agora(task, enc, train, dev, theta, lambda s: build_model(task, mcfg, seed=s), mlm, labeller, cfg)

    fresh = run(tmp_path / "fresh", replay=1)
    run(tmp_path / "resumed", replay=0)
    resumed = run(tmp_path / "resumed", replay=1)
    a, b = fresh.rounds[1], resumed.rounds[1]
    assert a["replay"] and b["replay"]
    assert a["theta"] == b["theta"] == fresh.rounds[0]["theta_left"]  # the survivors
    assert a["scores"] == b["scores"] and a["train_size"] == b["train_size"]


def test_without_dev_a_fixed_part_of_train_is_held_out_and_logged(tmp_path, caplog):
    rows = [{"s": f"w{i} good" if i % 2 else f"w{i} bad", "y": "pos" if i % 2 else "neg"} for i in range(40)]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    args = _args(tmp_path, train=train, column=["text_a=s", "label=y"], max_length=16)
    with caplog.at_level(logging.WARNING, logger="flax_narrow"):
        prep = finetune_cli.prepare(args)
    assert prep.dev_held_out and len(prep.dev) == 4 and len(prep.train) == 36
    assert not {e["text_a"] for e in prep.dev} & {e["text_a"] for e in prep.train}
    assert "no --dev: holding out 4 of the 40 training examples" in caplog.text
    again = finetune_cli.prepare(args)
    assert again.dev == prep.dev  # deterministic


def test_test_labels_give_test_metrics_and_predictions_carry_id_gold_and_probabilities(tmp_path):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    task = Task("classification", ("neg", "pos"))
    rng = np.random.default_rng(0)
    tr, dv = H.classification(rng, 32), H.classification(rng, 16)
    te = [{**e, "id": f"ex{i}"} for i, e in enumerate(H.classification(rng, 8))]
    model = build_model(task, EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    cfg = FinetuneConfig(learning_rate=3e-3, epochs=1, batch_size=16, eval_batch_size=8, progress_bar=False)
    out = str(tmp_path / "ft")
    mesh = shd.make_mesh(MeshConfig(1, 1, 1))
    r = finetune(model, task, enc.encode(task, tr), enc.encode(task, dv), cfg, output_dir=out,
                 test=enc.encode(task, te), mesh=mesh, tokenizer=tok)  # fmt: skip
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["test"]) == {"accuracy", "f1", "mcc"} and summary["test"] == r.test_metrics
    preds = [json.loads(x) for x in open(os.path.join(out, "predictions.jsonl"))]
    assert [p["id"] for p in preds] == [f"ex{i}" for i in range(8)]
    assert [p["label"] for p in preds] == [e["label"] for e in te]
    for p in preds:
        assert p["prediction"] in ("neg", "pos") and set(p["probabilities"]) == {"neg", "pos"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
        assert p["prediction"] == max(p["probabilities"], key=p["probabilities"].get)
    from flax_narrow.tokenization import load_tokenizer

    assert load_tokenizer(os.path.join(out, "best")).get_vocab() == tok.get_vocab()  # best/ carries its tokenizer
    acc = np.mean([p["label"] == p["prediction"] for p in preds])
    assert summary["test"]["accuracy"] == pytest.approx(acc)


def test_data_files_take_effect_whatever_the_preset(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n\nmore text\n")
    cfg = load_config("tiny", None, [f"data.files={corpus}"])
    assert cfg.data.source == "files" and cfg.data.files == (str(corpus),)
    with pytest.raises(ConfigError, match="files are set but source is 'stdlib', which ignores them"):
        DataConfig(source="stdlib", files=(str(corpus),))
    with pytest.raises(ConfigError, match="which ignores them"):
        load_config("tiny", None, [f"data.files={corpus}", "data.source=stdlib"])
    assert dataclasses.replace(cfg.data).source == "files"


def test_token_labels_per_row_or_per_token_are_not_guessed_from_shapes():
    """With P == L the shapes cannot tell per-row (B, P) from per-token (B, L) labels: the caller says which
    (``label_layout``), and without it the call is refused; the fine-tuning forward says "rows"."""
    import jax.numpy as jnp

    from flax_narrow.errors import InputError
    from flax_narrow.modeling import BertForTokenClassification
    from flax_narrow.modeling.losses import masked_cross_entropy

    cfg = EncoderConfig.tiny(vocab_size=57, num_labels=3)
    model = BertForTokenClassification.from_config(cfg, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 57, (2, 8)), jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(8)[::-1], (2, 1)), jnp.int32)  # P == L rows, reversed
    valid = jnp.ones((2, 8), bool)
    per_token = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 8)), jnp.int32)
    with pytest.raises(InputError, match=r"could be per row \(P = 8\) or per token \(L\)"):
        model(ids, labels=per_token, narrow_positions=pos, narrow_valid=valid)
    out = model(ids, labels=per_token, label_layout="tokens", narrow_positions=pos, narrow_valid=valid)
    want = masked_cross_entropy(out.logits, jnp.take_along_axis(per_token, pos, 1), valid)
    np.testing.assert_allclose(float(out.loss), float(want), rtol=1e-6)
    rows = model(ids, labels=per_token, label_layout="rows", narrow_positions=pos, narrow_valid=valid)
    np.testing.assert_allclose(float(rows.loss), float(masked_cross_entropy(out.logits, per_token, valid)), rtol=1e-6)
