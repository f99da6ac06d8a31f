"""The right to be forgotten: suppress a customer at once, delete them everywhere, prove it.

``forget`` first appends the customer to the suppression list (``PIPELINE_HOME/suppression.jsonl``)
so the collector and the processor drop their new events (both call :func:`is_suppressed`),
then deletes every row about the customer and their devices from the local warehouse (which
is also the profile store) and from BigQuery, then erases them from the processor's state
stores (:func:`erase_processor_state`), and appends an audit record to
``PIPELINE_HOME/audit/forget.jsonl``. The list and the audit hold SHA-256 pseudonyms only.

The state erasure travels the stream: an erasure request per stage-1 key on the raw topic,
behind whatever of theirs is already there. Stage 1 deletes the key's link and anonymous
history, stage 2 their profiles; both write tombstones to their changelog topics, and stage 2
tells ``profiles.updates`` readers and clears warehouse rows that in-flight events re-created.
Stage 2 also drops events of suppressed customers, so an event that passed stage 1 just before
its list was re-read cannot bring a profile back. What stays: dedupe entries (message ids,
expired by the dedupe window) and the customer's records in the other topics until their
retention (``PIPELINE_TOPIC_RETENTION_MS``, 7 days) expires them; on a real cluster the
compacted changelog topics drop the older values behind the tombstones.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Set
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from pipeline.broker import BROKER_FILE
from pipeline.errors import PipelineError
from pipeline.identity import anonymous_customer_id
from pipeline.identity import is_suppressed as is_suppressed  # where callers expect it
from pipeline.pii import sha256_hex
from pipeline.settings import Settings
from pipeline.stores.bigquery import BigQueryWarehouse
from pipeline.stores.local import LocalWarehouse

SUPPRESSION_FILE = "suppression.jsonl"
AUDIT_FILE = Path("audit") / "forget.jsonl"


def suppression_path(settings: Settings) -> Path:
    return settings.home / SUPPRESSION_FILE


def audit_path(settings: Settings) -> Path:
    return settings.home / AUDIT_FILE


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(orjson.dumps(record) + b"\n")


def _entries(settings: Settings) -> list[dict[str, Any]]:
    path = suppression_path(settings)
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def load_suppressed(settings: Settings) -> frozenset[str]:
    """Hashes of every suppressed identity (customer ids and ``anon:<device>`` keys)."""
    return frozenset(h for e in _entries(settings) for h in e["ids"])


# An erasure request on the raw topic: this header marks it (clients of the collector cannot
# set Kafka headers), its key is a device or user key of stage 1, its value says whom it is for.
CONTROL_HEADER = "pipeline-control"
ERASE = b"erase"


def erase_requests(customer_id: str, devices: Iterable[str], at: str) -> list[tuple[str, bytes]]:
    """(key, value) of the raw-topic erasure requests for a customer: one per stage-1 key that
    can hold their state (each device, and the user id that keys server-side events)."""
    value = orjson.dumps({"customer_id": customer_id, "requested_at": at})
    return [(key, value) for key in dict.fromkeys([customer_id, *devices])]


def erase_processor_state(
    settings: Settings, customer_id: str, devices: Iterable[str], *, at: str, timeout_s: float = 30
) -> str:
    """Have the processor delete what its state stores hold about the customer; says what it did.

    With a broker to reach (configured, or the embedded one of a running ``pipeline up``), the
    erasure travels the stream as requests on the raw topic, in order behind the customer's
    earlier events: stage 1 drops the device's link and anonymous history, stage 2 the profiles
    (the changelog topics get tombstones). Without one, the state directory belongs to an embedded
    broker that is gone, so nothing can restore it: it is deleted.
    """
    address = _reachable_broker(settings)
    if address is None:
        if settings.state_dir.exists():
            shutil.rmtree(settings.state_dir)
            return "state directory deleted (no broker running)"
        return "no processor state"
    from pipeline.runner import make_producer  # deferred: the runner imports this module

    producer = make_producer(settings, address)
    requests = erase_requests(customer_id, devices, at)
    for key, value in requests:
        producer.produce(
            settings.topics.raw, key=key, value=value, headers=[(CONTROL_HEADER, ERASE)]
        )
    left = producer.flush(timeout_s)
    if left:
        raise ForgetError(
            f"{left} of {len(requests)} erasure requests not acknowledged by {address} within "
            f"{timeout_s:.0f}s: run `pipeline forget` again once the broker is reachable"
        )
    return f"erasure sent to the processor for {len(requests)} keys"


def _reachable_broker(settings: Settings) -> str | None:
    """The configured broker, else a running ``pipeline up``'s embedded one, else None."""
    if settings.broker is not None:
        return settings.broker
    marker = settings.home / BROKER_FILE
    try:
        recorded = orjson.loads(marker.read_bytes())
    except FileNotFoundError:
        return None
    pid = recorded.get("embedded_pid")
    if pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a crashed run's marker
        except PermissionError:
            pass  # alive, someone else's
    return str(recorded["address"])


