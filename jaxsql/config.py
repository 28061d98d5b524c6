"""Frozen, self-validating configuration dataclasses and their YAML loading.

Every config in jaxsql is a frozen dataclass whose ``__post_init__`` calls
`require` for each constraint, so a bad value fails at construction with the
field's name. `from_dict` builds nested configs from plain data (YAML) and
rejects unknown keys (a key listed in the class's ``REMOVED_KEYS`` gets its
own message saying what to write instead); `apply_overrides` applies
``a.b=value`` command-line overrides (values parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from jaxsql.errors import ConfigError, JaxsqlError

T = TypeVar("T")


def require(ok: bool, cls_name: str, field: str, message: str) -> None:
    """Raise `ConfigError` naming ``cls_name.field`` unless `ok`."""
    if not ok:
        raise ConfigError(f"{cls_name}.{field}: {message}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: may not be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return types.MappingProxyType(
            {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
        )
    if tp is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept what float() reads exactly.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build the frozen dataclass `cls` from plain data, rejecting unknown keys."""
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    removed = getattr(cls, "REMOVED_KEYS", {})
    for key in unknown:
        if key in removed:
            raise ConfigError(f"{where}.{key}: no longer exists; {removed[key]}")
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config: Any) -> Any:
    """Plain (YAML/JSON-ready) data of a config dataclass."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to nested plain data (a new dict is returned)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        from jaxsql.paths import as_path

        p = as_path(path)  # a local file or gs://... (jaxsql.paths)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def read_saved_settings(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`, a settings file a resumable command wrote.

    An unreadable file (not JSON, not an object, an OS error) is one
    `JaxsqlError` naming it as `what` (e.g. "demo marker"), with the advice to
    choose another output; nothing is overwritten.
    """
    from jaxsql.paths import as_path

    try:
        saved = json.loads(as_path(path).read_text())  # local or gs://
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise JaxsqlError(f"{path}: unreadable {what} ({e}); choose another --out") from None
    if not isinstance(saved, dict):
        raise JaxsqlError(f"{path}: unreadable {what} (not a JSON object); choose another --out")
    return saved


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                     keys: Sequence[str] | None = None) -> list[str]:
    """Sorted names whose value differs between `saved` and `current`.

    `keys` limits the comparison (default: every key either side has, so a
    setting that appeared or disappeared counts as changed).
    """
    names = set(saved) | set(current) if keys is None else set(keys)
    return sorted(k for k in names if saved.get(k) != current.get(k))
