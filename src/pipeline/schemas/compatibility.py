"""Backward-compatibility check between two versions of a JSON Schema.

A new version is backward compatible when every document valid under the old version is
valid under the new one, so readers on the new schema still accept old data. The check is
structural and conservative: a change it cannot prove harmless is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_EXACT = ("pattern", "format")
# Keywords that only annotate; changing them never rejects a document.
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_HANDLED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "items",
        "additionalProperties",
        "uniqueItems",
        "multipleOf",
        *_UPPER_BOUNDS,
        *_LOWER_BOUNDS,
        *_EXACT,
    }
)

Schema = Mapping[str, Any] | bool


def backward_incompatibilities(old: Schema, new: Schema) -> list[str]:
    """Every reason a document valid under ``old`` could be rejected by ``new``.

    Each entry is ``"<field path>: <rule>"``; an empty list means compatible.
    """
    problems: list[str] = []
    _compare(old, new, "", problems)
    return problems


def _where(path: str) -> str:
    return path or "$"


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _allowed_values(schema: Mapping[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _types(schema: Mapping[str, Any]) -> set[str] | None:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {str(t) for t in declared}
    values = _allowed_values(schema)
    return {_json_type(v) for v in values} if values is not None else None


def _compare(old: Schema, new: Schema, path: str, out: list[str]) -> None:
    if new is True or old is False:
        return
    if new is False:
        out.append(f"{_where(path)}: now rejects every value (schema false)")
        return
    if old is True:
        old = {}
    assert isinstance(old, Mapping) and isinstance(new, Mapping)
    where = _where(path)

    old_types, new_types = _types(old), _types(new)
    if new_types is not None:
        accepted = new_types | ({"integer"} if "number" in new_types else set())
        if old_types is None:
            out.append(f"{where}: type restricted to {sorted(new_types)} (was any type)")
        elif lost := old_types - accepted:
            out.append(
                f"{where}: type narrowed from {_fmt_types(old_types)} to {_fmt_types(new_types)}"
                f" (no longer accepts {_fmt_types(lost)})"
            )

    old_values, new_values = _allowed_values(old), _allowed_values(new)
    if new_values is not None:
        if old_values is None:
            out.append(f"{where}: values restricted to enum {new_values!r} (was unrestricted)")
        elif removed := [v for v in old_values if v not in new_values]:
            out.append(f"{where}: enum values removed: {removed!r}")

    for key in _UPPER_BOUNDS:
        before, after = old.get(key), new.get(key)
        if after is not None and (before is None or after < before):
            out.append(
                f"{where}: {key} {after} added"
                if before is None
                else f"{where}: {key} lowered from {before} to {after}"
            )
    for key in _LOWER_BOUNDS:
        before, after = old.get(key), new.get(key)
        if after is not None and (before is None or after > before):
            out.append(
                f"{where}: {key} {after} added"
                if before is None
                else f"{where}: {key} raised from {before} to {after}"
            )
    for key in _EXACT:
        if key in new and new[key] != old.get(key):
            out.append(f"{where}: {key} {'changed' if key in old else 'added'} to {new[key]!r}")
    if new.get("uniqueItems") is True and old.get("uniqueItems") is not True:
        out.append(f"{where}: uniqueItems added")
    if "multipleOf" in new:
        before, after = old.get("multipleOf"), new["multipleOf"]
        if before is None or before % after != 0:
            out.append(f"{where}: multipleOf {after} added or changed (was {before})")

    _compare_objects(old, new, path, out)

    old_items, new_items = old.get("items"), new.get("items")
    if new_items is not None:
        _compare(old_items if old_items is not None else True, new_items, f"{path}[]", out)

    for key in new:
        if key not in _HANDLED and key not in _ANNOTATIONS and new[key] != old.get(key):
            out.append(
                f"{where}: keyword {key!r} added or changed; cannot prove backward compatibility"
            )


def _compare_objects(
    old: Mapping[str, Any], new: Mapping[str, Any], path: str, out: list[str]
) -> None:
    old_props: Mapping[str, Any] = old.get("properties") or {}
    new_props: Mapping[str, Any] = new.get("properties") or {}
    old_extra: Schema = old.get("additionalProperties", True)
    new_extra: Schema = new.get("additionalProperties", True)

    for name in sorted(set(new.get("required") or ()) - set(old.get("required") or ())):
        spec = new_props.get(name)
        if not (isinstance(spec, Mapping) and "default" in spec):
            out.append(f"{_child(path, name)}: newly required without a default")

    for name, old_spec in old_props.items():
        field = _child(path, name)
        if name in new_props:
            _compare(old_spec, new_props[name], field, out)
        elif new_extra is False:
            out.append(f"{field}: property removed while additionalProperties is false")
        else:
            _compare(old_spec, new_extra, field, out)
    # Fields the old schema did not declare were free-form unless it closed the object.
    for name, new_spec in new_props.items():
        if name not in old_props and old_extra is not True and old_extra is not False:
            _compare(old_extra, new_spec, _child(path, name), out)

    if new_extra is False and old_extra is not False:
        out.append(f"{_where(path)}: additionalProperties changed to false")
    elif isinstance(new_extra, Mapping) and old_extra is not False:
        _compare(old_extra, new_extra, _child(path, "*"), out)


def _fmt_types(types: set[str]) -> str:
    return "/".join(sorted(types))
