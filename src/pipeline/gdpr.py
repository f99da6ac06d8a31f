"""The right to be forgotten: suppress a customer at once, delete them everywhere, prove it.

``forget`` first appends the customer to the suppression list (``PIPELINE_HOME/suppression.jsonl``
and, with a broker to reach, the compacted ``customers.suppressed`` topic that every machine
reads: :class:`SharedSuppressionList`) so the collector and the processor drop their new events
(both call :func:`is_suppressed`),
then deletes every row about the customer and their devices from the local warehouse (which
is also the profile store), erases them from the processor's state stores
(:func:`erase_processor_state`), then deletes their rows from BigQuery, and appends an audit
record to ``PIPELINE_HOME/audit/forget.jsonl``. The list and the audit hold SHA-256
pseudonyms only. BigQuery goes last: its DML delete fails while rows are in the streaming
buffer (about the last 90 minutes' inserts); everything else is done by then, and the audit
records BigQuery as pending before ``forget`` raises, so that a later run finishes it.

The state erasure travels the stream: an erasure request per stage-1 key on the raw topic,
behind whatever of theirs is already there. Stage 1 deletes the key's link and anonymous
history and writes a tombstone per device to the compacted ``identities.links``, stage 2 drops
their profiles and writes tombstones to ``profiles.updates``; both write tombstones to their
changelog topics and clear warehouse rows that in-flight events re-created.
Stage 2 also drops events of suppressed customers, so an event that passed stage 1 just before
its list was re-read cannot bring a profile back. What stays: dedupe entries (message ids,
expired by the dedupe window) and the customer's records in the other topics until their
retention (``PIPELINE_TOPIC_RETENTION_MS``, 7 days) expires them; on a real cluster the
compacted changelog topics drop the older values behind the tombstones.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Set
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from pipeline.broker import BROKER_FILE, client_config, ensure_topics
from pipeline.errors import PipelineError, StoreError
from pipeline.identity import anonymous_customer_id
from pipeline.identity import is_suppressed as is_suppressed  # where callers expect it
from pipeline.pii import sha256_hex
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse

if TYPE_CHECKING:  # the processor never imports the BigQuery client unless it writes there
    from pipeline.stores.bigquery import BigQueryWarehouse

log = logging.getLogger(__name__)

SUPPRESSION_FILE = "suppression.jsonl"
AUDIT_FILE = Path("audit") / "forget.jsonl"


def suppression_path(settings: Settings) -> Path:
    return settings.home / SUPPRESSION_FILE


def audit_path(settings: Settings) -> Path:
    return settings.home / AUDIT_FILE


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as a line of its own, after a last line cut short (a forget killed,
    or out of disk, mid-append) too: joined to it, the record could not be read either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:  # writes go to the end whatever is read
        fcntl.flock(f, fcntl.LOCK_EX)
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(orjson.dumps(record) + b"\n")


_warned_lines: set[tuple[Path, int, bytes]] = set()  # bad suppression lines, warned of once


def _entries(settings: Settings) -> list[dict[str, Any]]:
    """The suppression list's entries. A line that is not one (cut short mid-append) is
    skipped with a warning: one bad line must not stop every reader of the list (the
    collector, the processor, the replicas) from reading the others."""
    path = suppression_path(settings)
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("ids"), list):
            entries.append(entry)
        elif (path, number, line) not in _warned_lines:
            _warned_lines.add((path, number, line))
            log.warning("%s line %d is not a suppression entry; skipped", path, number)
    return entries


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
    settings: Settings,
    customer_id: str,
    devices: Iterable[str],
    *,
    at: str,
    producer: Producer | None = None,
    timeout_s: float = 30,
) -> str:
    """Have the processor delete what its state stores hold about the customer; says what it did.

    With a broker to reach (``producer``: configured, or the embedded one of a running
    ``pipeline up``), the erasure travels the stream as requests on the raw topic, in order
    behind the customer's earlier events: stage 1 drops the device's link and anonymous
    history, stage 2 the profiles (the changelog topics get tombstones). Without one, the state
    directory belongs to an embedded broker that is gone, so nothing can restore it: it is
    deleted.
    """
    if producer is None:
        # this instance's, and every replica's of `pipeline up --replicas N` (state-<id>)
        dirs = sorted(
            {settings.state_dir, *settings.home.glob("state-*")} if settings.home.exists() else ()
        )
        dirs = [d for d in dirs if d.is_dir()]
        for state_dir in dirs:
            shutil.rmtree(state_dir)
        if dirs:
            return "state directory deleted (no broker running)"
        return "no processor state"
    requests = erase_requests(customer_id, devices, at)
    for key, value in requests:
        producer.produce(
            settings.topics.raw, key=key, value=value, headers=[(CONTROL_HEADER, ERASE)]
        )
    _flush(producer, len(requests), "erasure requests", timeout_s)
    return f"erasure sent to the processor for {len(requests)} keys"


def suppression_records(customer_id: str, keys: Iterable[str], at: str) -> list[tuple[str, bytes]]:
    """(key, value) of the suppressions-topic records for a customer: one per hashed id, so
    that compaction keeps every id however often the customer is forgotten."""
    value = orjson.dumps({"customer": sha256_hex(customer_id), "at": at})
    return [(sha256_hex(k), value) for k in keys]


def publish_suppression(
    settings: Settings, producer: Producer, records: list[tuple[str, bytes]], timeout_s: float = 30
) -> None:
    """Write the customer's hashed ids to the suppressions topic: collectors and processors on
    other machines read it (:class:`SharedSuppressionList`)."""
    for key, value in records:
        producer.produce(settings.topics.suppressions, key=key, value=value)
    _flush(producer, len(records), "suppression records", timeout_s)


def _flush(producer: Producer, sent: int, what: str, timeout_s: float) -> None:
    left = producer.flush(timeout_s)
    if left:
        raise ForgetError(
            f"{left} of {sent} {what} not acknowledged within {timeout_s:.0f}s: run "
            "`pipeline forget` again once the broker is reachable"
        )


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
    """What ``forget`` did: devices found, rows deleted per ``store.table``, processor state,
    BigQuery's delete."""

    customer_sha256: str
    devices: int
    deleted: dict[str, int] = field(default_factory=dict)
    at: str = ""
    processor_state: str = ""
    bigquery: str = ""  # "deleted", "pending: ..." (run forget again), "" without BigQuery

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
    address = _reachable_broker(settings)
    producer = None
    if address is not None:
        from pipeline.runner import make_producer  # deferred: the runner imports this module

        producer = make_producer(settings, address)
        ensure_topics(settings, address)  # a cluster from before the suppressions topic
        publish_suppression(settings, producer, suppression_records(customer_id, keys, at))
    local = warehouse.delete_customer(keys, sorted(devices), customer_id)
    deleted = {f"local.{t}": n for t, n in local.items()}
    state = erase_processor_state(settings, customer_id, sorted(devices), at=at, producer=producer)
    failed: StoreError | None = None
    bq_state = ""
    if bigquery is not None:
        try:
            bq = bigquery.delete_customer(keys, sorted(devices), customer_id)
        except StoreError as exc:  # the error's text stays out of the audit: pseudonyms only
            failed, bq_state = exc, "pending: the delete failed; run `pipeline forget` again"
        else:
            deleted |= {f"bigquery.{t}": n for t, n in bq.items()}
            bq_state = "deleted"
    report = ForgetReport(subject, len(devices), deleted, at, state, bq_state)
    _append_jsonl(audit_path(settings), {"action": "forget", **report.to_dict()})
    if failed is not None:
        raise StoreError(
            f"{failed}. The customer is suppressed and erased from the local store and the "
            "processor (audit written, BigQuery pending); run `pipeline forget` again to delete "
            "their BigQuery rows (rows in the streaming buffer can be deleted ~90 min after "
            "their insert)"
        ) from failed
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
    hashes = {h for e in _entries(settings) if e.get("customer") == subject for h in e["ids"]}
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


