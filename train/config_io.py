"""The config machinery every command shares: reading a JSON/YAML config file, ``section.field=value``
overrides, sections of frozen dataclasses updated with values coerced to their field types (an unknown field
is refused with the valid ones listed), and the one spelling of preset names.

:mod:`flax_narrow.train.config` (pretrain) and :mod:`flax_narrow.train.finetune_config` (finetune, agora)
build their typed configs with these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax_narrow.errors import ConfigError


def jsonable(value: Any) -> Any:
    """``value`` (a dataclass's ``asdict``) with tuples as lists, at any depth: what ``json.dump`` writes."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def canonical_name(name: str, choices: Iterable[str]) -> str | None:
    """The entry of ``choices`` that ``name`` spells, or None: case, ``-`` and ``_`` do not matter
    (``tiny_bert`` is ``tiny-bert``), and where that finds nothing neither do the separators (``SST-2`` is
    ``sst2``). Every command spells its preset names this way (pretrain presets, ``finetune --model`` presets,
    ``--glue``); error messages list them with hyphens."""
    key = str(name).strip().lower().replace("_", "-")
    spelled = {c.lower().replace("_", "-"): c for c in choices}
    if key in spelled:
        return spelled[key]
    bare = {k.replace("-", ""): c for k, c in spelled.items()}
    return bare.get(key.replace("-", ""))


def hyphenated(names: Iterable[str]) -> list[str]:
    """``names`` in the one spelling of error messages (hyphens), sorted."""
    return sorted(n.replace("_", "-") for n in names)


# --------------------------------------------------------------------------------------------- loading
def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A nested dict from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def update_section(current: Any, values: dict[str, Any], section: str, where: str) -> Any:
    """``current`` (a config dataclass) with ``values`` coerced to its field types; an unknown field is refused
    with the valid ones listed. Shared by every command's config (pretrain, finetune, agora)."""
    return dataclasses.replace(current, **section_values(type(current), values, section, where))


def section_values(cls: type, values: Mapping[str, Any], section: str, where: str) -> dict[str, Any]:
    """``values`` coerced to the field types of the config dataclass ``cls``; an unknown field is refused with
    the valid ones listed (``WHERE: SECTION has no field(s) [...]; fields are [...]``)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: section {section!r} must be a mapping, got {type(values).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: {section} has no field(s) {unknown}; fields are {sorted(types_)}")
    return {k: coerce(v, types_[k], f"{section}.{k}") for k, v in values.items()}


def check_sections(data: Mapping[str, Any], sections: Iterable[str], top_level: Iterable[str], where: str) -> None:
    """Refuse a key of a config file (or of ``--set``) that is neither a section nor a top-level field."""
    sections, top_level = sorted(sections), sorted(top_level)
    unknown = sorted(set(data) - set(sections) - set(top_level))
    if unknown:
        extra = f" (top-level fields: {', '.join(top_level)})" if top_level else ""
        raise ConfigError(f"{where}: unknown section(s) {unknown}; sections are {sections}{extra}")


def parse_overrides(overrides: Sequence[str], sections: Sequence[str], top_level: Sequence[str] = ()) -> dict[str, Any]:
    """``["finetune.learning_rate=1e-4", "output_dir=runs/x"]`` -> {section: {field: value}, top: value}, the
    sections checked (``top_level`` names the fields set without a section)."""
    nested: dict[str, Any] = {}
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not of the form section.key=value")
        key, value = text.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in top_level:
            nested[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"override key {key!r} must be <section>.<field> with section in {sorted(sections)}")
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


# --------------------------------------------------------------------------------------------- coercion
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (often a CLI string) to the annotated type ``tp``; raises ConfigError naming ``name``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot be null")
    if origin is dict:
        return _coerce_mapping(value, args[1] if len(args) == 2 else Any, name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(coerce(v, inner, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _coerce_mapping(value: Any, inner: Any, name: str) -> dict[str, Any]:
    """A mapping from a file's mapping, or from a ``--set`` string: a YAML flow mapping (``{text_a: s, label: y}``)
    or ``key=value`` items separated by commas (``text_a=s,label=y``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"{name}: not a mapping: {value!r}") from None
        else:
            items = [x.strip() for x in text.split(",") if x.strip()]
            bad = [x for x in items if "=" not in x or not x.partition("=")[0].strip()]
            if bad:
                raise ConfigError(f"{name}: expected key=value items or a {{key: value}} mapping, got {bad[0]!r}")
            value = {k.strip(): v.strip() for k, v in (x.split("=", 1) for x in items)}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return {str(k): coerce(v, inner, f"{name}.{k}") for k, v in value.items()}
