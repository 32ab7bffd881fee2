"""YAML run configs onto the typed dataclasses of ``config.py``, with one-line errors.

Unknown keys get a "did you mean" suggestion, values are type-checked against the
dataclass annotations, and ``--set section.key=value`` overrides are parsed as YAML
scalars. Every problem names the file and the key.

Kept by hand rather than ``dacite.from_dict(..., Config(strict=True))``: tried with dacite
1.9.2 on the bad-config table, it accepts ``train.steps: true`` as 1 (bool is an int), says
"can not match "stepz" to any data class field" without the section or a "did you mean",
reports a bad choice as 'should be "Literal"' without listing the choices, and refuses
``lr: 2e-4`` (YAML 1.1 reads it as a string).
"""

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from .config import RunConfig


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and key."""


def _coerce(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(repr(a) for a in typing.get_args(annotation))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    return value


def _build(cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            dotted = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown key {dotted!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.steps=10"`` -> (["train", "steps"], 10)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply ``--set`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, quant, lora, ...)")
    for override in overrides:
        keys, value = parse_override(override)
        node = raw
        for key in keys[:-1]:
            existing = node.get(key)
            if existing is None:
                node[key] = existing = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {override!r}: {key!r} is not a section")
            node = existing
        node[keys[-1]] = value
    if overrides:
        source = "--set" if path is None else f"{source} with --set"
    try:
        return _build(RunConfig, raw, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def to_plain_dict(config) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value
    return convert(config)


def dump_run_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_plain_dict(config), sort_keys=False))
