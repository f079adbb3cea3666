"""Typed exceptions: every exception class of flax-narrow lives here. Library code raises these; the CLIs turn
them into one line on stderr and exit code 2.

The classes that subclass ``ValueError`` / ``FloatingPointError`` as well do so because a plain exception of
that kind was raised in their place before; ``except ValueError`` keeps catching them.
"""

from __future__ import annotations


class FlaxNarrowError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(FlaxNarrowError, ValueError):
    """A configuration value is invalid or contradicts another one (or the weights)."""


class CheckpointError(FlaxNarrowError):
    """A checkpoint cannot be read or does not match the model (missing/unexpected/mis-shaped keys)."""


class NarrowOverflowError(FlaxNarrowError, ValueError):
    """More positions were selected in a row than the static budget P allows."""


class InputError(FlaxNarrowError, ValueError):
    """An input (a text, a batch, a tokenizer) cannot be used as asked, e.g. a fill-mask text without a mask."""


class DataError(FlaxNarrowError):
    """A data file, split or column that does not fit the task."""


class NonFiniteError(FlaxNarrowError, FloatingPointError):
    """The loss or gradient norm became NaN/inf (``train.on_nonfinite=stop``)."""


class NoTorchReference(FlaxNarrowError):
    """No PyTorch class to compare this architecture with (verification is skipped, not failed)."""
