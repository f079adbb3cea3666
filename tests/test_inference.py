"""fill_mask against transformers' fill-mask pipeline (BERT, BORT-shaped), the PyTorch NarrowBERT, and its
one-line errors. Tiny random models and tokenizers trained offline."""

import os
import sys

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from flax_narrow.errors import InputError, NarrowOverflowError

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "narrow layers attend from selected rows to every token",
    "bort is a small bert found by architecture search",
    "paris is the capital of france and jax compiles once",
] * 20
TEXTS = [
    "the quick brown [MASK] jumps over the lazy dog",
    "paris is the [MASK] of france",
    "[MASK] layers attend from selected rows to [MASK] token",  # two masks, and the longest text
]


@pytest.fixture(scope="module")
def wordpiece():
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(CORPUS, vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    vocab = wp.get_vocab()
    return transformers.BertTokenizerFast(vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])))


def _pipeline_results(pipe, texts, top_k):
    """The pipeline's answer as [text][mask][k] (it flattens a single text and a single mask)."""
    out = []
    for t in texts:
        r = pipe(t, top_k=top_k)
        out.append([r] if isinstance(r[0], dict) else r)
    return out


def _assert_same(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for o_text, t_text in zip(ours, theirs):
        assert len(o_text) == len(t_text)
        for o_mask, t_mask in zip(o_text, t_text):
            assert [d["token"] for d in o_mask] == [d["token"] for d in t_mask]
            assert [d["token_str"] for d in o_mask] == [d["token_str"] for d in t_mask]
            assert [d["sequence"] for d in o_mask] == [d["sequence"] for d in t_mask]
            np.testing.assert_allclose([d["score"] for d in o_mask], [d["score"] for d in t_mask], atol=atol)


def test_bert_matches_the_transformers_pipeline(tmp_path, wordpiece):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(  # initializer_range 0.3: top-k lists that differ from mask to mask
        vocab_size=len(wordpiece),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        initializer_range=0.3,
    )
    tmodel = transformers.BertForMaskedLM(cfg).eval()
    tmodel.save_pretrained(tmp_path / "hf")
    wordpiece.save_pretrained(tmp_path / "hf")
    pipe = transformers.pipeline("fill-mask", model=tmodel, tokenizer=wordpiece)
    model = fn.BertForMaskedLM.from_pretrained(tmp_path / "hf")
    ours = fn.fill_mask(model, wordpiece, TEXTS, top_k=5)
    _assert_same(ours, _pipeline_results(pipe, TEXTS, 5))
    assert len(ours[2]) == 2 and "[MASK]" in ours[2][0][0]["sequence"]  # two masks: the other one stays visible
    assert len({tuple(d["token"] for d in m) for t in ours for m in t}) == 4  # the rows really differ
    # a single text gives that text's entry; a larger static P gives the same answer
    _assert_same([fn.fill_mask(model, wordpiece, TEXTS[1], top_k=3)], _pipeline_results(pipe, TEXTS[1:2], 3))
    _assert_same(fn.fill_mask(model, wordpiece, TEXTS, top_k=5, max_positions=4), ours, atol=1e-6)


def test_bort_shaped_model_with_a_bpe_tokenizer(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    tok = fn.load_tokenizer(tmp_path)
    torch.manual_seed(1)
    cfg = transformers.BertConfig(  # BORT's layout: one token type, pad id 1, LN eps 1e-5, FFN < hidden
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        initializer_range=0.3,
    )
    tmodel = transformers.BertForMaskedLM(cfg).eval()
    tmodel.save_pretrained(tmp_path / "hf")
    model = fn.BortForMaskedLM.from_pretrained(tmp_path / "hf")
    texts = ["the quick brown<mask> jumps over the lazy dog", "paris is the<mask> of france"]
    pipe = transformers.pipeline("fill-mask", model=tmodel, tokenizer=tok)
    _assert_same(fn.fill_mask(model, tok, texts, top_k=4), _pipeline_results(pipe, texts, 4))


def test_narrowbert_matches_the_pytorch_narrowbert(tmp_path, wordpiece):
    from flax_narrow.convert.export import export_checkpoint
    from flax_narrow.convert.torch_narrowbert import load_torch_narrowbert, run_narrow

    cfg = fn.EncoderConfig.tiny_narrowbert(vocab_size=len(wordpiece), initializer_range=0.3)
    model = fn.NarrowBertForMaskedLM.from_config(cfg, seed=2)
    ref = load_torch_narrowbert(export_checkpoint(model.save_pretrained(tmp_path / "f"), tmp_path / "hf").destination)
    ours = fn.fill_mask(model, wordpiece, TEXTS, top_k=3)
    enc = dict(wordpiece(TEXTS, padding=True, return_tensors="np"))
    masks = enc["input_ids"] == wordpiece.mask_token_id
    probs = torch.from_numpy(run_narrow(ref, enc, masks)).softmax(-1)
    values, tokens = probs.topk(3)
    for b, per_mask in enumerate(ours):
        assert len(per_mask) == masks[b].sum()
        for p, row in enumerate(per_mask):
            assert [d["token"] for d in row] == tokens[b, p].tolist()
            np.testing.assert_allclose([d["score"] for d in row], values[b, p].numpy(), atol=1e-5)


def test_errors_are_one_line(wordpiece):
    model = fn.BertForMaskedLM.from_config(fn.EncoderConfig.tiny(vocab_size=len(wordpiece)), seed=0)
    with pytest.raises(InputError, match=r"text 1 \('no mask here'\) has no mask token \[MASK\]") as e:
        fn.fill_mask(model, wordpiece, ["a [MASK] b", "no mask here"])
    assert "\n" not in str(e.value)
    no_mask = transformers.BertTokenizerFast(vocab={"[PAD]": 0, "[UNK]": 1, "a": 2}, mask_token=None)
    with pytest.raises(InputError, match=r"the tokenizer BertTokenizer(Fast)? has no mask token"):
        fn.fill_mask(model, no_mask, ["a"])
    with pytest.raises(NarrowOverflowError, match="budget is P=1"):
        fn.fill_mask(model, wordpiece, ["[MASK] [MASK]"], max_positions=1)
    with pytest.raises(InputError, match="needs a masked-LM model"):
        fn.fill_mask(fn.BertModel.from_config(model.config), wordpiece, ["a [MASK]"])
    small = fn.BertForMaskedLM.from_config(fn.EncoderConfig.tiny(vocab_size=10), seed=0)
    with pytest.raises(InputError, match="vocab_size is 10"):
        fn.fill_mask(small, wordpiece, ["the quick [MASK]"])


def test_import_flax_narrow_still_does_not_import_torch():
    import subprocess

    code = "import sys, flax_narrow; flax_narrow.fill_mask; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert r.stdout.strip() == "False"
