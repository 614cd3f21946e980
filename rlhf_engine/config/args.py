"""Command-line flags generated from config dataclasses, and `--config FILE` (YAML/JSON) loading.

The dataclass is the one source of truth: its fields become `--field-name` flags with the field's
`help` metadata; a config file supplies values that flags given on the command line override.
A field whose type is itself a config dataclass contributes its fields too: without a prefix when
its metadata says `flatten`, else prefixed (`prefix` metadata, default `<field>_`, e.g.
`--actor-zero-stage`). Config files use the same flat names as the flags (dashes or underscores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _sub_prefix(f: dataclasses.Field[Any], prefix: str) -> str:
    if f.metadata.get("flatten"):
        return prefix
    return prefix + f.metadata.get("prefix", f.name + "_")


@functools.lru_cache(maxsize=64)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config dataclass (resolving them is slow; classes do not change)."""
    return get_type_hints(cls)


def _leaves(
    cls: type, prefix: str = "", default: Any = None
) -> Iterator[tuple[str, dataclasses.Field[Any], Any, Any]]:
    """(flat name, field, type, default) for every non-dataclass field, recursively."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        value = getattr(default, f.name) if default is not None else _default_of(f)
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, _sub_prefix(f, prefix), value)  # type: ignore[arg-type]
        else:
            yield prefix + f.name, f, tp, value


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one flag per (nested) field of `cls`. Flags default to None, so a config file can fill
    what the command line did not give; `dataclass_from_args` applies the dataclass defaults."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    seen: set[str] = set()
    for name, f, tp, default in _leaves(cls, prefix):
        if name in seen:
            raise TypeError(f"{cls.__name__}: two fields give the flag --{name}")
        seen.add(name)
        help_text = f.metadata.get("help", "")
        if default not in (None, "", []):
            help_text += (
                f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
            )
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        origin = get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = get_args(tp)[0]
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
        elif origin is dict:
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp}")
        aliases = f.metadata.get("aliases", []) if not prefix else []
        group.add_argument("--" + name.replace("_", "-"), *aliases, **kwargs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (dashes or underscores) to values."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"config: cannot read {p}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise many types; the message is what matters
        raise ValueError(
            f"config: {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _build(cls: type[T], prefix: str, values: dict[str, Any]) -> T:
    hints = _hints(cls)  # type: ignore[arg-type]  # classes are hashable
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):  # one level of nesting (DataConfig, ModelOptions)
            sub_prefix = _sub_prefix(f, prefix)
            base = _default_of(f)
            sub = {
                name[len(sub_prefix) :]: values[name]
                for name, *_ in _leaves(tp, sub_prefix)  # type: ignore[arg-type]
                if name in values
            }
            kwargs[f.name] = dataclasses.replace(base, **sub) if sub else base
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """A config-file value checked (and int→float widened) against the field's type."""
    origin = get_origin(tp)
    if value is None:
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is Literal:
        if value in get_args(tp):
            return value
        raise ValueError(f"config: {name} must be one of {list(get_args(tp))}, got {value!r}")
    elif origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(name, get_args(tp)[0], v) for v in items]
    kind = getattr(tp, "__name__", str(tp))
    raise ValueError(f"config: {name} must be {kind}, got {value!r}")


def option_names(cls: type, prefix: str = "") -> list[str]:
    """The flat option names of a config dataclass (its command's flags, with underscores)."""
    return [name for name, _, _, _ in _leaves(cls, prefix)]


def dataclass_from_args(
    cls: type[T], ns: argparse.Namespace, *, prefix: str = "", file_values: dict[str, Any] | None = None
) -> T:
    """Build `cls` from flags (highest priority), then `file_values`, then the dataclass defaults.

    Unknown keys in `file_values` are an error naming them (a typo must not be ignored silently).
    """
    types_ = {name: tp for name, _, tp, _ in _leaves(cls, prefix)}
    names = list(types_)
    values: dict[str, Any] = {}
    if file_values:
        unknown = sorted(set(file_values) - set(names))
        if unknown:
            raise ValueError(f"config: unknown option(s) {unknown}; known options are the command's flags")
        values.update({k: _coerce(k, types_[k], v) for k, v in file_values.items()})
    for name in names:
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    return _build(cls, prefix, values)
