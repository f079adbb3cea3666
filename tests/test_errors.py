"""Every exception class lives in ``flax_narrow/errors.py``, and library code raises only those (read with ``ast``
over flax_narrow/, train/ and convert/), so that the CLIs' one handler turns every user-facing error into one line."""

from __future__ import annotations

import ast
import builtins
import os

import pytest

from flax_narrow import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN_EXCEPTIONS = {
    n
    for n in dir(builtins)
    if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)
}


def _sources():
    for folder in ("flax_narrow", "train", "convert"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(directory, f)
                    yield os.path.relpath(path, ROOT), ast.parse(open(path, encoding="utf-8").read(), path)


def _raised_name(node: ast.Raise) -> str | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return exc.id if isinstance(exc, ast.Name) else None


# NotImplementedError: abstract methods of an interface; ImportError: a module of an optional extra (torch)
# imported without it, which Python code expects to catch as ImportError; KeyboardInterrupt: a Ctrl-C that a
# worker process reported, raised again in the caller's process (the CLI turns it into exit 130).
ALLOWED = {"NotImplementedError", "ImportError", "KeyboardInterrupt"}


def test_no_builtin_exception_is_raised():
    """``raise ValueError(...)`` and friends reach users past the CLI's handler as a traceback."""
    found = [
        f"{path}:{node.lineno} raises {_raised_name(node)}"
        for path, tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise) and node.exc is not None and _raised_name(node) in BUILTIN_EXCEPTIONS - ALLOWED
    ]
    assert not found, found


def test_every_exception_class_is_in_errors_py():
    found = [
        f"{path}:{node.lineno} class {node.name}"
        for path, tree in _sources()
        if path != os.path.join("flax_narrow", "errors.py")
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in BUILTIN_EXCEPTIONS)
            for b in node.bases
        )
    ]
    assert not found, found


def test_moved_classes_keep_their_old_import_paths():
    from flax_narrow.convert.verify import NoTorchReference
    from flax_narrow.train.finetune_data import DataError
    from flax_narrow.train.loop import NonFiniteError

    assert (DataError, NonFiniteError, NoTorchReference) == (
        errors.DataError,
        errors.NonFiniteError,
        errors.NoTorchReference,
    )


@pytest.mark.parametrize(
    "cls,builtin",
    [(errors.ConfigError, ValueError), (errors.InputError, ValueError), (errors.NonFiniteError, FloatingPointError)],
)
def test_typed_errors_are_still_caught_as_the_builtin_they_replaced(cls, builtin):
    assert issubclass(cls, errors.FlaxNarrowError) and issubclass(cls, builtin)
