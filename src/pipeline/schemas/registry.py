"""The schema registry: loads the versioned schema files, refuses breaking versions, validates.

Validators are compiled with fastjsonschema once per (schema name, version) when the
schema is registered, so validating a message is one dict lookup and one generated function.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fastjsonschema
import orjson

from pipeline.errors import IncompatibleSchemaError, SchemaError
from pipeline.schemas.compatibility import backward_incompatibilities

SCHEMA_DIR = Path(__file__).resolve().parent
ENVELOPE = "envelope"
NON_TRACK_TYPES = ("page", "identify", "alias")
RESERVED_NAMES = frozenset({ENVELOPE, "track", *NON_TRACK_TYPES})
MESSAGE_TYPES_TEXT = "track, page, identify or alias"
_FILE_NAME = re.compile(r"^(?P<slug>[a-z0-9_]+)\.v(?P<version>[1-9][0-9]{0,5})\.json$")
_MAX_NAME_IN_DETAIL = 80
_COMBINATORS = ("anyOf", "oneOf", "not")

Validator = Callable[[dict[str, Any]], Any]
ProblemReason = Literal["schema_violation", "unknown_event"]


@dataclass(frozen=True, slots=True)
class ValidationProblem:
    """Why a message does not match its schema; ``schema_path`` names the failing field."""

    reason: ProblemReason
    detail: str
    schema_path: str | None


def slug(name: str) -> str:
    """File-name form of an event name: ``"Product Viewed"`` -> ``"product_viewed"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class SchemaRegistry:
    """Versioned schemas by name, with their compiled validators.

    Names are ``"envelope"``, ``"page"``, ``"identify"``, ``"alias"`` or a track event name
    (``"Product Viewed"``). A message is validated against the latest envelope merged with
    its own schema at the version it asks for in ``context.schemaVersion`` (default 1); when
    that exact version is not registered, the newest version below it is used, which
    backward compatibility makes safe.
    """

    def __init__(self) -> None:
        self._schemas: dict[str, dict[int, dict[str, Any]]] = {}
        self._versions: dict[str, tuple[int, ...]] = {}
        self._compiled: dict[tuple[str, int], Validator] = {}

    @classmethod
    def load(cls, directory: Path | None = None, *, check: bool = True) -> SchemaRegistry:
        """Read every schema file under ``directory`` (default: the packaged schemas).

        ``check=False`` skips the meta-schema check, for the packaged schemas only: a test checks
        them, and importing jsonschema's format checkers cost the collector and the API 1.5 s
        of their 2.4 s start-up (the processor imports jsonschema anyway, via quixstreams).
        """
        root = directory if directory is not None else SCHEMA_DIR
        if not root.is_dir():
            raise SchemaError(f"schema directory {root} does not exist")
        found: dict[str, dict[int, Path]] = {}
        schemas: dict[Path, dict[str, Any]] = {}
        for path in sorted(root.rglob("*.json")):
            name, version, schema = _read_schema_file(root, path)
            previous = found.setdefault(name, {}).get(version)
            if previous is not None:
                raise SchemaError(f"{path}: {name!r} v{version} is also defined in {previous}")
            found[name][version] = path
            schemas[path] = schema
        if ENVELOPE not in found:
            raise SchemaError(f"{root}: no envelope.v<N>.json schema file")
        registry = cls()
        for name in sorted(found, key=lambda n: n != ENVELOPE):
            for version in sorted(found[name]):
                path = found[name][version]
                try:
                    registry.register(name, version, schemas[path], check=check)
                except IncompatibleSchemaError as exc:
                    raise IncompatibleSchemaError(f"{path}: {exc}") from exc
                except SchemaError as exc:
                    raise SchemaError(f"{path}: {exc}") from exc
        return registry

    def register(
        self, name: str, version: int, schema: Mapping[str, Any], *, check: bool = True
    ) -> None:
        """Add ``schema`` as ``version`` of ``name``; refuse it if it breaks older data.

        Versions only grow; re-registering an identical schema is a no-op. ``check`` validates
        the schema against the JSON Schema meta-schema (see :meth:`load`).
        """
        if not name or name == "track":
            raise SchemaError(f"{name!r} cannot be a schema name")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SchemaError(f"{name!r}: version must be a positive integer, got {version!r}")
        if not isinstance(schema, Mapping):
            raise SchemaError(f"{name!r} v{version}: a schema must be a JSON object")
        if check:
            _check_meta_schema(name, version, schema)
        owned = copy.deepcopy(dict(schema))
        existing = self._schemas.get(name, {})
        if version in existing:
            if existing[version] == owned:
                return
            raise SchemaError(f"{name!r} v{version} is already registered with another schema")
        if existing:
            latest = max(existing)
            if version < latest:
                raise SchemaError(
                    f"{name!r} v{version} is older than the registered v{latest};"
                    " versions only grow"
                )
            problems = backward_incompatibilities(existing[latest], owned)
            if problems:
                raise IncompatibleSchemaError(
                    f"{name!r} v{version} is not backward compatible with v{latest}: "
                    + "; ".join(problems)
                )
        if name != ENVELOPE and ENVELOPE not in self._schemas:
            raise SchemaError(f"register an envelope schema before {name!r}")
        compiled = self._compile_all(name, version, owned)
        self._schemas.setdefault(name, {})[version] = owned
        self._versions[name] = tuple(sorted(self._schemas[name]))
        self._compiled.update(compiled)

    def versions(self) -> dict[str, tuple[int, ...]]:
        """Registered versions by schema name, oldest first."""
        return dict(self._versions)

    def schema(self, name: str, version: int) -> dict[str, Any]:
        """A copy of the schema registered as ``version`` of ``name`` (as written)."""
        try:
            return copy.deepcopy(self._schemas[name][version])
        except KeyError:
            raise SchemaError(f"no schema {name!r} v{version}") from None

    def effective_schema(self, name: str, version: int) -> dict[str, Any]:
        """The full message schema validators use: the latest envelope merged with ``name``."""
        return _effective(
            self._schemas[ENVELOPE][self._versions[ENVELOPE][-1]], name, self.schema(name, version)
        )

    def validator(self, event_type: str, event_name: str | None, version: int) -> Validator:
        """The compiled validator of one message kind; it raises ``JsonSchemaValueException``.

        It fills schema defaults (e.g. ``quantity: 1``) into the dict it validates.
        """
        name = event_name if event_type == "track" else event_type
        if name is None or name not in self._versions or name == ENVELOPE:
            raise SchemaError(f"no schema for {event_type} {event_name!r}")
        resolved = _resolve(self._versions[name], version)
        if resolved is None:
            raise SchemaError(f"no schema for {name!r} at version {version} or below")
        return self._compiled[(name, resolved)]

    def validate(self, payload: dict[str, Any]) -> ValidationProblem | None:
        """Check one decoded message; ``None`` when it is valid. Fills schema defaults in."""
        kind = payload.get("type")
        if kind == "track":
            name = payload.get("event")
            if not isinstance(name, str) or not name:
                return ValidationProblem(
                    "schema_violation", "event must be a non-empty string naming the event", "event"
                )
            if name in RESERVED_NAMES:
                return _unknown(f"track event name {name!r} is reserved")
        elif kind in NON_TRACK_TYPES:
            name = kind
        elif isinstance(kind, str):
            return _unknown(f"unknown message type {_clip(kind)!r}; expected {MESSAGE_TYPES_TEXT}")
        else:
            return ValidationProblem(
                "schema_violation", f"type must be one of {MESSAGE_TYPES_TEXT}", "type"
            )
        versions = self._versions.get(name)
        if versions is None:
            return _unknown(f"no schema for track event {_clip(name)!r}")
        context = payload.get("context")
        requested = context.get("schemaVersion", 1) if type(context) is dict else 1
        if type(requested) is not int or requested < 1:
            return ValidationProblem(
                "schema_violation",
                "context.schemaVersion must be a positive integer",
                "context.schemaVersion",
            )
        version = requested if requested in versions else _resolve(versions, requested)
        if version is None:
            return _unknown(
                f"no schema for {_clip(name)!r} at version {requested} or below"
                f" (registered: {', '.join(map(str, versions))})"
            )
        try:
            self._compiled[(name, version)](payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            return _problem(exc)
        return None

    def _compile_all(
        self, name: str, version: int, schema: dict[str, Any]
    ) -> dict[tuple[str, int], Validator]:
        """Compile what registering ``schema`` makes current; every message kind for an envelope."""
        if name != ENVELOPE:
            return {(name, version): _compile(_effective(self._latest_envelope(), name, schema))}
        return {
            (part, v): _compile(_effective(schema, part, self._schemas[part][v]))
            for part, by_version in self._schemas.items()
            if part != ENVELOPE
            for v in by_version
        }

    def _latest_envelope(self) -> dict[str, Any]:
        return self._schemas[ENVELOPE][self._versions[ENVELOPE][-1]]


@functools.cache
def default_registry() -> SchemaRegistry:
    """The registry of the packaged schemas, loaded and compiled once per process."""
    return SchemaRegistry.load(check=False)


def _check_meta_schema(name: str, version: int, schema: Mapping[str, Any]) -> None:
    """Refuse a schema that is not valid JSON Schema 2020-12 (jsonschema imported only here)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError as JsonSchemaDefinitionError

    try:
        Draft202012Validator.check_schema(schema)
    except JsonSchemaDefinitionError as exc:
        raise SchemaError(f"{name!r} v{version} is not a valid JSON Schema: {exc.message}") from exc


def _read_schema_file(root: Path, path: Path) -> tuple[str, int, dict[str, Any]]:
    """Read one file and work out the schema name and version its place and title give."""
    rel = path.relative_to(root)
    match = _FILE_NAME.match(path.name)
    if match is None:
        raise SchemaError(f"{path}: schema files are named <name>.v<N>.json")
    try:
        schema = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read schema: {exc}") from exc
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be a JSON object")
    file_slug, version = match["slug"], int(match["version"])
    folder = rel.parts[0] if len(rel.parts) == 2 else None
    if len(rel.parts) == 1 and file_slug == ENVELOPE:
        return ENVELOPE, version, schema
    if folder in NON_TRACK_TYPES and file_slug == folder:
        return folder, version, schema
    if folder == "track":
        title = schema.get("title")
        if not isinstance(title, str) or not title.strip():
            raise SchemaError(f"{path}: a track schema needs a title, the event name")
        if slug(title) != file_slug:
            raise SchemaError(
                f"{path}: file name does not match title {title!r}"
                f" (expected {slug(title)}.v{version}.json)"
            )
        if title in RESERVED_NAMES:
            raise SchemaError(f"{path}: {title!r} is reserved and cannot name a track event")
        return title, version, schema
    raise SchemaError(
        f"{path}: unexpected schema file; expected envelope.v<N>.json, "
        "page|identify|alias/<type>.v<N>.json or track/<event>.v<N>.json"
    )


def _effective(envelope: Mapping[str, Any], name: str, part: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one message kind's schema onto the envelope; pin ``event`` for track events."""
    merged = _merge(envelope, part)
    if name in NON_TRACK_TYPES:
        merged["properties"]["type"] = {"const": name}
    else:
        merged = _merge(merged, {"required": ["event"], "properties": {"event": {"const": name}}})
        merged["properties"]["type"] = {"const": "track"}
    merged.pop("examples", None)
    return merged


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two object schemas: properties recursively, ``required`` as a union."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if key == "properties" and isinstance(out.get(key), dict):
            props = out[key]
            for prop, spec in value.items():
                current = props.get(prop)
                both_objects = isinstance(current, dict) and isinstance(spec, dict)
                props[prop] = _merge(current, spec) if both_objects else copy.deepcopy(spec)
        elif key == "required" and isinstance(out.get(key), list):
            out[key] = out[key] + [r for r in value if r not in out[key]]
        elif key == "allOf" and isinstance(out.get(key), list):
            out[key] = out[key] + copy.deepcopy(value)
        elif key in _COMBINATORS and key in out:
            # Both sides constrain with the same keyword: keep both, side by side.
            out.setdefault("allOf", []).append({key: copy.deepcopy(value)})
        elif key == "if" and "if" in out:
            branch = {k: extra[k] for k in ("if", "then", "else") if k in extra}
            out.setdefault("allOf", []).append(copy.deepcopy(branch))
        elif key in ("then", "else") and "if" in extra and "if" in base:
            continue
        else:
            out[key] = copy.deepcopy(value)
    return out


def _compile(schema: dict[str, Any]) -> Validator:
    try:
        validate: Validator = fastjsonschema.compile(schema, use_formats=True)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise SchemaError(f"cannot compile schema {schema.get('title')!r}: {exc}") from exc
    return validate


def _resolve(versions: tuple[int, ...], requested: int) -> int | None:
    """The newest registered version not newer than ``requested``."""
    best = None
    for v in versions:
        if v <= requested:
            best = v
    return best


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_NAME_IN_DETAIL else text[:_MAX_NAME_IN_DETAIL] + "…"


def _is_identity_rule(branches: Any) -> bool:
    """Whether an ``anyOf`` is the envelope's "userId or anonymousId" rule."""
    return isinstance(branches, list) and all(
        isinstance(b, dict) and set(b.get("required", ())) <= {"userId", "anonymousId"}
        for b in branches
    )


def _unknown(detail: str) -> ValidationProblem:
    return ValidationProblem("unknown_event", detail, None)


def _problem(exc: fastjsonschema.JsonSchemaValueException) -> ValidationProblem:
    """Turn fastjsonschema's first error into a problem naming the field, not ``data``."""
    raw_name: str = exc.name or "data"
    path = raw_name[5:] if raw_name.startswith("data.") else raw_name.removeprefix("data")
    rule = exc.rule
    value = exc.value
    if rule == "required" and isinstance(value, dict):
        missing = [k for k in (exc.rule_definition or ()) if k not in value]
        if missing:
            path = f"{path}.{missing[0]}" if path else str(missing[0])
            return ValidationProblem("schema_violation", f"{path} is required", path)
    if rule == "anyOf" and not path and _is_identity_rule(exc.rule_definition):
        return ValidationProblem(
            "schema_violation", "userId or anonymousId must be a non-empty string", "userId"
        )
    message: str = exc.message
    message = message[len(raw_name) + 1 :] if message.startswith(raw_name) else message
    where = path or "$"
    return ValidationProblem(
        "schema_violation", f"{where} {message} (got {_describe(value)})", where
    )


def _describe(value: Any) -> str:
    """A short account of the offending value: containers by size, scalars by repr."""
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
