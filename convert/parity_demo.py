"""A BORT-shaped PyTorch checkpoint stored the way the hub's ``amazon/bort`` is, and the parity demo on it.

``write_bort_like_checkpoint`` is used by tests, benchmarks and the conversion notebook; ``run_parity_demo``
(``flax-narrow demo --parity``) loads such a checkpoint, checks it against PyTorch, checks the static-shape
gather against the dense logits and round-trips it through ``save_pretrained``.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def write_bort_like_checkpoint(
    directory: str, *, hidden: int = 256, layers: int = 4, vocab: int = 50265, seed: int = 0
) -> str:
    """A BORT-proportioned random ``BertForMaskedLM`` saved like ``amazon/bort``: fp16 .bin, untied decoder."""
    import torch
    from transformers import BertConfig
    from transformers import BertForMaskedLM as TorchMLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        intermediate_size=hidden * 3 // 4,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        architectures=[TorchMLM.__name__],
    )
    model = TorchMLM(cfg).eval()
    sd = {k: v.detach().clone().half() for k, v in model.state_dict().items()}
    sd["cls.predictions.decoder.weight"] = torch.randn_like(sd["cls.predictions.decoder.weight"])  # stale copy
    os.makedirs(directory, exist_ok=True)
    cfg.save_pretrained(directory)
    torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
    return directory


def run_parity_demo(out_dir: str | None = None) -> dict[str, float]:
    """The former demo: a BORT-shaped fp16 checkpoint with a stale decoder copy, loaded and checked against
    PyTorch, MLM logits through the static-shape gather, and a save_pretrained round trip."""
    import jax

    from flax_narrow import BortForMaskedLM
    from flax_narrow.ops import positions_from_mask

    from .verify import random_batch, verify_against_torch

    jax.config.update("jax_default_matmul_precision", "highest")
    out_dir = out_dir or tempfile.mkdtemp(prefix="flax-narrow-parity-")
    figures: dict[str, float] = {}
    src = write_bort_like_checkpoint(os.path.join(out_dir, "bort-like-hf"))
    print(f"[1/4] wrote a BORT-shaped fp16 PyTorch checkpoint with a stale decoder copy: {src}")
    t0 = time.perf_counter()
    model = BortForMaskedLM.from_pretrained(src)
    figures["load_s"] = time.perf_counter() - t0
    print(f"[2/4] BortForMaskedLM.from_pretrained: {model.num_parameters():,} parameters in {figures['load_s']:.2f} s")
    batch = random_batch(model.config, batch=4, length=32)
    v = verify_against_torch(model, src, batch)
    figures["max_abs_diff_vs_torch"] = v.max_abs_diff
    print(f"[3/4] logits {v.shape} vs transformers (PyTorch): max abs diff {v.max_abs_diff:.2e}")
    mask = np.zeros(batch["input_ids"].shape, bool)
    mask[:, [3, 7, 11]] = True
    positions, valid = positions_from_mask(mask, max_positions=4)
    sparse = model(batch["input_ids"], batch["attention_mask"], narrow_positions=positions, narrow_valid=valid)
    dense = model(batch["input_ids"], batch["attention_mask"])
    gap = float(np.abs(np.asarray(sparse.logits[:, :3]) - np.asarray(dense.logits[:, [3, 7, 11]])).max())
    figures["gathered_vs_dense"] = gap
    print(f"      MLM logits at 3 masked positions (P=4 static): equal to the dense logits there within {gap:.1e}")
    saved = model.save_pretrained(os.path.join(out_dir, "bort-like-flax"))
    again = BortForMaskedLM.from_pretrained(saved)
    same = float(
        np.abs(np.asarray(again(batch["input_ids"], batch["attention_mask"]).logits) - np.asarray(dense.logits)).max()
    )
    figures["roundtrip_diff"] = same
    print(f"[4/4] save_pretrained -> from_pretrained round trip: {saved} (max abs diff {same:.1e})")
    return figures