class SuppressionListError(PipelineError):
    """The suppressions topic could not be read to its end."""


def close_source(source: SuppressedIds) -> None:
    """Release what a suppression source holds (a consumer), if anything."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


class SharedSuppressionList:
    """Every machine's suppression list: the local file, and the suppressions topic that
    ``forget`` writes wherever it runs, read from its start by a consumer with no group.

    Read once when created, then a background thread re-reads both every ``ttl_s`` seconds,
    so a call never waits for the broker (the collector calls it in its request path);
    ``fresh=True`` re-reads now, in the caller (the processor asks when an erasure reaches it,
    since the list grew before the request was sent). If the broker does not answer within
    ``timeout_s``, the ids read so far stay in use and a warning is logged.
    """

    def __init__(
        self,
        settings: Settings,
        address: str,
        *,
        ttl_s: float = 5.0,
        timeout_s: float = 5.0,
        refresh_in_background: bool = True,
    ) -> None:
        self._settings = settings
        self._topic = settings.topics.suppressions
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._consumer = Consumer(
            {
                **client_config(settings, address),
                "group.id": "pipeline-suppression-readers",  # required; never joined
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._next: dict[int, int] | None = None  # next offset per partition, once assigned
        self._ids: set[str] = set()
        self._current: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # one reader of the consumer at a time
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        self.refresh()  # a new reader starts with the whole list (waits up to timeout_s)
        if refresh_in_background:
            self._refresher = threading.Thread(
                target=self._refresh_periodically, name="suppression-list", daemon=True
            )
            self._refresher.start()

    def __call__(self, *, fresh: bool = False) -> frozenset[str]:
        if fresh:
            self.refresh()
        return self._current

    def refresh(self) -> None:
        """Read the topic to its current end and the file again."""
        with self._lock:
            if self._closed.is_set():
                return
            try:
                self._catch_up()
            except (KafkaException, SuppressionListError) as exc:
                log.warning("suppressions not read (%s); retried in %ss", exc, self._ttl_s)
            self._current = frozenset(self._ids) | load_suppressed(self._settings)

    def close(self) -> None:
        self._closed.set()
        if self._refresher is not None:
            self._refresher.join(self._timeout_s + 1)
        with self._lock:
            self._consumer.close()

    def _refresh_periodically(self) -> None:
        while not self._closed.wait(self._ttl_s):
            self.refresh()

    def _catch_up(self) -> None:
        """Read the topic up to the end offsets it has now (and whatever arrived with them)."""
        if self._next is None:
            topic = self._consumer.list_topics(self._topic, timeout=self._timeout_s).topics
            found = topic.get(self._topic)
            if found is None or found.error is not None or not found.partitions:
                return  # not created yet: nobody was forgotten through a broker
            self._consumer.assign(
                [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in found.partitions]
            )
            self._next = dict.fromkeys(found.partitions, 0)
        ends = {
            p: self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, p), timeout=self._timeout_s
            )[1]
            for p in self._next
        }
        deadline = time.monotonic() + self._timeout_s
        while True:
            behind = any(self._next[p] < end for p, end in ends.items())
            # once caught up, only drain what was fetched already (the rest of a batch)
            message = self._consumer.poll(0.1 if behind else 0)
            if message is None:
                if not behind:
                    return
                if time.monotonic() > deadline:
                    raise SuppressionListError(
                        f"{self._topic} not read to its end in {self._timeout_s}s"
                    )
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            key = message.key()
            if key is not None:
                if message.value() is None:
                    self._ids.discard(key.decode())  # a tombstone: no longer suppressed
                else:
                    self._ids.add(key.decode())
            partition, offset = message.partition(), message.offset()
            if partition is not None and offset is not None:
                self._next[partition] = offset + 1


def suppression_source(
    settings: Settings, address: str | None = None, ttl_s: float = 5.0
) -> SuppressedIds:
    """The forgotten customers' hashed ids, re-read at most every ``ttl_s`` seconds (or when
    asked: the processor does when an erasure reaches it, since the list grew before it).

    With the broker's ``address``, the list every machine shares (:class:`SharedSuppressionList`);
    without, this machine's file.
    """
    if address is not None:
        return SharedSuppressionList(settings, address, ttl_s=ttl_s)
    loaded_at = -float("inf")
    current: frozenset[str] = frozenset()

    def get(*, fresh: bool = False) -> frozenset[str]:
        nonlocal loaded_at, current
        if fresh or time.monotonic() - loaded_at > ttl_s:
            current, loaded_at = load_suppressed(settings), time.monotonic()
        return current

    return get
