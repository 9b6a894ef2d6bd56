"""`ftflow config [GROUP]` and `ftflow <stage> --help`: every key of the config with its type, its
value in the composed config, its allowed values and its description, all read from the schema
(ftflow.config.schema: a Field's annotation, bounds and description) and the composed tree; and
the "did you mean" of a misspelt key.
"""

from __future__ import annotations

import textwrap
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ftflow.config.schema import Config, model_of

BOUNDS = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("<=", "le"),
          annotated_types.Lt: ("<", "lt")}  # fmt: skip


def _args(annotation: Any) -> tuple:
    return typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """A field's type as a person reads it: `sft | dpo`, `int or null`, `list of str`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in _args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(_args(annotation)[0])
    if _is_union(annotation):
        kinds = [type_name(a) for a in _args(annotation) if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in _args(annotation) else "")
    if origin is list:
        return f"list of {type_name(_args(annotation)[0])}"
    if origin is dict:
        key, value = _args(annotation)
        return f"map of {type_name(key)} to {type_name(value)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    found = [f"{BOUNDS[type(m)][0]} {getattr(m, BOUNDS[type(m)][1])}" for m in field.metadata if type(m) in BOUNDS]
    found += [f"at least {m.min_length} item(s)" for m in field.metadata if isinstance(m, annotated_types.MinLen)]
    return ", ".join(found)


def field_lines(model: type[BaseModel], value: Any, prefix: str) -> list[str]:
    """`key (type, bounds) = value` and its description, for each field of a section; a nested
    section's fields follow it (a map's once per key); a list of sections' once, with each
    item's value."""
    lines = []
    for name, field in model.model_fields.items():
        key, current = f"{prefix}.{name}" if prefix else name, (value or {}).get(name)
        inner, origin = model_of(field.annotation), typing.get_origin(field.annotation)
        if inner and isinstance(current, dict) and origin is dict:
            lines += [line for k, item in current.items() for line in field_lines(inner, item, f"{key}.{k}")]
        elif inner and isinstance(current, dict):
            lines += field_lines(inner, current, key)
        elif inner and isinstance(current, list):
            lines.append(entry(f"{key} (list of {len(current)})", None, field.description))
            for item_name, item_field in inner.model_fields.items():
                values = "[" + ", ".join(shown(item.get(item_name)) for item in current) + "]"
                lines.append(entry(f"{key}[].{item_name} ({kind(item_field)})", values, item_field.description))
        else:
            lines.append(entry(f"{key} ({kind(field)})", shown(current), field.description))
    return lines


def kind(field: FieldInfo) -> str:
    return ", ".join(part for part in (type_name(field.annotation), bounds(field)) if part)


def entry(head: str, value: str | None, description: str) -> str:
    first = head if value is None else f"{head} = {value}"
    return first + "".join("\n    " + line for line in textwrap.wrap(description, 96))


def shown(value: Any) -> str:
    """A value as the override that sets it would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value)
    return str(value)


def describe(valid: dict, sections: list[str] | tuple[str, ...]) -> str:
    """The listing of `sections` of a validated tree (Config.model_dump(mode="json"))."""
    out = []
    for section in sections:
        field = Config.model_fields[section]
        out.append(f"{section}: {field.description}")
        out += [
            "  " + line.replace("\n", "\n  ")
            for line in field_lines(model_of(field.annotation), valid[section], section)
        ]
    return "\n".join(out)


def sections() -> list[str]:
    return [name for name, field in Config.model_fields.items() if model_of(field.annotation)]
