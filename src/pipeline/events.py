"""Typed event records and the outcome of parsing one raw message.

The wire format is the Segment spec (``track``/``identify``/``page``/``alias`` envelopes).
Parsing turns raw bytes into either a :class:`CleanEvent` or a :class:`Failure`; nothing
here does IO, so the stream, ``pipeline.testing`` and the unit tests share it.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

FailureReason = Literal[
    "not_utf8",
    "not_json",
    "too_large",
    "not_an_object",
    "schema_violation",
    "unknown_event",
    "missing_identity",
    "bad_timestamp",
    "timestamp_out_of_range",
    "suppressed",
    "bad_control",  # a control message (e.g. an erasure request) that cannot be carried out
    "bad_crm_record",  # a crm.customers record without a customer_id or readable updated_at
    "processing_failed",  # a message the processor failed on (a bug): kept to replay
]

EVENT_TYPES = ("track", "identify", "page", "alias")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

PAGE_EVENT = "Page Viewed"
IDENTIFY_EVENT = "Identify"
ALIAS_EVENT = "Alias"


@dataclass(frozen=True, slots=True)
class Failure:
    """A typed dead-letter record: why a raw message was refused, and the message itself.

    ``raw_text`` is the payload decoded leniently for humans; ``raw_b64`` is the exact bytes.
    ``message_id``, ``event_name`` and ``source`` (as :attr:`CleanEvent.source`) are read from
    the payload where it is a JSON object that has them.
    """

    reason: FailureReason
    detail: str
    schema_path: str | None
    raw_text: str
    raw_b64: str
    key: str | None
    topic: str | None
    partition: int | None
    offset: int | None
    ingested_ms: int
    failed_ms: int
    message_id: str | None = None
    event_name: str | None = None
    source: str | None = None

    @property
    def dead_letter_id(self) -> str:
        """Stable id of the failed message: its position in the input topic."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def of(
        reason: FailureReason,
        detail: str,
        raw: bytes,
        *,
        schema_path: str | None = None,
        key: str | None = None,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        ingested_ms: int = 0,
        failed_ms: int = 0,
        message_id: str | None = None,
        event_name: str | None = None,
        source: str | None = None,
        max_raw_bytes: int = 65536,
    ) -> Failure:
        """Build a failure keeping the raw payload (truncated past ``max_raw_bytes``)."""
        kept = raw[:max_raw_bytes]
        return Failure(
            reason=reason,
            detail=detail,
            schema_path=schema_path,
            raw_text=kept.decode("utf-8", errors="replace"),
            raw_b64=base64.b64encode(kept).decode("ascii"),
            key=key,
            topic=topic,
            partition=partition,
            offset=offset,
            ingested_ms=ingested_ms,
            failed_ms=failed_ms,
            message_id=message_id,
            event_name=event_name,
            source=source,
        )


@dataclass(frozen=True, slots=True)
class LineItem:
    """One product in an order or cart, enriched from the catalog."""

    product_id: str
    quantity: int
    price: float
    category: str | None = None
    brand: str | None = None


@dataclass(frozen=True, slots=True)
class CleanEvent:
    """A validated, normalized event: what every stage after parsing works on.

    ``name`` is the track event name, or ``Page Viewed``/``Identify``/``Alias`` for the other
    envelope types. Times are UTC epoch milliseconds: ``timestamp_ms`` is event time (when
    it happened), ``ingested_ms`` is when the broker got it, ``collected_ms`` when the collector
    did and ``parsed_ms``/``stitched_ms`` when stages 0 and 1 were done with it (lineage).
    ``customer_id`` is set by identity stitching; ``category``/``brand``/``price``/``items`` by
    catalog enrichment.
    ``source`` is where the event came from: the collector's ``context.sourceId`` (set from the
    write key, so it cannot be spoofed), else the sending ``context.library.name``.
    """

    message_id: str
    type: str
    name: str
    timestamp_ms: int
    ingested_ms: int
    anonymous_id: str | None = None
    user_id: str | None = None
    previous_id: str | None = None
    session_id: str | None = None
    device_type: str | None = None
    timezone: str | None = None
    source: str | None = None
    schema_version: int = 1
    properties: dict[str, Any] = field(default_factory=dict)
    traits: dict[str, Any] = field(default_factory=dict)
    customer_id: str | None = None
    merged_from: str | None = None
    product_id: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    revenue: float | None = None
    items: tuple[LineItem, ...] = ()
    # latency lineage: when the collector received it, and when each stage finished with it
    collected_ms: int | None = None
    parsed_ms: int | None = None
    stitched_ms: int | None = None

    @property
    def identity_key(self) -> str:
        """The key stage 1 groups by: the device (anonymousId) when known, else the user."""
        ident = self.anonymous_id or self.previous_id or self.user_id
        assert ident is not None, "validated events always carry an identity"
        return ident

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; shallow (``properties``/``traits`` are shared), it is the hot path."""
        d = {name: getattr(self, name) for name in _CLEAN_EVENT_FIELDS}
        d["items"] = [
            {
                "product_id": i.product_id,
                "quantity": i.quantity,
                "price": i.price,
                "category": i.category,
                "brand": i.brand,
            }
            for i in self.items
        ]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CleanEvent:
        """Inverse of :meth:`to_dict`; ignores keys that are not fields (a record's ``kind``)."""
        values = {k: d[k] for k in _CLEAN_EVENT_FIELDS if k in d}
        values["items"] = tuple(LineItem(**i) for i in d.get("items") or ())
        return CleanEvent(**values)


def iso_to_ms(value: str) -> int:
    """Parse an ISO-8601 timestamp with a zone (``Z`` allowed) to UTC epoch milliseconds."""
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    # Integer arithmetic: ``dt.timestamp() * 1000`` is off by one ms for ~0.6% of values.
    return (dt - _EPOCH) // _ONE_MS


def ms_to_iso(ms: int) -> str:
    """Format UTC epoch milliseconds as ISO-8601 with a ``Z`` suffix (the inverse of
    :func:`iso_to_ms`).

    Integer arithmetic: ``fromtimestamp(ms / 1000)`` is a millisecond early for ~30% of times
    after 2200 (the float has too few bits left for the fraction). Past year 9999 it raises
    ``OverflowError``.
    """
    return (_EPOCH + ms * _ONE_MS).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_CLEAN_EVENT_FIELDS = tuple(f.name for f in fields(CleanEvent))
