"""Light checks of a request's events and their conversion into keyed raw-topic messages.

The processor validates every event fully; the collector refuses only what it cannot forward
safely or what a client must fix: unreadable bodies, events without an id, identity or type,
and events over the size limit. The first bad event of a batch refuses the whole request,
naming its index, so that a client never has to guess what was kept.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from pipeline.collector.enrich import enrich_context, enrich_times
from pipeline.collector.errors import RequestRejected
from pipeline.identity import partition_key, reserved_id_problem

EVENT_TYPES = ("track", "identify", "page", "screen", "alias", "group")
"""Segment's message types; the processor dead-letters the ones it does not model."""

KeyedMessage = tuple[bytes, bytes]


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; not UTF-8, not JSON or not an object is a 400."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RequestRejected(
                400, "not_utf8", f"the body is not UTF-8: invalid byte at offset {bad.start}"
            ) from None
        raise RequestRejected(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if type(payload) is not dict:
        raise RequestRejected(400, "not_an_object", "the body must be a JSON object")
    if _LONG_NUMBER.search(body):
        _refuse_integers_out_of_range(body)
    return payload


# orjson reads an integer outside 64 bits as a float, silently losing digits: a body with a
# run of 19+ digits (maybe inside a string) is read once more, exactly, to find such integers
_LONG_NUMBER = re.compile(rb"\d{19,}")
_INT64 = range(-(2**63), 2**64)


def _refuse_integers_out_of_range(body: bytes) -> None:
    def parse_int(text: str) -> int:
        value = int(text)
        if value not in _INT64:
            raise RequestRejected(
                400,
                "number_out_of_range",
                f"the integer {text[:40]} is outside the 64-bit range: send it as a string",
            )
        return value

    # nested deeper than this parser goes (orjson read it): let it be
    with contextlib.suppress(RecursionError):
        json.loads(body, parse_int=parse_int)


def events_of(body: dict[str, Any], endpoint_type: str | None) -> tuple[list[Any], Any]:
    """The events of a request and the batch's ``sentAt`` (``/v1/batch`` when no type)."""
    if endpoint_type is not None:
        return [body], None
    batch = body.get("batch")
    if type(batch) is not list:
        raise RequestRejected(400, "invalid_batch", "batch must be an array of events")
    sent_at = body.get("sentAt")
    if sent_at is not None and type(sent_at) is not str:
        # it would be copied into every event without its own, and spoil them all
        raise RequestRejected(
            400, "invalid_batch", "sentAt must be an ISO-8601 string (the time the batch left)"
        )
    return batch, sent_at


def identity_key(event: dict[str, Any]) -> str | None:
    """The partition key: the event's device (see :func:`pipeline.identity.partition_key`)."""
    return partition_key(event)


def prepare_messages(
    events: Sequence[Any],
    *,
    endpoint_type: str | None,
    source_id: str,
    received_ms: int,
    batch_sent_at: Any,
    max_event_bytes: int,
) -> list[KeyedMessage]:
    """Check and enrich each event; return (key, value) messages or refuse the request."""
    batched = endpoint_type is None
    return [
        _prepare_one(
            event,
            i if batched else None,
            endpoint_type=endpoint_type,
            source_id=source_id,
            received_ms=received_ms,
            batch_sent_at=batch_sent_at,
            max_event_bytes=max_event_bytes,
        )
        for i, event in enumerate(events)
    ]


def _prepare_one(
    event: Any,
    index: int | None,
    *,
    endpoint_type: str | None,
    source_id: str,
    received_ms: int,
    batch_sent_at: Any,
    max_event_bytes: int,
) -> KeyedMessage:
    if type(event) is not dict:
        _refuse(index, "invalid_event", "is not a JSON object")
    event.pop("writeKey", None)
    if endpoint_type is not None:
        event["type"] = endpoint_type
    elif event.get("type") not in EVENT_TYPES:
        _refuse(index, "invalid_type", f"has no valid type (one of {', '.join(EVENT_TYPES)})")
    message_id = event.get("messageId")
    if type(message_id) is not str or not message_id:
        _refuse(index, "missing_message_id", "has no messageId")
    key = identity_key(event)
    if key is None:
        _refuse(index, "missing_identity", "has neither userId nor anonymousId")
    reserved = reserved_id_problem(event.get("userId"))
    if reserved is not None:
        _refuse(index, "reserved_user_id", f"has a userId that {reserved}")
    context = event.get("context")
    if context is None:
        context = event["context"] = {}
    elif type(context) is not dict:
        _refuse(index, "invalid_context", "has a context that is not an object")
    enrich_context(context, source_id=source_id)
    enrich_times(event, received_ms=received_ms, batch_sent_at=batch_sent_at)
    try:
        value = orjson.dumps(event)
    except orjson.JSONEncodeError as exc:
        _refuse(index, "invalid_event", f"cannot be serialized: {exc}")
    if len(value) > max_event_bytes:
        _refuse(
            index,
            "event_too_large",
            f"is {len(value)} bytes after enrichment, over the {max_event_bytes}-byte limit",
        )
    return key.encode("utf-8"), value


def _refuse(index: int | None, code: str, problem: str) -> NoReturn:
    where = "the event" if index is None else f"event {index}"
    raise RequestRejected(400, code, f"{where} {problem}", index=index)
