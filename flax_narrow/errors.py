"""Typed exceptions. Library code raises these; CLIs turn them into one line and a non-zero exit code."""

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


class UntrainedModelError(FlaxNarrowError, ValueError):
    """A model is used in a role that needs training it never had, e.g. an MLM with a randomly initialised head
    as Agora's infilling transformation."""


class LabellerError(FlaxNarrowError, ValueError):
    """Agora's labeller S fails the procedure's condition (accuracy >= 2/3 on the probe part of the dev set)."""
