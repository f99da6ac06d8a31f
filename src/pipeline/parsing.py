"""Parse and validate one raw message: bytes in, a :class:`CleanEvent` or a :class:`Failure` out.

This is the stream's hot path; it never raises on bad input. Checks run in a fixed order and
the first one that fails names the failure reason: size, UTF-8, JSON, object, identity,
nesting depth, schema (unknown event, then field rules), timestamp syntax, timestamp range.

Decisions: duplicate JSON keys are accepted and the last one wins (orjson, like browsers'
``JSON.parse``); ``NaN``/``Infinity`` and numbers overflowing a double are ``not_json``;
nesting deeper than ``ParseLimits.max_depth`` is a ``schema_violation`` so that later
recursive code (``dataclasses.asdict``, serializers) stays far from the recursion limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.events import (
    ALIAS_EVENT,
    IDENTIFY_EVENT,
    PAGE_EVENT,
    CleanEvent,
    Failure,
    FailureReason,
    LineItem,
    iso_to_ms,
)
from pipeline.identity import reserved_id_problem
from pipeline.schemas import SchemaRegistry

MIN_TIMESTAMP_MS = 946_684_800_000
"""2000-01-01T00:00:00Z: older event times are clock errors, not history."""

_NAMES = {"page": PAGE_EVENT, "identify": IDENTIFY_EVENT, "alias": ALIAS_EVENT}
_EVENTS_WITH_ITEMS = frozenset({"Order Completed", "Checkout Started", "Cart Viewed"})
_MAX_ID_IN_FAILURE = 200

_Refusal = tuple[FailureReason, str, str | None, Any]


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Bounds on what a raw message may be; the stream builds one from settings."""

    max_event_bytes: int = 32768
    max_future_skew_ms: int = 86_400_000
    min_timestamp_ms: int = MIN_TIMESTAMP_MS
    max_depth: int = 32


