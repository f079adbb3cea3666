"""The demo run by ``make demo``: the main job, offline, on CPU, in a few minutes.

It pretrains a tiny NarrowBERT (hidden 128, 4 layers of which F=2 full length, L=128, P=20) and the same-size
BERT baseline with the same recipe and the same batches of an embedded default corpus — the docstrings of
Python's standard library, present on every machine, with a WordPiece tokenizer trained on them — then prints
both loss curves, the measured training throughput of each (timed after compilation, same batch shapes, in
one process) and their ratio, saves the NarrowBERT checkpoint (orbax train state, and a ``save_pretrained``
directory with its tokenizer), exports it to HF PyTorch format and loads the export back to check it.

``write_bort_like_checkpoint`` (a BORT-shaped checkpoint stored the way the hub's ``amazon/bort`` is) is used
by tests and benchmarks; ``run_parity_demo`` is the former demo, a BORT checkpoint round trip against PyTorch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PRESETS = ("demo-narrowbert", "demo-bert")


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


def _window_means(history: list[dict[str, Any]], key: str, every: int) -> list[tuple[int, float]]:
    out = []
    for end in range(every, len(history) + 1, every):
        chunk = history[end - every : end]
        out.append((chunk[-1]["step"], float(np.mean([h[key] for h in chunk]))))
    return out


def loss_table(results: dict[str, Any], every: int = 10) -> list[str]:
    """A compact text table: mean training loss and accuracy per window of ``every`` steps, then evaluations."""
    names = list(results)
    cols = {
        n: (_window_means(r.history, "loss", every), _window_means(r.history, "accuracy", every))
        for n, r in results.items()
    }
    head = f"{'step':>8} " + " ".join(f"{n + ' loss':>18} {'acc':>6}" for n in names)
    lines = [head, "-" * len(head)]
    for i, (step, _) in enumerate(cols[names[0]][0]):
        row = f"{step:>8} " + " ".join(f"{cols[n][0][i][1]:>18.3f} {cols[n][1][i][1]:>6.3f}" for n in names)
        lines.append(row)
    for i, ev in enumerate(results[names[0]].evals):
        row = f"{'eval@' + str(ev['step']):>8} " + " ".join(
            f"{results[n].evals[i]['eval_loss']:>18.3f} {results[n].evals[i]['eval_accuracy']:>6.3f}" for n in names
        )
        lines.append(row)
    return lines


def run_demo(
    out_dir: str | None = None,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    export: bool = True,
) -> dict[str, float]:
    """Pretrain NarrowBERT and its BERT baseline, print the comparison, save and export; returns the figures.

    Args:
      out_dir: where runs, checkpoints and exports go (default: a fresh temporary directory).
      steps: training steps of each model (default: the preset's, 150).
      overrides: extra ``section.field=value`` settings applied to both runs (tests shrink the models).
      export: save_pretrained + HF export + reload check of the NarrowBERT run.
    """
    import jax

    from flax_narrow.train.config import load_config
    from flax_narrow.train.loop import pretrain

    out_dir = out_dir or tempfile.mkdtemp(prefix="flax-narrow-demo-")
    figures: dict[str, float] = {}
    results = {}
    t_all = time.perf_counter()
    for i, name in enumerate(PRESETS):
        sets = list(overrides) + [f"output_dir={os.path.join(out_dir, name)}", "train.progress_bar=false"]
        if steps is not None:
            sets.append(f"train.steps={steps}")
        cfg = load_config(name, None, sets)
        m = cfg.model
        kind = (
            f"NarrowBERT (F={m.num_full_layers} full + {m.num_narrow_layers} narrow layers)" if m.is_narrow else "BERT"
        )
        print(
            f"[{i + 1}/{len(PRESETS) + 1}] pretraining {kind}: hidden {m.hidden_size}, {m.num_hidden_layers} layers, "
            f"L={cfg.data.seq_len}, P={cfg.train.max_predictions}, batch {cfg.train.global_batch_size}, "
            f"{cfg.train.steps} steps on {jax.devices()[0].platform} ...",
            flush=True,
        )
        t0 = time.perf_counter()
        r = pretrain(cfg)
        results[name] = r
        print(
            f"      {len(r.tokenizer)}-token WordPiece vocabulary; compiled in {r.compile_seconds:.1f} s; "
            f"{r.tokens_per_second or 0:,.0f} tokens/s after compilation; run took {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    narrow, bert = (results[n] for n in PRESETS)
    print("\nMLM loss and accuracy (mean over each 10-step window; eval = held-out docstrings):")
    print("\n".join("  " + line for line in loss_table(results)))
    ratio = (narrow.steps_per_second or 0.0) / (bert.steps_per_second or float("inf"))
    flops_ratio = bert.flops_per_step / narrow.flops_per_step
    figures.update(
        narrow_final_loss=narrow.history[-1]["loss"],
        bert_final_loss=bert.history[-1]["loss"],
        narrow_tokens_per_s=narrow.tokens_per_second or 0.0,
        bert_tokens_per_s=bert.tokens_per_second or 0.0,
        throughput_ratio=ratio,
        flops_ratio=flops_ratio,
    )
    print(
        f"\nThroughput (train steps, same batch shapes, after compilation): NarrowBERT "
        f"{figures['narrow_tokens_per_s']:,.0f} tokens/s, BERT {figures['bert_tokens_per_s']:,.0f} tokens/s "
        f"-> NarrowBERT/BERT = {ratio:.2f}x  (analytic ratio of training FLOPs per step: {flops_ratio:.2f}x)"
    )
    if export:
        figures.update(_save_and_export(narrow, out_dir, len(PRESETS) + 1))
    figures["seconds"] = time.perf_counter() - t_all
    print(f"\ndone in {figures['seconds']:.0f} s; everything is under {out_dir}")
    return figures


def _save_and_export(result: Any, out_dir: str, n: int) -> dict[str, float]:
    """save_pretrained (+ tokenizer) -> HF export -> from_pretrained of the export; the logits must agree."""
    import jax

    from flax_narrow.convert.export import export_checkpoint
    from flax_narrow.modeling import BertForMaskedLM

    model = result.model()
    flax_dir = model.save_pretrained(os.path.join(out_dir, "narrowbert-flax"))
    result.tokenizer.save_pretrained(flax_dir)
    hf_dir = os.path.join(out_dir, "narrowbert-hf")
    report = export_checkpoint(flax_dir, hf_dir, overwrite=True)
    again = BertForMaskedLM.from_pretrained(hf_dir)
    ids = np.asarray(result.tokenizer(["return the number of items in the queue."])["input_ids"])
    positions = np.asarray([[1, 3, 5]])
    valid = np.ones(positions.shape, bool)
    a = model(ids, narrow_positions=positions, narrow_valid=valid).logits
    b = again(ids, narrow_positions=positions, narrow_valid=valid).logits
    diff = float(jax.numpy.abs(a - b).max())
    print(
        f"[{n}/{n}] checkpoints: orbax train state under {result.checkpoint_dir} (steps {_steps(result)}), "
        f"save_pretrained -> {flax_dir}\n      exported to HF PyTorch format ({report.layout}): {hf_dir}\n"
        f"      reloaded the export with from_pretrained: MLM logits equal to the trained model's within {diff:.1e}"
    )
    return {"export_reload_max_abs_diff": diff}


def _steps(result: Any) -> str:
    from flax_narrow.train.checkpoint import Checkpointer

    return ", ".join(str(s) for s in Checkpointer(result.checkpoint_dir).all_steps())


def run_parity_demo(out_dir: str | None = None) -> dict[str, float]:
    """The former demo: a BORT-shaped fp16 checkpoint with a stale decoder copy, loaded and checked against
    PyTorch, MLM logits through the static-shape gather, and a save_pretrained round trip."""
    import jax

    from flax_narrow import BortForMaskedLM
    from flax_narrow.convert.verify import random_batch, verify_against_torch
    from flax_narrow.ops import positions_from_mask

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


def register(sub) -> None:
    """``flax-narrow demo``."""
    p = sub.add_parser("demo", help="offline pretraining demo: NarrowBERT vs BERT on CPU (a few minutes)")
    p.add_argument("--out", default=None, help="output directory (default: a fresh temporary directory)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 150)")
    p.add_argument("--parity", action="store_true", help="run the BORT checkpoint parity demo instead")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    logging.getLogger("flax_narrow").setLevel(logging.WARNING)
    if args.parity:
        run_parity_demo(args.out)
    else:
        run_demo(args.out, steps=args.steps)
    return 0
