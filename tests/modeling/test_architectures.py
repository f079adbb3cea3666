"""One table of architectures (``flax_narrow.modeling.ARCHITECTURES``): every architecture name is written there
only, and every lookup (classes, --head, export names, PyTorch references, fine-tuning tasks) derives from it."""

from __future__ import annotations

import ast
import os

import pytest

import flax_narrow as fn
from flax_narrow.modeling import ARCHITECTURES, HEADS, MODEL_CLASSES, architecture_for, architecture_named

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = os.path.join("flax_narrow", "modeling", "__init__.py")
NAMES = {n for a in ARCHITECTURES for n in a.names} | {a.torch for a in ARCHITECTURES}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _all_lists(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            out |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return out


def architecture_strings(root: str = ROOT) -> dict[str, list[str]]:
    """file -> the architecture names written in it as string literals (docstrings and ``__all__`` aside)."""
    found: dict[str, list[str]] = {}
    for folder in ("flax_narrow", "train", "convert"):
        for directory, _, files in os.walk(os.path.join(root, folder)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(directory, f)
                tree = ast.parse(open(path, encoding="utf-8").read(), path)
                skip = _docstrings(tree) | _all_lists(tree)
                hits = [
                    f"{node.value} (line {node.lineno})"
                    for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in NAMES and id(node) not in skip
                ]
                if hits:
                    found[os.path.relpath(path, root)] = hits
    return found


def test_architecture_names_are_written_in_the_table_only():
    found = architecture_strings()
    assert TABLE in found  # the check sees the table itself
    others = {k: v for k, v in found.items() if k != TABLE}
    assert not others, others


def test_no_name_surgery():
    """Names are looked up in the table, never built by splicing prefixes ("NarrowBert" + name[len("Bert"):])."""
    for folder in ("flax_narrow", "train", "convert"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(directory, f), encoding="utf-8").read()
                    assert 'len("Bert")' not in text and '"NarrowBert" +' not in text, f


def test_the_table_is_consistent():
    assert MODEL_CLASSES == {a.cls.__name__: a.cls for a in ARCHITECTURES}
    assert all(a.cls.hf_architecture == a.cls.__name__ for a in ARCHITECTURES)
    assert fn.BortForMaskedLM.hf_architecture == "BertForMaskedLM"  # BORT's names are aliases of BERT's classes

    class MyMaskedLM(fn.NarrowBertForMaskedLM):  # a user's subclass: its checkpoints are its parent's
        pass

    assert MyMaskedLM.hf_architecture == "NarrowBertForMaskedLM"
    names = [n for a in ARCHITECTURES for n in a.names]
    assert len(names) == len(set(names)), "a name read as two classes"
    assert {a.head for a in ARCHITECTURES if a.family == "bert"} == set(HEADS)


@pytest.mark.parametrize("row", ARCHITECTURES, ids=lambda a: a.name)
def test_every_lookup_derives_from_the_table(row):
    from flax_narrow.convert import export, plan, verify
    from flax_narrow.train import tasks

    bert, narrow = fn.EncoderConfig.tiny(), fn.EncoderConfig.tiny_narrowbert()
    config = narrow if row.family == "narrow" else bert
    for name in row.names:  # every name a config.json may carry loads as this head's class
        assert plan.model_class(name, config) is row.cls
    assert plan.head_class(row.head, config) is row.cls
    assert export.hf_architecture_name(row.name, config) == row.name
    if row.torch_roberta:
        assert export.hf_architecture_name(row.name, bert.replace(model_type="roberta")) == row.torch_roberta
        assert verify.TORCH_CLASSES["roberta"][row.name] == row.torch_roberta
    if row.family == "bert":
        assert verify.TORCH_CLASSES["bert"][row.name] == row.torch
    kinds = [k for k, h in tasks.TASK_HEADS.items() if h == row.head]
    for kind in kinds:
        assert tasks.model_class(tasks.Task(kind, ("a", "b")), row.family == "narrow") is row.cls


def test_torch_narrowbert_classes_come_from_the_table():
    pytest.importorskip("torch")
    from flax_narrow.convert import torch_narrowbert

    narrow = [a for a in ARCHITECTURES if a.family == "narrow"]
    assert {k: v.__name__ for k, v in torch_narrowbert.TORCH_NARROWBERT_CLASSES.items()} == {
        a.name: a.torch for a in narrow
    }


def test_lookups_refuse_what_the_table_lacks():
    from flax_narrow.convert import plan
    from flax_narrow.errors import ConfigError

    assert architecture_named("GPT2LMHeadModel") is None and architecture_for("ner", False) is None
    with pytest.raises(ConfigError, match="'GPT2LMHeadModel' is not one flax-narrow implements"):
        plan.model_class("GPT2LMHeadModel", fn.EncoderConfig.tiny())
    with pytest.raises(ConfigError, match="has no question-answering head"):
        plan.head_class("question-answering", fn.EncoderConfig.tiny_narrowbert())
