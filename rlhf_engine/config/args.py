"""Command-line flags generated from config dataclasses, and `--config FILE` (YAML/JSON) loading.

The dataclass is the one source of truth: its fields become `--field-name` flags with the field's
`help` metadata; a config file supplies values that flags given on the command line override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one flag per field of `cls`. Defaults are left unset (None) so a config file can fill
    what the command line did not give; `dataclass_from_args` applies the dataclass defaults."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = _default_of(f)
        if default is not None:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None, "help": help_text}
        origin = get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = get_args(tp)[0]
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            continue  # nested configs are set through --config files
        group.add_argument(flag, **kwargs)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of field names (dashes or underscores) to values."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"config: cannot read {p}: {e.strerror}") from None
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def dataclass_from_args(cls: type[T], ns: argparse.Namespace, *, prefix: str = "",
                        file_values: dict[str, Any] | None = None) -> T:  # fmt: skip
    """Build `cls` from flags (highest priority), then `file_values`, then the dataclass defaults.

    Unknown keys in `file_values` are an error naming them (a typo must not be ignored silently).
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if file_values:
        unknown = sorted(set(file_values) - names)
        if unknown:
            raise ValueError(f"config: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        values.update(file_values)
    for name in names:
        v = getattr(ns, prefix + name, None)
        if v is not None:
            values[name] = v
    return cls(**values)
