"""Row builders shared by the local warehouse and BigQuery: the same columns in both."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.pii import hash_email, scrub_event


def day(ms: int) -> str:
    """The UTC date (YYYY-MM-DD) of epoch milliseconds: the partition column."""
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


# when each processing step finished with an event (pipeline.lineage)
LINEAGE_COLUMNS = ("parsed_ms", "stitched_ms", "scored_ms")


def earliest_lineage(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Each lineage step's earliest time in two stored copies of one event: its first
    arrival's path, whichever copy (anonymous or re-attributed) a store met first."""
    return {
        c: min(times) if (times := [t for t in (a.get(c), b.get(c)) if t is not None]) else None
        for c in LINEAGE_COLUMNS
    }


def event_row(e: Mapping[str, Any], stored: int) -> dict[str, Any]:
    """The ``events`` row of a clean event record (same columns as the local warehouse)."""
    return {
        "message_id": e["message_id"],
        "customer_id": e["customer_id"],
        "event_type": e["type"],
        "event_name": e["name"],
        "event_ts_ms": e["timestamp_ms"],
        "event_date": day(e["timestamp_ms"]),
        "anonymous_id": e.get("anonymous_id"),
        "user_id": e.get("user_id"),
        "session_id": e.get("session_id"),
        "device_type": e.get("device_type"),
        "product_id": e.get("product_id"),
        "category": e.get("category"),
        "brand": e.get("brand"),
        "price": e.get("price"),
        "revenue": e.get("revenue"),
        "merged_from": e.get("merged_from"),
        "ingested_ms": e["ingested_ms"],
        "stored_ms": stored,
        "payload": orjson.dumps(scrub_event(e)).decode(),
        "collected_ms": e.get("collected_ms"),
        "parsed_ms": e.get("parsed_ms"),
        "stitched_ms": e.get("stitched_ms"),
        "scored_ms": e.get("scored_ms"),
    }


def sent_email_row(m: Mapping[str, Any], stored: int) -> dict[str, Any]:
    """The ``sent_emails`` row of a sent e-mail record (the address only as its hash)."""
    to = m.get("to") or m.get("email")
    return {
        "email_id": m["email_id"],
        "customer_id": m["customer_id"],
        "campaign_id": m["campaign_id"],
        "subject": m["subject"],
        "email_sha256": hash_email(to) if isinstance(to, str) and to else m.get("email_sha256"),
        "sent_ms": m["sent_ms"],
        "sent_date": day(m["sent_ms"]),
        "stored_ms": stored,
        "html": m.get("html", ""),
        "text": m.get("text", ""),
        "snapshot": orjson.dumps(m.get("snapshot", {})).decode(),
    }


def profile_row(p: Mapping[str, Any], stored: int) -> dict[str, Any]:
    """The ``profiles`` row of a profile record."""
    return {
        "customer_id": p["customer_id"],
        "is_anonymous": int(bool(p["is_anonymous"])),
        "merged_into": p.get("merged_into"),
        "event_count": p["event_count"],
        "cis": float(p["cis"]),
        "intent_stage": p["intent_stage"],
        "revenue_total": float(p["revenue_total"]),
        "order_count": p["order_count"],
        "last_seen_ms": p.get("last_seen_ms"),
        "version": p["version"],
        "updated_ms": p["updated_ms"],
        "stored_ms": stored,
        "profile": orjson.dumps(p).decode(),
    }


def dead_letter_row(f: Mapping[str, Any], stored: int) -> dict[str, Any]:
    """The ``dead_letters`` row of a failure record."""
    return {
        "dead_letter_id": f"{f['topic']}:{f['partition']}:{f['offset']}",
        "reason": f["reason"],
        "detail": f["detail"],
        "schema_path": f.get("schema_path"),
        "message_id": f.get("message_id"),
        "event_name": f.get("event_name"),
        "message_key": f.get("key"),
        "ingested_ms": f["ingested_ms"],
        "failed_ms": f["failed_ms"],
        "stored_ms": stored,
        "raw_text": f["raw_text"],
        "raw_b64": f["raw_b64"],
    }


def alert_row(a: Mapping[str, Any], stored: int) -> dict[str, Any]:
    """The ``alerts`` row of an alert record (see :func:`pipeline.anomaly.alert_record`)."""
    return {
        "alert_id": a["alert_id"],
        "kind": a["alert_kind"],
        "subject": a["subject"],
        "severity": a["severity"],
        "observed": float(a["observed"]),
        "expected": float(a["expected"]),
        "at_ms": int(a["at_ms"]),
        "source_partition": a.get("partition"),
        "stored_ms": stored,
    }
