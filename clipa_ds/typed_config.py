"""Generic strict loading of typed dataclasses from plain data, and dotted `a.b=c` overrides.

`from_dict` rejects unknown keys and values of the wrong type with a message that names the key
and what is allowed; it knows nothing about clipa-ds's sections.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = tuple(allowed)
    check(value in allowed, f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")




def get_dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{key} must be a mapping of fields of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        check(isinstance(value, list), f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        check(isinstance(value, bool), f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be an integer") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        check(isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{where}{name}") for name, value in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {where}{missing[0]}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}: {err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", parsed c). Values are parsed as YAML scalars/lists (1e-3, true, [1,2])."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example run.dir=/tmp/run)")
    key, raw = text.split("=", 1)
    key = key.strip()
    check(bool(key), f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted; stage lists accept an index or a stage name) in the recipe dict."""
    parts = key.split(".")
    node: Any = data
    path = []
    for part in parts[:-1]:
        path.append(part)
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(path))
        else:
            check(isinstance(node, dict), f"cannot set {key}: {'.'.join(path[:-1])} is not a section")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, key)
        node[index] = value
    else:
        node[last] = value


def _list_index(items: list[Any], part: str, key: str) -> int:
    if part.isdigit():
        index = int(part)
        check(index < len(items), f"{key}: index {index} is out of range (there are {len(items)})")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    check(part in names, f"{key}: no stage named {part!r}; stages are {names}")
    return names.index(part)


def _list_item(items: list[Any], part: str, key: str) -> Any:
    return items[_list_index(items, part, key)]


