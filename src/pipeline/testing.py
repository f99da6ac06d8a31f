"""Helpers for tests, notebooks and the workbench: build events without parsing raw messages.

They ship inside the package so every client exercises production code with the same fixtures.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson

from pipeline.enrich import ProductLookup, enrich
from pipeline.events import ALIAS_EVENT, IDENTIFY_EVENT, PAGE_EVENT, CleanEvent, Failure
from pipeline.identity import is_anonymous
from pipeline.parsing import parse_event
from pipeline.schemas import SchemaRegistry, default_registry
from pipeline.settings import Settings
from pipeline.stream.stages import KIND_LINK, KIND_PROFILE, KIND_SEGMENT_CHANGE, fold, stitch

# Monday 2024-01-01 00:00:00 UTC: a week start, so hour-of-week bins read off directly.
T0_MS = 1_704_067_200_000

_ENVELOPES = {IDENTIFY_EVENT: "identify", ALIAS_EVENT: "alias", PAGE_EVENT: "page"}
_message_ids = itertools.count(1)


def make_event(name: str = "Product Viewed", ts: int = T0_MS, **fields: Any) -> CleanEvent:
    """A :class:`CleanEvent` named ``name`` at event time ``ts`` (UTC ms), stitched to ``c1``.

    ``fields`` override any other ``CleanEvent`` field; ``items`` may be any iterable.
    The envelope ``type`` follows from ``name`` and message ids are unique per process.
    """
    values: dict[str, Any] = {
        "message_id": f"m-{next(_message_ids)}",
        "type": _ENVELOPES.get(name, "track"),
        "name": name,
        "timestamp_ms": ts,
        "ingested_ms": ts,
        "user_id": "c1",
        "customer_id": "c1",
    }
    values.update(fields)
    if "items" in fields:
        values["items"] = tuple(fields["items"])
    return CleanEvent(**values)


class MemoryState:
    """Dict-backed stand-in for quixstreams' per-key ``State``, with event-time TTL.

    ``timestamp_ms`` plays the record timestamp: entries set with a ``ttl`` vanish from reads
    once a later record's timestamp passes their expiry, as in quixstreams. Values are kept
    serialized, as quixstreams keeps them (JSON, on ``set``), so each ``get`` returns a value
    of its own and a step that changes what it read, or stores what JSON cannot hold, fails
    here as it would in the stream.
    """

    def __init__(self, store: dict[Any, tuple[Any, int | None]], prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self.timestamp_ms = 0

    def get(self, key: Any, default: Any = None) -> Any:
        found = self._store.get((self._prefix, key))
        if found is None:
            return default
        value, expires = found
        if expires is not None and self.timestamp_ms >= expires:
            return default
        return orjson.loads(value)

    def set(self, key: Any, value: Any, ttl: timedelta | None = None) -> None:
        expires = None if ttl is None else self.timestamp_ms + int(ttl.total_seconds() * 1000)
        self._store[(self._prefix, key)] = (orjson.dumps(value), expires)

    def delete(self, key: Any) -> None:
        self._store.pop((self._prefix, key), None)


@dataclass
class ReplayResult:
    """What :func:`replay` produced: the same records the stream writes to its topics."""

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    events_by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    segment_changes: list[dict[str, Any]] = field(default_factory=list)
    duplicates_dropped: int = 0

    @property
    def events(self) -> list[dict[str, Any]]:
        """Clean events as the warehouse keeps them: once per messageId, known customer wins."""
        return list(self.events_by_id.values())


def make_dead_letter(
    offset: int, raw_text: str, *, key: str = "k", partition: int = 0
) -> dict[str, Any]:
    """A dead-letter record (as stage 1 writes it) of the raw message ``raw_text`` at
    ``offset`` of ``events.raw``, refused for its schema."""
    return {
        "topic": "events.raw",
        "partition": partition,
        "offset": offset,
        "reason": "schema_violation",
        "detail": "x",
        "ingested_ms": T0_MS,
        "failed_ms": T0_MS,
        "raw_text": raw_text,
        "raw_b64": "",
        "key": key,
    }


def _keep_attribution(events: dict[str, dict[str, Any]], event: dict[str, Any]) -> None:
    """Insert-once per messageId, upgrading an anonymous attribution (the warehouse's rule)."""
    current = events.get(event["message_id"])
    if current is None or (
        is_anonymous(current["customer_id"]) and not is_anonymous(event["customer_id"])
    ):
        events[event["message_id"]] = event


def replay(
    messages: Iterable[tuple[bytes | None, bytes]],
    *,
    catalog: ProductLookup,
    registry: SchemaRegistry | None = None,
    settings: Settings | None = None,
    now_ms: int | None = None,
) -> ReplayResult:
    """Run raw ``(key, value)`` messages through parse → enrich → stitch → fold without Kafka.

    The same functions as the stream, in one process and one partition: for notebooks
    (offline experiments) and for tests of the processing logic.
    """
    from pipeline.stream.topology import parse_limits, stage_config

    settings = settings or Settings()
    registry = registry or default_registry()
    config = stage_config(settings)
    limits = parse_limits(settings)
    clock = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    store: dict[Any, tuple[Any, int | None]] = {}
    result = ReplayResult()
    for offset, (key, value) in enumerate(messages):
        ingested = clock + offset
        parsed = parse_event(
            value,
            registry=registry,
            limits=limits,
            now_ms=clock,
            ingested_ms=ingested,
            key=key.decode("utf-8", "replace") if key else None,
            topic="replay",
            partition=0,
            offset=offset,
        )
        if isinstance(parsed, Failure):
            result.failures.append(parsed)
            continue
        event = enrich(parsed, catalog)
        device_state = MemoryState(store, "device:" + event.identity_key)
        device_state.timestamp_ms = ingested
        records = stitch(event, device_state, config, position=(0, offset))
        if not records:
            result.duplicates_dropped += 1
        for record in records:
            if record["kind"] == KIND_LINK:
                result.links.append(record)
                continue
            customer_state = MemoryState(store, "customer:" + record["customer_id"])
            customer_state.timestamp_ms = ingested
            for out in fold(record, customer_state, config, now_ms=ingested):
                if out["kind"] == KIND_PROFILE:
                    result.profiles[out["customer_id"]] = out
                elif out["kind"] == KIND_SEGMENT_CHANGE:
                    result.segment_changes.append(out)
                else:
                    _keep_attribution(result.events_by_id, out)
    return result
