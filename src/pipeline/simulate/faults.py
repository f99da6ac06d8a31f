"""Faults injected into simulated traffic, with the truth of what was injected.

Malformed messages (one per failure reason the parser must route to the dead-letter topic), and
anomalies the stream's detectors must report (:mod:`pipeline.anomaly`): a volume spike of one
event type from one source, a bot identity, and a broken source (skewed clock, then a burst
of malformed messages). Each anomaly is an :class:`Injection`: extra messages plus the
(alert kind, subject) pairs they must raise; :func:`inject` merges them in delivery order.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from pipeline.catalog import Product
from pipeline.events import iso_to_ms, ms_to_iso
from pipeline.simulate.model import (
    LIBRARY,
    MALFORMED_REASONS,
    MAX_EVENT_BYTES,
    MalformedReason,
    RawMessage,
    TrueCustomer,
)
from pipeline.simulate.population import new_id

_UNKNOWN_EVENTS = ("Product Teleported", "Cart Levitated", "Wishlist Exploded")
_BAD_TIMESTAMPS = (
    "yesterday at noon",
    "2026-13-45T25:61:00Z",
    "2026-02-30T10:00:00.000Z",
    "Tue Nov 20 10:11:12 2026",
    "not-a-timestamp",
)


def malformed_messages(
    rng: random.Random,
    visitors: Sequence[TrueCustomer],
    n: int,
    *,
    products: Sequence[Product],
    start_ms: int,
    end_ms: int,
) -> list[RawMessage]:
    """``n`` broken messages from ``visitors``, reasons spread evenly, at random times."""
    reasons = [MALFORMED_REASONS[i % len(MALFORMED_REASONS)] for i in range(n)]
    rng.shuffle(reasons)
    return [
        _malformed(rng, rng.choice(visitors), reason, i, products, start_ms, end_ms)
        for i, reason in enumerate(reasons)
    ]


def _malformed(
    rng: random.Random,
    c: TrueCustomer,
    reason: MalformedReason,
    variant: int,
    products: Sequence[Product],
    start_ms: int,
    end_ms: int,
) -> RawMessage:
    """A plausible Product Viewed from ``c``, broken in the way ``reason`` names."""
    ts = rng.randrange(start_ms, end_ms)
    delivered = ts + rng.randint(40, 900)
    device = rng.choice(c.devices)
    product = rng.choice(products)
    message_id = new_id(rng)
    user_id = c.customer_id if c.is_known else None
    body: dict[str, Any] = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "anonymousId": device.anonymous_id,
    }
    if user_id is not None:
        body["userId"] = user_id
    body["timestamp"] = ms_to_iso(ts)
    body["sentAt"] = ms_to_iso(ts + 20)
    body["context"] = {
        "sessionId": "s_" + new_id(rng).replace("-", "")[:20],
        "device": {"type": device.type},
        "timezone": c.timezone,
        "userAgent": device.user_agent,
        "library": LIBRARY,
    }
    props: dict[str, Any] = {
        "product_id": product.product_id,
        "category": product.category,
        "brand": product.brand,
        "name": product.name,
        "price": product.price,
    }
    body["properties"] = props
    ident = device.anonymous_id or user_id  # the device first, as stage 1 keys
    key: bytes | None = ident.encode() if ident is not None else None
    event_ts = ts
    if reason == "not_json":
        value = orjson.dumps(body)
        value = value[: len(value) // 2]
        if rng.random() < 0.5:
            key = None
    elif reason == "not_utf8":
        value = orjson.dumps(body).replace(b'"name":"', b'"name":"\xc3\x28\xff', 1)
    elif reason == "too_large":
        props["description"] = "Soft, breathable and made to last. " * (MAX_EVENT_BYTES // 30)
        value = orjson.dumps(body)
    elif reason == "missing_identity":
        body.pop("anonymousId")
        body.pop("userId", None)
        key = None
        value = orjson.dumps(body)
    elif reason == "schema_violation":
        if variant % 3 == 0:
            props["price"] = f"{product.price:.2f}"
        elif variant % 3 == 1:
            body["event"] = "Product Added"
            body["properties"] = {
                "product_id": product.product_id,
                "quantity": -1,
                "price": product.price,
                "cart_id": "cart_" + new_id(rng),
            }
        else:
            del props["product_id"]
        value = orjson.dumps(body)
    elif reason == "bad_timestamp":
        body["timestamp"] = rng.choice(_BAD_TIMESTAMPS)
        event_ts = 0
        value = orjson.dumps(body)
    elif reason == "timestamp_out_of_range":
        year = rng.choice((1970, 2100))
        body["timestamp"] = f"{year}-06-15{body['timestamp'][10:]}"
        event_ts = iso_to_ms(body["timestamp"])
        value = orjson.dumps(body)
    else:
        body["event"] = rng.choice(_UNKNOWN_EVENTS)
        value = orjson.dumps(body)
    if reason in ("not_json", "not_utf8"):
        event_ts = 0
    return RawMessage(
        key=key,
        value=value,
        kind="malformed",
        message_id=message_id,
        true_customer_id="",
        malformed_reason=reason,
        timestamp_ms=event_ts,
        delivered_ms=delivered,
    )


HEADLESS_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.0.0 Safari/537.36"
)
KIOSK_LIBRARY = {"name": "kiosk-app", "version": "2.3"}


@dataclass(frozen=True)
class Injection:
    """Extra raw messages for a simulation, and the alerts a detector must raise for them.

    ``expected`` holds (alert kind, subject) pairs that must be reported; ``explained`` those
    that may be, as side effects (a bot's page views are also a volume spike). Subjects are
    as :mod:`pipeline.anomaly` names them: ``event name/source``, a source, or an identity.
    """

    name: str
    messages: tuple[RawMessage, ...]
    expected: frozenset[tuple[str, str]]
    explained: frozenset[tuple[str, str]] = frozenset()
    start_ms: int = 0
    end_ms: int = 0


def inject(messages: Sequence[RawMessage], *injections: Injection) -> list[RawMessage]:
    """``messages`` with every injection's messages merged in, in delivery order."""
    streams = [messages, *(sorted(i.messages, key=lambda m: m.delivered_ms) for i in injections)]
    return list(heapq.merge(*streams, key=lambda m: m.delivered_ms))


def _message(
    rng: random.Random,
    body: dict[str, Any],
    *,
    ts: int,
    delivered: int,
    user_id: str | None,
    anon_id: str | None,
) -> RawMessage:
    """A raw message of ``body`` (given identities, times and a fresh messageId)."""
    message_id = new_id(rng)
    head: dict[str, Any] = {"type": body.pop("type"), "messageId": message_id}
    if anon_id is not None:
        head["anonymousId"] = anon_id
    if user_id is not None:
        head["userId"] = user_id
    head["timestamp"] = ms_to_iso(ts)
    head["sentAt"] = ms_to_iso(ts + min((delivered - ts) // 2, 1_000))  # the device's clock
    key = anon_id or user_id  # the device: stage 1's key (pipeline.identity.partition_key)
    return RawMessage(
        key=key.encode() if key is not None else None,
        value=orjson.dumps({**head, **body}),
        kind="valid",
        message_id=message_id,
        true_customer_id=user_id or f"anon:{anon_id}",
        malformed_reason=None,
        timestamp_ms=ts,
        delivered_ms=delivered,
    )


def _product_viewed(product: Product, context: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Product Viewed",
        "context": context,
        "properties": {
            "product_id": product.product_id,
            "category": product.category,
            "brand": product.brand,
            "name": product.name,
            "price": product.price,
        },
    }


def _spread(rng: random.Random, start_ms: int, duration_ms: int, n: int) -> list[int]:
    return sorted(rng.randrange(start_ms, start_ms + duration_ms) for _ in range(n))


def volume_spike(
    rng: random.Random,
    visitors: Sequence[TrueCustomer],
    *,
    products: Sequence[Product],
    start_ms: int,
    duration_ms: int = 120_000,
    events: int = 600,
) -> Injection:
    """``events`` extra Product Viewed from many ordinary visitors within ``duration_ms`` (a
    flash sale or a viral link): one event type from the simulator's own source."""
    out = []
    for delivered in _spread(rng, start_ms, duration_ms, events):
        c = rng.choice(visitors)
        device = rng.choice(c.devices)
        context = {
            "sessionId": "s_" + new_id(rng).replace("-", "")[:20],
            "device": {"type": device.type},
            "timezone": c.timezone,
            "userAgent": device.user_agent,
            "library": LIBRARY,
        }
        out.append(
            _message(
                rng,
                _product_viewed(rng.choice(products), context),
                ts=delivered - rng.randint(40, 900),
                delivered=delivered,
                user_id=c.customer_id if c.is_known else None,
                anon_id=device.anonymous_id,
            )
        )
    subject = f"Product Viewed/{LIBRARY['name']}"
    return Injection(
        "volume_spike",
        tuple(out),
        frozenset({("volume_spike", subject)}),
        start_ms=start_ms,
        end_ms=start_ms + duration_ms,
    )


def bot_identity(
    rng: random.Random,
    *,
    start_ms: int,
    duration_ms: int = 180_000,
    events: int = 300,
) -> Injection:
    """One anonymous identity crawling ``events`` pages in ``duration_ms`` (a scraper)."""
    anon = "bot-" + new_id(rng)
    context = {
        "sessionId": "s_" + new_id(rng).replace("-", "")[:20],
        "device": {"type": "desktop"},
        "userAgent": HEADLESS_AGENT,
        "library": LIBRARY,
    }
    out = []
    for i in range(events):
        delivered = start_ms + i * duration_ms // events
        path = f"/c/page-{i}"
        body = {
            "type": "page",
            "name": "Category",
            "context": context,
            "properties": {"path": path, "url": "https://shop.example.com" + path},
        }
        out.append(
            _message(rng, body, ts=delivered - 30, delivered=delivered, user_id=None, anon_id=anon)
        )
    return Injection(
        "bot_identity",
        tuple(out),
        frozenset({("bot_identity", anon)}),
        # its page views are also a volume spike of the simulator's page views
        explained=frozenset({("volume_spike", f"Page Viewed/{LIBRARY['name']}")}),
        start_ms=start_ms,
        end_ms=start_ms + duration_ms,
    )


def broken_source(
    rng: random.Random,
    *,
    products: Sequence[Product],
    start_ms: int,
    source: str = "kiosk",
    healthy_ms: int = 20 * 60_000,
    broken_ms: int = 10 * 60_000,
    per_minute: int = 160,
    skew_ms: int = 2 * 3_600_000,
    malformed_share: float = 1.0,
) -> Injection:
    """In-store kiosks (collector source ``source``) sending ``per_minute`` Product Viewed,
    each shopper a new anonymous id; after ``healthy_ms`` their clock falls ``skew_ms``
    behind and a firmware bug adds ``malformed_share`` as many malformed messages (price as
    a string: a schema violation whose source is still readable) for ``broken_ms``."""
    context = {"device": {"type": "tablet"}, "library": KIOSK_LIBRARY, "sourceId": source}
    broken_at = start_ms + healthy_ms
    duration = healthy_ms + broken_ms
    out: list[RawMessage] = []
    anon = ""
    times = _spread(rng, start_ms, duration, duration * per_minute // 60_000)
    for i, delivered in enumerate(times):
        if i % 4 == 0:
            anon = "kiosk-" + new_id(rng)
        ts = delivered - rng.randint(40, 900) - (skew_ms if delivered >= broken_at else 0)
        body = _product_viewed(rng.choice(products), {**context, "sessionId": anon[-20:]})
        out.append(_message(rng, body, ts=ts, delivered=delivered, user_id=None, anon_id=anon))
    n_bad = int(broken_ms * per_minute / 60_000 * malformed_share)
    for delivered in _spread(rng, broken_at, broken_ms, n_bad):
        body = _product_viewed(rng.choice(products), {**context, "sessionId": "s_broken"})
        body["properties"]["price"] = f"{body['properties']['price']:.2f}"
        ts, anon = delivered - skew_ms, "kiosk-" + new_id(rng)
        bad = _message(rng, body, ts=ts, delivered=delivered, user_id=None, anon_id=anon)
        out.append(
            replace(bad, kind="malformed", malformed_reason="schema_violation", true_customer_id="")
        )
    out.sort(key=lambda m: m.delivered_ms)
    subject = f"Product Viewed/{source}"
    return Injection(
        "broken_source",
        tuple(out),
        frozenset({("clock_skew", source), ("dead_letter_rate", source)}),
        # the source appears, then stops when the injection ends (reported silent)
        explained=frozenset(
            {("volume_spike", subject), ("volume_drop", subject), ("source_silent", subject)}
        ),
        start_ms=start_ms,
        end_ms=start_ms + duration,
    )
