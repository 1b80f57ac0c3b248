"""The one typed-config engine: dataclass configs from JSON / YAML / TOML files and `key=value` overrides.

Every config (training, pipeline) is a tree of dataclasses whose fields have defaults. A value,
a file's or an override's text alike, becomes its field's annotated type by one set of rules:
- bool: a boolean, or true/false, yes/no, on/off, 1/0 (any case);
- int: an integral number, `1e3` included (1000); `1.5` is an error, and so is a boolean;
- float: any number; str: the text as written (a file's integer or boolean becomes the text
  an override would have written; a file's null is "");
- Optional[X] or X | None: null, none or an empty text is None, anything else an X;
- list[X]: a list (an override writes JSON: `a=["x", "y"]`); dict[K, V]: a mapping (an override
  writes JSON `{..}`, or sets one entry: `envs.train.env.NCCL_DEBUG=INFO`); Any: kept as given;
- a nested dataclass: a mapping; the keys it leaves out keep their defaults.
An unknown key names the closest known keys. Every error is one line naming the key and the value.
Annotations may be strings (`from __future__ import annotations`): they are resolved with
`typing.get_type_hints`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

from megatron_lopd.errors import ConfigError

Config = TypeVar("Config")
FILE_SUFFIXES = (".json", ".yaml", ".yml", ".toml")
_NONE_WORDS = ("", "none", "null")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_EXPECTED = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The fix for an unknown name: the closest known names, else all of them."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3)
    return f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(known)}"


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}", did_you_mean(key.rsplit(".", 1)[-1], known))


def without_none(hint: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] and X | None; (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def _scalar(value: Any, typ: type, key: str) -> Any:
    text = value.strip().lower() if isinstance(value, str) else None
    if typ is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        if text in _BOOL_WORDS:
            return _BOOL_WORDS[text]
    elif typ is str:
        if isinstance(value, str):
            return value
        if value is None:  # YAML's `key:` with nothing after it
            return ""
        if isinstance(value, bool):  # what the override `key=true` gives: the two sources agree
            return "true" if value else "false"
        if isinstance(value, int):  # a float is refused: YAML's 1.10 would silently become "1.1"
            return str(value)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if typ is float and number is not None:
            return number
        if typ is int:
            if isinstance(value, int):
                return value
            if text is not None and text.lstrip("+-").isdigit():
                return int(text)  # exact beyond float's 2**53
            if number is not None and math.isfinite(number) and number == int(number):
                return int(number)  # 1e3, 1000.0
    raise ConfigError(f"{key}={value!r} is not {_EXPECTED[typ]}", f"set {key} to {_EXPECTED[typ]}")


def _convert(value: Any, hint: Any, key: str, default: Any = None) -> Any:
    """`value` (a file's value or an override's text) as the type `hint`; `default` is the field's
    current value, the base of a nested section."""
    hint, optional = without_none(hint)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", default)
    container = typing.get_origin(hint) or hint
    if container in (list, dict):
        if isinstance(value, str) and value.lstrip().startswith("[" if container is list else "{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # refused just below, with the syntax to use
        if not isinstance(value, container):
            example = '["a", "b"]' if container is list else '{"a": "b"}'
            raise ConfigError(f"{key}={value!r} is not a {container.__name__}", f"write it in JSON: {key}='{example}'")
        args = typing.get_args(hint)
        if container is list:
            return [_convert(item, args[0] if args else Any, f"{key}[{i}]") for i, item in enumerate(value)]
        key_type, value_type = args or (Any, Any)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if hint in _EXPECTED:
        return _scalar(value, hint, key)
    raise TypeError(f"{key}: the config engine has no rule for the type {hint}")  # a config class's bug, not user input


def _build(cls: type[Config], data: Any, prefix: str, base: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix[:-1]} is a section, got {data!r}", f"set its fields: {prefix}FIELD=VALUE")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(f"{prefix}{key}", fields)
    kwargs = {}
    for name, f in fields.items():
        if name in data:  # a nested section starts from the base's or the field's default, not its class's
            default = getattr(base, name) if base is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            kwargs[name] = _convert(data[name], hints[name], prefix + name, default)
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
    return cls(**kwargs)


def from_dict(cls: type[Config], data: Any, where: str = "", base: Config | None = None) -> Config:
    """A config from a (nested, partial) mapping: the keys it leaves out keep `base`'s values,
    or the defaults. `where` (a file) starts every error."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"the top level must be a mapping of config keys, got {type(data).__name__}",
                              "write section: {field: value}")
        return _build(cls, data, "", base)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(f"{where}: {exc.what}", exc.fix) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """`a.b=value` strings applied to a config; returns a new config (the input is not modified)."""
    data = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value", "write overrides as section.field=value, e.g. optimizer.lr=1e-5")
        node, hints, parts = data, typing.get_type_hints(type(config)), key.split(".")
        for depth, part in enumerate(parts):
            if part not in hints:
                raise _unknown_key(key, hints)
            hint, last = without_none(hints[part])[0], depth == len(parts) - 1
            if dataclasses.is_dataclass(hint) and not last:
                node, hints = node[part], typing.get_type_hints(hint)
            elif dataclasses.is_dataclass(hint):
                raise ConfigError(f"{key} is a section, not a value", f"set one of its fields: {key}.FIELD=VALUE")
            elif last:
                node[part] = text  # converted with everything else by from_dict
            elif (typing.get_origin(hint) or hint) is dict:  # one entry: the rest of the key is its name
                node[part] = {**(node[part] or {}), ".".join(parts[depth + 1:]): text}
                break
            else:
                raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value, not a section", f"check the key {key!r}")
    return from_dict(type(config), data)


def load_file(path: str | Path) -> dict[str, Any]:
    """The mapping a .json, .yaml/.yml or .toml config file holds (YAML needs PyYAML)."""
    path = Path(path)
    if path.suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}", "use a .json, .yaml/.yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", "check the path")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML, which is not installed",
                              "pip install pyyaml, or write the config as JSON or TOML") from None
        parse, syntax_errors = (lambda text: yaml.safe_load(text) or {}), yaml.YAMLError  # {}: an empty file
    else:
        parse, syntax_errors = (json.loads if path.suffix == ".json" else tomllib.loads), ValueError
    try:
        data = parse(path.read_text())
    except syntax_errors as exc:
        raise ConfigError(f"{path}: cannot parse ({' '.join(str(exc).split())})", "fix the file's syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys", "write section: {field: value}")
    return data
