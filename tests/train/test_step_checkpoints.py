"""Every step checkpoint of a run is a checkpoint every command reads: ``from_pretrained``, ``load_tokenizer`` /
``fill_mask``, ``inspect``, ``export`` and ``finetune --model`` take ``RUN/checkpoints/N`` (or a copy of it, or
an unfinished run directory: its latest step), for pretraining and fine-tuning runs alike; a step written
without its model config or tokenizer is refused in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import small_overrides

from flax_narrow.cli import main
from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError
from flax_narrow.inference import fill_mask
from flax_narrow.modeling import BertForMaskedLM, BertForSequenceClassification
from flax_narrow.tokenization import load_tokenizer
from flax_narrow.train.config import load_config
from flax_narrow.train.data import tokenizer_fingerprint
from flax_narrow.train.loop import pretrain, restore_model

IDS = np.asarray([[2, 40, 41, 42, 43, 44, 3]])


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    """A 4-step BERT pretraining run stopped after its checkpoint at step 2: unfinished (no config.json)."""
    out = str(tmp_path_factory.mktemp("step-ckpt") / "run")
    over = small_overrides(
        data_cache,
        **{"train.steps": 4, "checkpoint.every_steps": 2, "output_dir": out, "model.full_length_layers": "null"},
    )
    result = pretrain(load_config("tiny", None, over), stop_at=2)
    assert result.final_step == 2 and not os.path.exists(os.path.join(out, "config.json"))
    return {"dir": out, "step": os.path.join(out, "checkpoints", "2"), "tokenizer": result.tokenizer}


def _logits(model) -> np.ndarray:
    return np.asarray(model(IDS).logits)


def test_step_dir_is_a_checkpoint_with_its_tokenizer(run):
    reference, meta = restore_model(run["dir"], 2)
    assert meta["step"] == 2
    model = BertForMaskedLM.from_pretrained(run["step"])
    np.testing.assert_array_equal(_logits(model), _logits(reference))
    tok = load_tokenizer(run["step"])
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(run["tokenizer"])
    got = fill_mask(model, tok, [f"the {tok.mask_token} of the"], top_k=3)
    assert len(got[0][0]) == 3 and all(0 <= g["score"] <= 1 for g in got[0][0])


def test_unfinished_run_dir_reads_its_latest_step(run, caplog):
    with caplog.at_level(logging.INFO, logger="flax_narrow.convert.readers_orbax"):
        model = BertForMaskedLM.from_pretrained(run["dir"])
    assert "latest step checkpoint" in caplog.text and run["step"] in caplog.text
    np.testing.assert_array_equal(_logits(model), _logits(BertForMaskedLM.from_pretrained(run["step"])))
    assert tokenizer_fingerprint(load_tokenizer(run["dir"])) == tokenizer_fingerprint(run["tokenizer"])


def test_a_copied_step_dir_is_self_contained(run, tmp_path, monkeypatch):
    shutil.copytree(run["step"], tmp_path / "elsewhere" / "my-step")
    monkeypatch.chdir(tmp_path)
    copy = os.path.join("elsewhere", "my-step")  # a relative path, as users type it
    model = BertForMaskedLM.from_pretrained(copy)
    np.testing.assert_array_equal(_logits(model), _logits(BertForMaskedLM.from_pretrained(run["step"])))
    tok = load_tokenizer(copy)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(run["tokenizer"])
    assert fill_mask(model, tok, f"a {tok.mask_token} b", top_k=1)[0][0]["token"] >= 0


def test_cli_inspect_and_export_a_step_dir_to_transformers(run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    assert main(["inspect", run["step"]]) == 0
    out = capsys.readouterr().out
    assert "flax-narrow step checkpoint (orbax, step 2)" in out and "problems:     none" in out
    hf = str(tmp_path / "hf")
    assert main(["export", run["step"], hf]) == 0
    torch_model = AutoModelForMaskedLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(run["tokenizer"])
    with torch.no_grad():
        theirs = torch_model(torch.as_tensor(IDS)).logits.numpy()
    ours = _logits(BertForMaskedLM.from_pretrained(run["step"]))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.mark.slow
def test_cli_finetune_from_a_step_dir_and_its_own_step_checkpoints(run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "the", "of", "and", "a", "to", "in"]
    train = tmp_path / "train.csv"
    rows = ["sentence,y"] + [
        f"{' '.join(rng.choice(words, 5))} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(48)
    ]
    train.write_text("\n".join(rows) + "\n")
    ft = str(tmp_path / "ft")
    argv = ["finetune", "--model", run["step"], "--train", str(train), "--column", "text_a=sentence"]
    argv += ["--column", "label=y", "--max-length", "16", "--epochs", "1", "--batch-size", "8"]
    argv += ["--eval-batch-size", "8", "--no-progress", "--output-dir", ft]
    assert main(argv) == 0, capsys.readouterr().err
    # The fine-tuning run's step checkpoint is a checkpoint too: config (labels included) and tokenizer.
    steps = sorted(int(s) for s in os.listdir(os.path.join(ft, "checkpoints")) if s.isdigit())
    step_dir = os.path.join(ft, "checkpoints", str(steps[-1]))
    model = BertForSequenceClassification.from_pretrained(step_dir, strict=True)
    assert model.config.label_names == ("neg", "pos")
    assert tokenizer_fingerprint(load_tokenizer(step_dir)) == tokenizer_fingerprint(run["tokenizer"])
    summary = json.load(open(os.path.join(ft, "summary.json")))
    if summary["best_step"] == steps[-1]:  # then best/ holds the same weights
        best = BertForSequenceClassification.from_pretrained(os.path.join(ft, "best"))
        np.testing.assert_array_equal(_logits(model), _logits(best))
    assert tokenizer_fingerprint(load_tokenizer(ft)) == tokenizer_fingerprint(run["tokenizer"])  # best/'s
    capsys.readouterr()
    assert main(["inspect", step_dir]) == 0
    assert "BertForSequenceClassification" in capsys.readouterr().out


def _save(directory, state, meta, **items):
    from flax_narrow.train.checkpoint import Checkpointer

    ck = Checkpointer(directory, async_save=False)
    ck.save(1, state, None, meta, **items)
    ck.close()
    return os.path.join(directory, "1")


def test_finetune_step_checkpoint_reads_the_train_params_not_the_best(tmp_path):
    """A fine-tuning step holds {"train": TrainState, "best": params}: a step means the weights at that step."""
    from flax_narrow.pretrained import model_config_json
    from flax_narrow.train.step import TrainState

    cfg = EncoderConfig.tiny().replace(num_labels=2)
    now = BertForSequenceClassification.from_config(cfg, seed=1)
    best = BertForSequenceClassification.from_config(cfg, seed=2)
    params, best_params = nnx.state(now, nnx.Param), nnx.state(best, nnx.Param)
    opt = jax.tree.map(lambda x: x * 0 + 7, params)  # stands in for the optimizer state: never read
    state = {"train": TrainState(np.int32(1), params, opt), "best": best_params}
    step_dir = _save(str(tmp_path / "ck"), state, {"step": 1}, model_config=model_config_json(now))
    loaded = BertForSequenceClassification.from_pretrained(step_dir, strict=True)
    np.testing.assert_array_equal(_logits(loaded), _logits(now))
    assert not np.array_equal(_logits(loaded), _logits(best))
    # A finished fine-tuning output directory (summary.json, best/, checkpoints/) reads as best/, the model
    # the run chose; before, it read its last step checkpoint.
    out = tmp_path / "ft"
    _save(str(out / "checkpoints"), state, {"step": 1}, model_config=model_config_json(now))
    best.save_pretrained(out / "best")
    (out / "summary.json").write_text("{}")
    np.testing.assert_array_equal(_logits(BertForSequenceClassification.from_pretrained(out)), _logits(best))


def test_a_step_without_config_or_tokenizer_is_refused_in_one_line(tmp_path, capsys):
    """Steps written before the config and tokenizer items: one line naming what is missing, exit 2; they
    still restore for resuming."""
    from flax_narrow.train.checkpoint import Checkpointer

    model = BertForMaskedLM.from_config(EncoderConfig.tiny(), seed=0)
    params = nnx.state(model, nnx.Param)
    step_dir = _save(str(tmp_path / "ck"), {"params": params}, {"step": 1})
    with pytest.raises(CheckpointError, match=r"no model config \(item 'model_config'"):
        BertForMaskedLM.from_pretrained(step_dir)
    with pytest.raises(CheckpointError, match=r"no tokenizer \(item 'tokenizer'"):
        load_tokenizer(step_dir)
    for argv in (["inspect", step_dir], ["export", step_dir, str(tmp_path / "hf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no model config" in err and step_dir in err, err
    assert not os.path.exists(tmp_path / "hf")
    # With a config given, its weights load.
    loaded = BertForMaskedLM.from_pretrained(step_dir, config=EncoderConfig.tiny())
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    # Still resumable: the checkpointer restores it as before.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params})
    ck = Checkpointer(str(tmp_path / "ck"))
    restored, meta = ck.restore(1, abstract, None)
    ck.close()
    assert meta == {"step": 1}
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"].get_value()),
        np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"].get_value()),
    )


def test_tokenizer_item_keeps_text_and_binary_files_byte_for_byte(tmp_path):
    """Text files are stored as text, others (a sentencepiece model) base64: both come back unchanged."""
    from flax_narrow.convert import readers_orbax
    from flax_narrow.train.checkpoint import tokenizer_item

    blob = bytes(range(256)) * 3  # not UTF-8
    text = '{"vocab": ["[PAD]", "é", "日本"]}\n'

    class Saved:
        def save_pretrained(self, directory):
            with open(os.path.join(directory, "spiece.model"), "wb") as fh:
                fh.write(blob)
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
                fh.write(text)

    item = tokenizer_item(Saved())
    assert set(item["files"]) == {"tokenizer_config.json"} and set(item["base64"]) == {"spiece.model"}
    model = BertForMaskedLM.from_config(EncoderConfig.tiny(), seed=0)
    step_dir = _save(str(tmp_path / "ck"), {"params": nnx.state(model, nnx.Param)}, {"step": 1}, tokenizer=item)
    out = str(tmp_path / "out")
    assert sorted(readers_orbax.write_tokenizer_files(step_dir, out)) == ["spiece.model", "tokenizer_config.json"]
    assert open(os.path.join(out, "spiece.model"), "rb").read() == blob
    assert open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8").read() == text
