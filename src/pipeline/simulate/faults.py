"""Malformed messages: one per failure reason the parser must route to the dead-letter topic."""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    key: bytes | None = (user_id or device.anonymous_id).encode()
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
