"""Collect-time enrichment: receive time, clock-skew-corrected timestamp, device from user agent.

Pure functions over one event dict; the client's own values win where it sent them.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import ua_parser

from pipeline.events import iso_to_ms, ms_to_iso

_TABLET_BRANDS = ("Generic_Android_Tablet", "Kindle")


def parse_ms(value: Any) -> int | None:
    """Epoch milliseconds of an ISO-8601 time with a zone, or ``None`` when it is not one."""
    if type(value) is not str or not value or len(value) > 64:
        return None
    try:
        return iso_to_ms(value)
    except (ValueError, OverflowError):
        return None


def corrected_timestamp_ms(timestamp_ms: int, sent_at_ms: int, received_ms: int) -> int:
    """Segment's skew correction: the device clock's offset removed, the time since kept."""
    return received_ms - (sent_at_ms - timestamp_ms)


MAX_PARSED_USER_AGENT = 1024
"""Characters of a user agent that are parsed (and cached): real ones are far shorter, and the
collector parses before it knows whether the event is too large, so a padded one must cost
neither the event loop's time (ua-parser's regexes) nor the cache's memory."""


@lru_cache(maxsize=4096)
def device_from_user_agent(user_agent: str) -> tuple[tuple[str, Any], ...]:
    """``context.device``/``os``/``browser`` fields parsed from a user agent (ua-parser)."""
    parsed = ua_parser.parse(user_agent)
    device, os, agent = parsed.device, parsed.os, parsed.user_agent
    if device is not None and device.family == "Spider":
        kind = "other"
    elif device is not None and (device.family == "iPad" or device.brand in _TABLET_BRANDS):
        kind = "tablet"
    elif (os is not None and os.family in ("iOS", "Android")) or "Mobile" in user_agent:
        kind = "mobile"
    else:
        kind = "desktop"
    fields: list[tuple[str, Any]] = [("device.type", kind)]
    if device is not None:
        if device.brand and device.brand != "Generic_Android_Tablet":
            fields.append(("device.manufacturer", device.brand))
        if device.model:
            fields.append(("device.model", device.model))
    if os is not None:
        fields.append(("os.name", os.family))
        if os.major:
            fields.append(("os.version", ".".join(p for p in (os.major, os.minor) if p)))
    if agent is not None and agent.family != "Other":
        fields.append(("browser.name", agent.family))
        if agent.major:
            fields.append(("browser.version", agent.major))
    return tuple(fields)


def enrich_context(context: dict[str, Any], *, source_id: str) -> None:
    """Add ``sourceId`` and device fields to ``context`` in place, keeping what the client sent.

    Without a user agent the sender is a server-side library: ``device.type`` = ``server``.
    """
    context["sourceId"] = source_id
    user_agent = context.get("userAgent")
    parsed: tuple[tuple[str, Any], ...] = (
        device_from_user_agent(user_agent[:MAX_PARSED_USER_AGENT])
        if type(user_agent) is str and user_agent
        else (("device.type", "server"),)
    )
    for path, value in parsed:
        group, _, name = path.partition(".")
        section = context.get(group)
        if section is None:
            section = context[group] = {}
        if type(section) is dict and name not in section:
            section[name] = value


def enrich_times(event: dict[str, Any], *, received_ms: int, batch_sent_at: Any) -> None:
    """Set ``receivedAt``, and correct ``timestamp`` for clock skew when ``sentAt`` is known.

    The client's time is kept as ``originalTimestamp``. A missing timestamp becomes the
    receive time; an unreadable one is left for the processor to dead-letter with its reason.
    """
    event["receivedAt"] = ms_to_iso(received_ms)
    if "sentAt" not in event and batch_sent_at is not None:
        event["sentAt"] = batch_sent_at
    timestamp = event.get("timestamp")
    if timestamp is None:
        event["timestamp"] = event["receivedAt"]
        return
    timestamp_ms = parse_ms(timestamp)
    sent_at_ms = parse_ms(event.get("sentAt"))
    if timestamp_ms is None or sent_at_ms is None:
        return
    try:
        corrected = ms_to_iso(corrected_timestamp_ms(timestamp_ms, sent_at_ms, received_ms))
    except (ValueError, OverflowError, OSError):
        return
    event["originalTimestamp"] = timestamp
    event["timestamp"] = corrected


def utc_now_ms() -> int:
    """The server clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000