class ForgetError(PipelineError):
    """The customer is suppressed and deleted from the stores, but not yet from the processor."""


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What ``forget`` did: devices found, rows deleted per ``store.table``, processor state."""

    customer_sha256: str
    devices: int
    deleted: dict[str, int] = field(default_factory=dict)
    at: str = ""
    processor_state: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _keys(customer_id: str, devices: Iterable[str]) -> list[str]:
    return [customer_id, *(anonymous_customer_id(d) for d in devices)]


def forget(
    customer_id: str,
    settings: Settings,
    *,
    warehouse: LocalWarehouse,
    bigquery: BigQueryWarehouse | None = None,
    now: datetime | None = None,
) -> ForgetReport:
    """Suppress, delete everywhere and audit one customer (see module docstring)."""
    at = (now or datetime.now(UTC)).isoformat()
    devices = set(warehouse.linked_devices(customer_id))
    if bigquery is not None:
        devices |= set(_bigquery_devices(bigquery, customer_id))
    keys = _keys(customer_id, sorted(devices))
    subject = sha256_hex(customer_id)
    _append_jsonl(
        suppression_path(settings),
        {"customer": subject, "ids": [sha256_hex(k) for k in keys], "at": at},
    )
    local = warehouse.delete_customer(keys, sorted(devices), customer_id)
    deleted = {f"local.{t}": n for t, n in local.items()}
    if bigquery is not None:
        bq = bigquery.delete_customer(keys, sorted(devices), customer_id)
        deleted |= {f"bigquery.{t}": n for t, n in bq.items()}
    state = erase_processor_state(settings, customer_id, sorted(devices), at=at)
    report = ForgetReport(subject, len(devices), deleted, at, state)
    _append_jsonl(audit_path(settings), {"action": "forget", **report.to_dict()})
    return report


def _bigquery_devices(bigquery: BigQueryWarehouse, customer_id: str) -> list[str]:
    df = bigquery.query(
        "SELECT anonymous_id FROM identity_links WHERE customer_id = @c UNION DISTINCT "
        "SELECT anonymous_id FROM events WHERE (user_id = @c OR customer_id = @c) "
        "AND anonymous_id IS NOT NULL",
        {"c": customer_id},
    )
    return [str(a) for a in df["anonymous_id"]]


def _forgotten_devices(candidates: Iterable[str], hashes: Set[str]) -> list[str]:
    return sorted({d for d in candidates if sha256_hex(anonymous_customer_id(d)) in hashes})


def verify_forgotten(
    customer_id: str,
    settings: Settings,
    *,
    warehouse: LocalWarehouse,
    bigquery: BigQueryWarehouse | None = None,
) -> dict[str, int]:
    """Rows per ``store.table`` still about the customer; all 0 once forgotten.

    The customer's devices come from the suppression list (hashed) matched against every
    device id still stored, so rows that escaped deletion are found too.
    """
    subject = sha256_hex(customer_id)
    hashes = {h for e in _entries(settings) if e["customer"] == subject for h in e["ids"]}
    result: dict[str, int] = {}
    stored = warehouse.query(
        "SELECT anonymous_id AS d FROM events WHERE anonymous_id IS NOT NULL "
        "UNION SELECT anonymous_id FROM identity_links"
    )["d"]
    devices = _forgotten_devices(map(str, stored), hashes)
    counts = warehouse.count_customer_rows(_keys(customer_id, devices), devices, customer_id)
    result |= {f"local.{t}": n for t, n in counts.items()}
    if bigquery is not None:
        bq_stored = bigquery.query(
            "SELECT DISTINCT anonymous_id AS d FROM events WHERE anonymous_id IS NOT NULL "
            "UNION DISTINCT SELECT anonymous_id FROM identity_links"
        )["d"]
        bq_devices = _forgotten_devices(map(str, bq_stored), hashes)
        bq_counts = bigquery.count_customer_rows(
            _keys(customer_id, bq_devices), bq_devices, customer_id
        )
        result |= {f"bigquery.{t}": n for t, n in bq_counts.items()}
    return result


class SuppressedIds(Protocol):
    """The forgotten customers' hashed ids; ``fresh=True`` re-reads them now."""

    def __call__(self, *, fresh: bool = False) -> Set[str]: ...


def nobody_suppressed(*, fresh: bool = False) -> Set[str]:
    """A :class:`SuppressedIds` for runs without a suppression list."""
    return frozenset()


def suppression_source(settings: Settings, ttl_s: float = 5.0) -> SuppressedIds:
    """The forgotten customers' hashed ids, re-read at most every ``ttl_s`` seconds (or when
    asked: the processor does when an erasure reaches it, since the list grew before it)."""
    loaded_at = -float("inf")
    current: frozenset[str] = frozenset()

    def get(*, fresh: bool = False) -> frozenset[str]:
        nonlocal loaded_at, current
        if fresh or time.monotonic() - loaded_at > ttl_s:
            current, loaded_at = load_suppressed(settings), time.monotonic()
        return current

    return get
