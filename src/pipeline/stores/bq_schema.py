"""The versioned BigQuery schema of the warehouse: the local SQLite tables, column for column.

Names and meanings match :mod:`pipeline.stores.local`; types map TEXT→STRING, INTEGER→INT64,
REAL→FLOAT64, and the ``*_date`` columns (``YYYY-MM-DD`` text locally) become DATE, the
partitioning columns. ``is_anonymous`` stays INT64 (0/1) so ``WHERE is_anonymous = 0`` runs on
both. Bump :data:`SCHEMA_VERSION` on any change; tables carry it as the label ``schema_version``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = 1

BqType = Literal["STRING", "INT64", "FLOAT64", "DATE"]


@dataclass(frozen=True, slots=True)
class Column:
    """One column: name, BigQuery type, whether it is REQUIRED."""

    name: str
    type: BqType
    required: bool = False


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A table, its idempotency key and how it is laid out.

    ``partition`` names a DATE column, ``"_INGESTION"`` for ingestion-time partitions, or None.
    ``retention`` names the :class:`~pipeline.settings.RetentionSettings` field that expires it.
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    partition: str | None = None
    clustering: tuple[str, ...] = ()
    retention: str | None = None
    description: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def type_of(self, column: str) -> BqType:
        return next(c.type for c in self.columns if c.name == column)


def _cols(spec: str) -> tuple[Column, ...]:
    """Columns from ``name TYPE[!]`` lines (``!`` = REQUIRED)."""
    out = []
    for line in spec.split(","):
        name, kind = line.split()
        out.append(Column(name, kind.rstrip("!"), kind.endswith("!")))  # type: ignore[arg-type]
    return tuple(out)


EVENTS = TableSpec(
    "events",
    _cols(
        "message_id STRING!, customer_id STRING!, event_type STRING!, event_name STRING!,"
        "event_ts_ms INT64!, event_date DATE!, anonymous_id STRING, user_id STRING,"
        "session_id STRING, device_type STRING, product_id STRING, category STRING,"
        "brand STRING, price FLOAT64, revenue FLOAT64, merged_from STRING,"
        "ingested_ms INT64!, stored_ms INT64!, payload STRING!,"
        "collected_ms INT64, parsed_ms INT64, stitched_ms INT64, scored_ms INT64"
    ),
    key=("message_id",),
    partition="event_date",
    clustering=("customer_id",),
    retention="events_days",
    description="Clean events, once per messageId (insertId); e-mail only as emailSha256.",
)
PROFILES = TableSpec(
    "profiles",
    _cols(
        "customer_id STRING!, is_anonymous INT64!, merged_into STRING, event_count INT64!,"
        "cis FLOAT64!, intent_stage STRING!, revenue_total FLOAT64!, order_count INT64!,"
        "last_seen_ms INT64, version INT64!, updated_ms INT64!, stored_ms INT64!, profile STRING!"
    ),
    key=("customer_id",),
    clustering=("customer_id",),
    description="Latest profile per customer (MERGE keeps the highest version).",
)
DEAD_LETTERS = TableSpec(
    "dead_letters",
    _cols(
        "dead_letter_id STRING!, reason STRING!, detail STRING!, schema_path STRING,"
        "message_id STRING, event_name STRING, message_key STRING, ingested_ms INT64!,"
        "failed_ms INT64!, stored_ms INT64!, raw_text STRING!, raw_b64 STRING!"
    ),
    key=("dead_letter_id",),
    partition="_INGESTION",
    clustering=("reason",),
    retention="dead_letters_days",
    description="Refused raw messages, once per topic:partition:offset.",
)
IDENTITY_LINKS = TableSpec(
    "identity_links",
    _cols(
        "anonymous_id STRING!, customer_id STRING!, previous_customer_id STRING,"
        "linked_ms INT64!, via_message_id STRING!, merged_events INT64!, stored_ms INT64!"
    ),
    key=("anonymous_id",),
    clustering=("customer_id",),
    description="anonymousId → customer links with provenance (latest link wins).",
)
SEGMENT_CHANGES = TableSpec(
    "segment_changes",
    _cols(
        "customer_id STRING!, segment STRING!, change STRING!, at_ms INT64!,"
        "profile_version INT64!, stored_ms INT64!"
    ),
    key=("customer_id", "profile_version", "segment"),
    clustering=("customer_id",),
    description="Segment enter/exit records, once per (customer, profile version, segment).",
)
SENT_EMAILS = TableSpec(
    "sent_emails",
    _cols(
        "email_id STRING!, customer_id STRING!, campaign_id STRING!, subject STRING!,"
        "email_sha256 STRING, sent_ms INT64!, sent_date DATE!, stored_ms INT64!,"
        "html STRING!, text STRING!, snapshot STRING!"
    ),
    key=("email_id",),
    partition="sent_date",
    clustering=("customer_id",),
    retention="sent_emails_days",
    description="Rendered e-mails as sent, with the snapshot that produced them.",
)
ALERTS = TableSpec(
    "alerts",
    _cols(
        "alert_id STRING!, kind STRING!, subject STRING!, severity STRING!, observed FLOAT64!,"
        "expected FLOAT64!, at_ms INT64!, source_partition INT64, stored_ms INT64!"
    ),
    key=("alert_id",),
    clustering=("kind",),
    description="Anomaly alerts of the stream's detectors, once per (kind, subject, at_ms).",
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        EVENTS,
        PROFILES,
        DEAD_LETTERS,
        IDENTITY_LINKS,
        SEGMENT_CHANGES,
        SENT_EMAILS,
        ALERTS,
    )
}