def parse_event(
    raw: bytes | None,
    *,
    registry: SchemaRegistry,
    limits: ParseLimits,
    now_ms: int,
    ingested_ms: int,
    key: str | None = None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> CleanEvent | Failure:
    """Turn one raw message into a clean event, or into the failure record that says why not.

    ``now_ms`` bounds future timestamps and stamps the failure; ``ingested_ms`` is the broker
    time. The key and position are copied into failures for the dead-letter topic.
    """
    outcome = _check(raw, registry, limits, now_ms, ingested_ms)
    if isinstance(outcome, CleanEvent):
        return outcome
    reason, detail, schema_path, payload = outcome
    message_id, event_name, source = _names(payload)
    return Failure.of(
        reason,
        detail,
        raw or b"",
        schema_path=schema_path,
        key=key,
        topic=topic,
        partition=partition,
        offset=offset,
        ingested_ms=ingested_ms,
        failed_ms=now_ms,
        message_id=message_id,
        event_name=event_name,
        source=source,
    )


def _check(
    raw: bytes | None,
    registry: SchemaRegistry,
    limits: ParseLimits,
    now_ms: int,
    ingested_ms: int,
) -> CleanEvent | _Refusal:
    """The checks in order; a refusal is (reason, detail, schema path, decoded payload)."""
    if not raw:
        detail = "empty message" if raw is not None else "message has no value"
        return "not_json", detail, None, None
    size = len(raw)
    if size > limits.max_event_bytes:
        limit = limits.max_event_bytes
        return "too_large", f"message is {size} bytes, over the {limit} limit", None, None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return "not_utf8", f"invalid UTF-8 at byte {bad.start}: {bad.reason}", None, None
        return "not_json", f"not JSON: {exc}", None, None
    if type(payload) is not dict:
        detail = f"a message must be a JSON object, got {_json_type(payload)}"
        return "not_an_object", detail, None, None

    user_id = payload.get("userId")
    anonymous_id = payload.get("anonymousId")
    if (user_id is None or user_id == "") and (anonymous_id is None or anonymous_id == ""):
        previous_id = payload.get("previousId")
        if payload.get("type") != "alias" or previous_id is None or previous_id == "":
            return "missing_identity", "message has neither userId nor anonymousId", None, payload

    if raw.count(b"{") + raw.count(b"[") > limits.max_depth:
        too_deep = _too_deep(payload, limits.max_depth)
        if too_deep is not None:
            detail = f"nesting deeper than {limits.max_depth} levels"
            return "schema_violation", detail, too_deep, payload

    problem = registry.validate(payload)
    if problem is not None:
        return problem.reason, problem.detail, problem.schema_path, payload
    reserved = reserved_id_problem(user_id)
    if reserved is not None:
        return "schema_violation", f"userId {reserved}", "userId", payload

    timestamp = payload["timestamp"]
    try:
        timestamp_ms = iso_to_ms(timestamp)
    except (ValueError, OverflowError) as exc:
        detail = f"timestamp is not ISO-8601 with a zone: {exc}"
        return "bad_timestamp", detail, "timestamp", payload
    if timestamp_ms > now_ms + limits.max_future_skew_ms:
        detail = f"timestamp {timestamp} is more than {limits.max_future_skew_ms} ms in the future"
        return "timestamp_out_of_range", detail, "timestamp", payload
    if timestamp_ms < limits.min_timestamp_ms:
        detail = f"timestamp {timestamp} is before the {limits.min_timestamp_ms} ms minimum"
        return "timestamp_out_of_range", detail, "timestamp", payload
    return _clean(payload, payload["type"], timestamp_ms, ingested_ms)


def _names(payload: Any) -> tuple[str | None, str | None, str | None]:
    """The message id, event name and source of a refused payload, where they can be read."""
    if type(payload) is not dict:
        return None, None, None
    message_id = payload.get("messageId")
    kind = payload.get("type")
    event: Any = None
    if kind == "track":
        event = payload.get("event")
    elif type(kind) is str:
        event = _NAMES.get(kind)
    return (
        message_id[:_MAX_ID_IN_FAILURE] if type(message_id) is str else None,
        event[:_MAX_ID_IN_FAILURE] if type(event) is str else None,
        _source(payload.get("context")),
    )


def _source(context: Any) -> str | None:
    """``context.sourceId`` (stamped by the collector from the write key), else the library name."""
    if type(context) is not dict:
        return None
    source = context.get("sourceId")
    if type(source) is not str or not source:
        library = context.get("library")
        source = library.get("name") if type(library) is dict else None
    return source[:_MAX_ID_IN_FAILURE] if type(source) is str and source else None


def _received_ms(value: Any) -> int | None:
    """The collector's ``receivedAt`` as epoch ms (lineage only: absent or odd values are None)."""
    if type(value) is not str:
        return None
    try:
        return iso_to_ms(value)
    except (ValueError, OverflowError):
        return None


def _text(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if type(value) is str and value else None


def _clean(payload: dict[str, Any], kind: str, timestamp_ms: int, ingested_ms: int) -> CleanEvent:
    """Build the clean event from a payload the schema has vouched for."""
    context: dict[str, Any] = payload["context"]
    properties: dict[str, Any] = payload.get("properties") or {}
    traits: dict[str, Any] = payload.get("traits") or {}
    name: str = payload["event"] if kind == "track" else _NAMES[kind]
    if kind == "page" and "name" in payload and "name" not in properties:
        properties["name"] = payload["name"]
    timezone = context.get("timezone")
    if timezone is None and kind == "identify":
        timezone = traits.get("timezone")
    product_id = properties.get("product_id")
    revenue = properties.get("revenue") if name == "Order Completed" else None
    items: tuple[LineItem, ...] = ()
    if name in _EVENTS_WITH_ITEMS and "products" in properties:
        items = tuple(
            LineItem(
                p["product_id"],
                int(p.get("quantity", 1)),
                float(p.get("price", 0.0)),
                # what the sender says; the catalog, where it knows the product, wins (enrich)
                _text(p.get("category")),
                _text(p.get("brand")),
            )
            for p in properties["products"]
        )
    return CleanEvent(
        message_id=payload["messageId"],
        type=kind,
        name=name,
        timestamp_ms=timestamp_ms,
        ingested_ms=ingested_ms,
        anonymous_id=payload.get("anonymousId") or None,
        user_id=payload.get("userId") or None,
        previous_id=payload.get("previousId") if kind == "alias" else None,
        session_id=context.get("sessionId"),
        device_type=context["device"]["type"],
        timezone=timezone,
        source=_source(context),
        schema_version=context.get("schemaVersion", 1),
        properties=properties,
        traits=traits,
        product_id=product_id if type(product_id) is str else None,
        revenue=float(revenue) if revenue is not None else None,
        collected_ms=_received_ms(payload.get("receivedAt")),
        items=items,
    )


def _too_deep(value: Any, max_depth: int) -> str | None:
    """Path of the first container nested deeper than ``max_depth``, or ``None``."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > max_depth:
            return path or "$"
        if type(node) is dict:
            for k, v in node.items():
                if type(v) is dict or type(v) is list:
                    stack.append((v, f"{path}.{k}" if path else k, depth + 1))
        elif type(node) is list:
            for i, v in enumerate(node):
                if type(v) is dict or type(v) is list:
                    stack.append((v, f"{path}[{i}]", depth + 1))
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
