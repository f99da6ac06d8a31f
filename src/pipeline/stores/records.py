"""The processor's output records, sorted by kind and written to a warehouse.

One place for the mapping from a record's ``kind`` to a warehouse table, shared by the
processor's sinks and by a :class:`~pipeline.stores.follow.StoreFollower`, which applies the
same records read back from the output topics to a serving replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.stores.local import LocalWarehouse, WarehouseWriter
from pipeline.stream.stages import (
    KIND_ALERT,
    KIND_DEAD_LETTER,
    KIND_ERASE,
    KIND_ERASED,
    KIND_EVENT,
    KIND_LINK,
    KIND_PROFILE,
    KIND_SEGMENT_CHANGE,
    KIND_UNLINKED,
)

Record = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """A flush's records by table; ``erasures`` are applied after the writes (see
    :func:`erase`), ``erased`` counts the profiles among them."""

    events: list[Record]
    profiles: list[Record]
    failures: list[Record]
    changes: list[Record]
    alerts: list[Record]
    links: list[dict[str, Any]]
    erasures: list[Record]
    erased: int
    unlinked: list[Record] = field(default_factory=list)

    @classmethod
    def of(cls, records: Iterable[Record]) -> RecordBatch:
        records = _newest_per_device(records)
        by_kind: dict[str, list[Record]] = {}
        for r in records:
            by_kind.setdefault(r["kind"], []).append(r)
        erased = by_kind.get(KIND_ERASED, [])
        return cls(
            events=by_kind.get(KIND_EVENT, []),
            profiles=by_kind.get(KIND_PROFILE, []),
            failures=by_kind.get(KIND_DEAD_LETTER, []),
            changes=by_kind.get(KIND_SEGMENT_CHANGE, []),
            alerts=by_kind.get(KIND_ALERT, []),
            links=[{k: v for k, v in r.items() if k != "kind"} for r in by_kind.get(KIND_LINK, ())],
            erasures=[*by_kind.get(KIND_ERASE, ()), *erased],
            erased=len(erased),
            unlinked=by_kind.get(KIND_UNLINKED, []),
        )


def _newest_per_device(records: Iterable[Record]) -> list[Record]:
    """The records, but of a device's links and link erasures only the last (they are in the
    links topic's order for the device): the batch writes links before it applies erasures,
    so a link erased and then made again (a shared device) would otherwise end erased."""
    records = list(records)
    last: dict[Any, int] = {}
    for i, r in enumerate(records):
        if r["kind"] in (KIND_LINK, KIND_UNLINKED):
            last[r["anonymous_id"]] = i
    return [
        r
        for i, r in enumerate(records)
        if r["kind"] not in (KIND_LINK, KIND_UNLINKED) or last[r["anonymous_id"]] == i
    ]


def write(wh: WarehouseWriter, batch: RecordBatch) -> int | None:
    """Write every table's rows (idempotent: a replayed record adds nothing); returns when
    the events became readable (ms), None without events."""
    stored = wh.write_events(batch.events) if batch.events else None
    if batch.profiles:
        wh.write_profiles(batch.profiles)
    if batch.failures:
        wh.write_dead_letters(batch.failures)
    if batch.changes:
        wh.write_segment_changes(batch.changes)
    if batch.links:
        wh.write_identity_links(batch.links)
    if batch.alerts:
        wh.write_alerts(batch.alerts)
    return stored


def erase(wh: LocalWarehouse, batch: RecordBatch) -> None:
    """Delete the erased customers' rows, after the batch's writes: rows that records in
    flight wrote after `pipeline forget` deleted them must not outlive the erasure (stage 1:
    the key's links, dead letters and alerts; stage 2: the profile's rows)."""
    for r in batch.erasures:
        customer, key = r["customer_id"], r.get("key")
        wh.delete_customer([customer], [key] if key else [], key or customer)
    for r in batch.unlinked:
        wh.delete_link(r["anonymous_id"], r.get("customer_id"))
