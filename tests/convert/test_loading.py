"""from_pretrained on every checkpoint layout, strictness, safety, and save_pretrained round trips."""

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from conftest import max_diff, save_torch_model, tiny_hf_config, torch_run
from flax_narrow.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def mlm_torch():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(tiny_hf_config()).eval()


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-fp16", "bin-bf16", "safetensors-fp16"])
def test_layouts_and_dtypes(tmp_path, padded_batch, mlm_torch, layout):
    d = tmp_path / layout
    if layout == "sharded":
        save_torch_model(mlm_torch, d, max_shard_size="20KB")
        assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    elif layout.startswith("bin"):
        dtype = {"bin": None, "bin-fp16": torch.float16, "bin-bf16": torch.bfloat16}[layout]
        save_torch_model(mlm_torch, d, fmt="bin", dtype=dtype)
    elif layout == "safetensors-fp16":
        mlm_torch.half().save_pretrained(d)
        mlm_torch.float()
    else:
        save_torch_model(mlm_torch, d)
    # the reference is the same stored weights computed in fp32
    ref_model = transformers.BertForMaskedLM.from_pretrained(str(d), dtype=torch.float32)
    ref = torch_run(ref_model, padded_batch).logits
    fm = fn.BertForMaskedLM.from_pretrained(d)
    assert fm.config.param_dtype == "float32"
    tol = 1e-5 if layout in ("safetensors", "sharded", "bin") else 1e-4
    assert max_diff(fm(**padded_batch).logits, ref, padded_batch["attention_mask"]) <= tol


def test_base_checkpoint_into_task_model_warns_and_inits_head(tmp_path, padded_batch, caplog):
    torch.manual_seed(1)
    base = transformers.BertModel(tiny_hf_config())
    d = save_torch_model(base, tmp_path / "base")
    with caplog.at_level(logging.WARNING):
        clf = fn.BertForSequenceClassification.from_pretrained(d, num_labels=3)
    assert "newly initialised" in caplog.text and "classifier.kernel" in caplog.text
    ref = torch_run(base, padded_batch).last_hidden_state
    got = clf.bert(**padded_batch).last_hidden_state
    assert max_diff(got, ref, padded_batch["attention_mask"]) <= 1e-5
    assert clf(**padded_batch).logits.shape == (2, 3)
    with pytest.raises(CheckpointError, match=r"missing keys \['classifier.bias', 'classifier.kernel'\]"):
        fn.BertForSequenceClassification.from_pretrained(d, strict=True)


def test_task_checkpoint_into_base_model_drops_head_with_warning(tmp_path, padded_batch, mlm_torch, caplog):
    d = save_torch_model(mlm_torch, tmp_path / "mlm")
    with caplog.at_level(logging.WARNING):
        base = fn.BertModel.from_pretrained(d)
    assert "not used by this model: cls.predictions.bias" in caplog.text
    ref = torch_run(mlm_torch.bert, padded_batch).last_hidden_state
    assert max_diff(base(**padded_batch).last_hidden_state, ref, padded_batch["attention_mask"]) <= 1e-5


def _state_dict_dir(tmp_path, sd, cfg=None):
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (cfg or tiny_hf_config()).save_pretrained(d)
    torch.save(sd, d / "pytorch_model.bin")
    return d


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, mlm_torch):
    sd = dict(mlm_torch.state_dict())
    del sd["bert.encoder.layer.1.output.dense.weight"]
    sd["bert.encoder.layer.0.surprise.weight"] = torch.zeros(3)
    sd["bert.embeddings.LayerNorm.bias"] = torch.zeros(31)
    d = _state_dict_dir(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        fn.BertForMaskedLM.from_pretrained(d)
    msg = str(e.value)
    assert "missing keys ['bert.encoder.layer.1.output.dense.kernel']" in msg
    assert "unexpected keys ['bert.encoder.layer.0.surprise.weight']" in msg
    assert "bert.embeddings.LayerNorm.bias: checkpoint (31,) vs model (32,)" in msg
    assert "\n" not in msg


def test_config_contradicting_weights(tmp_path, mlm_torch):
    d = _state_dict_dir(tmp_path, mlm_torch.state_dict(), tiny_hf_config(num_hidden_layers=3))
    with pytest.raises(ConfigError, match=r"num_hidden_layers=3 but the weights hold encoder.layer \[0, 1\]"):
        fn.BertForMaskedLM.from_pretrained(d)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/flax_narrow_pwned",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/flax_narrow_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    d = tmp_path / "evil"
    d.mkdir()
    tiny_hf_config().save_pretrained(d)
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        fn.BertModel.from_pretrained(d)
    assert not os.path.exists(marker)
    with open(d / "pytorch_model.bin", "wb") as fh:  # a legacy (non-zip) pickle too
        pickle.dump({"x": _Payload()}, fh)
    with pytest.raises(CheckpointError):
        fn.BertModel.from_pretrained(d)
    assert not os.path.exists(marker)


def test_corrupt_and_truncated_safetensors(tmp_path, mlm_torch):
    d = save_torch_model(mlm_torch, tmp_path / "ok")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        fn.BertForMaskedLM.from_pretrained(d)
    with open(f, "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        fn.BertForMaskedLM.from_pretrained(d)


def test_missing_things_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        fn.BertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        fn.BertModel.from_pretrained(tmp_path / "empty")
    tiny_hf_config().save_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights found"):
        fn.BertModel.from_pretrained(tmp_path / "empty")


def test_hub_id_offline_fails_clearly():
    with pytest.raises(CheckpointError, match="downloading it from the hub failed"):
        fn.BertModel.from_pretrained("no-such-org/no-such-model-xyz")


def test_stale_untied_decoder_is_ignored_and_retied(tmp_path, padded_batch, mlm_torch, caplog):
    sd = {k: v.clone() for k, v in mlm_torch.state_dict().items()}
    sd["cls.predictions.decoder.weight"] = torch.randn_like(sd["cls.predictions.decoder.weight"])
    d = _state_dict_dir(tmp_path, sd)
    with caplog.at_level(logging.WARNING):
        fm = fn.BertForMaskedLM.from_pretrained(d)
    assert "untied MLM decoder copy" in caplog.text
    ref = torch_run(mlm_torch, padded_batch).logits  # mlm_torch is tied: the faithful model
    assert max_diff(fm(**padded_batch).logits, ref, padded_batch["attention_mask"]) <= 1e-5


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification", "BertModel"])
def test_save_pretrained_round_trip_is_exact(tmp_path, padded_batch, name):
    from flax import nnx

    m = getattr(fn, name).from_config(fn.EncoderConfig.tiny(num_labels=4, label_names=tuple("abcd")), seed=3)
    path = m.save_pretrained(tmp_path / "saved")
    files = sorted(os.listdir(path))
    assert files == ["config.json", "flax_model.safetensors"]
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert cfg["architectures"] == [name] and cfg["flax_narrow"]["config"]["label_names"] == list("abcd")
    again = getattr(fn, name).from_pretrained(path)
    assert again.config == m.config
    a, b = nnx.state(m, nnx.Param), nnx.state(again, nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(va.get_value(), vb.get_value())


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    m = fn.BertModel.from_config(fn.EncoderConfig.tiny())
    first = m.save_pretrained(tmp_path / "out")
    before = open(os.path.join(first, "flax_model.safetensors"), "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(tmp_path / "out")
    assert open(os.path.join(first, "flax_model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="already exists"):
        m.save_pretrained(tmp_path / "out", overwrite=False)


def test_loading_again_compiles_nothing(tmp_path):
    """The jitted init of fresh heads and RNG state is cached per (class, config, paths), seed as an argument:
    a second load of the same kind of checkpoint, with any seed, compiles nothing."""
    import jax

    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    src = fn.BertForMaskedLM.from_config(fn.EncoderConfig.tiny(vocab_size=101), seed=0).save_pretrained(tmp_path / "m")
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = fn.BertForSequenceClassification.from_pretrained(src, seed=3)
        assert compiles, "the listener saw no compilation at all: the test would pass vacuously"
        n = len(compiles)
        again = fn.BertForSequenceClassification.from_pretrained(src, seed=4)
        assert len(compiles) == n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # the seed still decides the fresh head, as from_config's (jitted there, eager here: equal up to rounding)
    fresh = fn.BertForSequenceClassification.from_config(fn.EncoderConfig.tiny(vocab_size=101), seed=4)
    for got, want in [
        (again.classifier.kernel, fresh.classifier.kernel),
        (again.bert.pooler.dense.kernel, fresh.bert.pooler.dense.kernel),
    ]:
        np.testing.assert_allclose(got.get_value(), want.get_value(), atol=1e-7)
    assert not np.allclose(first.classifier.kernel.get_value(), again.classifier.kernel.get_value())
