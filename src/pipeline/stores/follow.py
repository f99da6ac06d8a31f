"""A serving replica of the processor's local store, kept from its output topics.

The API (and the workbench) read a :class:`LocalWarehouse`. On one machine that is the file the
processor writes. In the Kubernetes layout they run in pods of their own, so each keeps its own
copy by reading the topics the processor sends the same records to (``events.clean``,
``profiles.updates``, ``segments.changes``, ``identities.links``, ``events.dlq``, ``alerts``)
and writing them with the processor's own writes (:mod:`pipeline.stores.records`), which are
idempotent. After each batch it saves where it got to, per partition, in the copy itself
(``replica_positions``), so a replica that starts again goes on from there instead of reading
the topics from their start; a crash between a batch and its positions only replays that batch.
The copy also keeps the broker's id of each topic (Kafka's topic ids, KIP-516): a topic
recreated under the same name (a new embedded broker, a topic deleted and made again) has a
new id, and is read from its start however far it has grown. Where the broker gives no ids, a
saved position beyond a partition's end is the only sign, and restarts that partition.

What a replica cannot know: rows older than the topics' retention (a new replica holds what the
topics still have), and the order between topics (a forgotten customer's events could arrive
after the profile's erasure notice), which is why records of suppressed customers are dropped.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
    Uuid,
)
from confluent_kafka.admin import AdminClient

from pipeline.broker import broker_address, client_config
from pipeline.errors import StoreError
from pipeline.gdpr import (
    SuppressedIds,
    close_source,
    is_suppressed,
    nobody_suppressed,
    suppression_source,
)
from pipeline.identity import ANON_PREFIX, anonymous_customer_id, is_anonymous
from pipeline.pii import sha256_hex
from pipeline.settings import Settings
from pipeline.stores.local import DEAD_LETTER_DEVICES, DEAD_LETTER_IDS, LocalWarehouse
from pipeline.stores.records import RecordBatch, erase, write
from pipeline.stream.stages import (
    KIND_ALERT,
    KIND_DEAD_LETTER,
    KIND_ERASE,
    KIND_ERASED,
    KIND_UNLINKED,
)

log = logging.getLogger(__name__)
_ERASURES = frozenset(
    {KIND_ERASE, KIND_ERASED, KIND_UNLINKED}
)  # about forgotten customers, and applied
# what building rows from a record that is not shaped as the processor writes it raises
_MALFORMED_RECORD = (KeyError, TypeError, ValueError, AttributeError)
# what SQLite raises for rows it refuses (a constraint, a value it cannot bind); its other
# errors (locked, disk full, I/O) are about the store, and the write is tried again
_REFUSED_ROW = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
)
_NO_TOPIC_ID = str(Uuid(0, 0))  # what a broker without topic ids answers


def followed_tables(settings: Settings) -> dict[str, str]:
    """The processor's output topics whose records a replica applies, and the table each
    topic's records go to."""
    t = settings.topics
    return {
        t.clean: "events",
        t.profiles: "profiles",
        t.segment_changes: "segment_changes",
        t.identities: "identity_links",
        t.dlq: "dead_letters",
        t.alerts: "alerts",
    }


def followed_topics(settings: Settings) -> tuple[str, ...]:
    """The processor's output topics whose records a replica applies."""
    return tuple(followed_tables(settings))


# a dead letter that is not JSON: matched by its quoted texts, as the warehouse's erasure does
_QUOTED = re.compile(r'(?="([^"]*)")')  # every quoted text, overlapping ones too


def _forgotten(record: dict[str, Any], ids: AbstractSet[str]) -> bool:
    """Whether ``record`` is about a forgotten customer: by its ids; a dead letter, by its key
    and the ids in its raw text; an alert, by the identity it names. Those two match as
    :meth:`LocalWarehouse.delete_customer` does, so that what the processor's erasure deletes
    is not written back to a replica that reads it late."""
    kind = record["kind"]
    if kind == KIND_DEAD_LETTER:
        return _names_forgotten(ids, record.get("key")) or _raw_forgotten(
            record.get("raw_text"), ids
        )
    if kind == KIND_ALERT:
        return _names_forgotten(ids, record.get("subject"))
    return is_suppressed(
        ids,
        customer_id=record.get("customer_id"),
        user_id=record.get("user_id"),
        anonymous_id=record.get("anonymous_id"),
    )


def _names_forgotten(ids: AbstractSet[str], name: object) -> bool:
    """Whether ``name`` is a forgotten customer's id or one of their devices."""
    if type(name) is int:  # a number in JSON: its text, as SQLite casts it
        name = str(name)
    if type(name) is not str or not name:
        return False
    return sha256_hex(name) in ids or sha256_hex(anonymous_customer_id(name)) in ids


def _raw_forgotten(raw_text: object, ids: AbstractSet[str]) -> bool:
    """Whether a dead letter's raw text names a forgotten customer or device: in its JSON
    fields, or where it is not JSON, anywhere in quotes."""
    if type(raw_text) is not str:
        return False
    try:
        raw = orjson.loads(raw_text)
    except orjson.JSONDecodeError:
        return any(_names_forgotten(ids, text) for text in _QUOTED.findall(raw_text))
    if not isinstance(raw, dict):
        return False
    if any(
        type(v) in (str, int) and sha256_hex(str(v)) in ids for v in map(raw.get, DEAD_LETTER_IDS)
    ):
        return True
    return any(
        type(v) is str and v and sha256_hex(anonymous_customer_id(v)) in ids
        for v in map(raw.get, DEAD_LETTER_DEVICES)
    )


def _is_output_record(record: object) -> bool:
    """Whether ``record`` is shaped as the processor's outputs are: an object with a kind."""
    return isinstance(record, dict) and isinstance(record.get("kind"), str)


class StoreFollower:
    """Applies the output topics to ``warehouse`` in a background thread until closed.

    Reads every partition from its start with an assigned consumer (no group to join), in
    batches of up to ``batch`` records, one warehouse transaction each. Topics that do not
    exist yet (no processor ran) are looked for again every ``poll_s``.
    """

    def __init__(
        self,
        settings: Settings,
        address: str,
        warehouse: LocalWarehouse,
        *,
        suppressed: SuppressedIds = nobody_suppressed,
        batch: int = 2000,
        poll_s: float = 0.5,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._warehouse = warehouse
        self._on_close = on_close
        self._suppressed = suppressed
        self._tables = followed_tables(settings)
        self._topics = tuple(self._tables)
        self._profiles = settings.topics.profiles
        self._identities = settings.topics.identities
        self._batch = batch
        self._poll_s = poll_s
        self._admin = AdminClient(client_config(settings, address))
        self._consumer = Consumer(
            {
                **client_config(settings, address),
                "group.id": "pipeline-store-followers",  # required; never joined
                "enable.auto.commit": False,
                "isolation.level": settings.consumer_isolation,  # as the processor reads
                # a saved position that retention has passed: go on from the oldest record kept
                "auto.offset.reset": "earliest",
            }
        )
        self._assigned: set[str] = set()
        self._closed = threading.Event()
        self.applied = 0  # records written
        self.dropped = 0  # undecodable, malformed, or about a forgotten customer
        self.retries = 0  # reads or writes tried again (the broker or the store failed)
        self.last_applied_ms: int | None = None
        # set once a read found nothing more: the copy has what the topics had at its start
        self.caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)
        self._exit_lock = threading.Lock()  # guards the two fields below
        self._finished = False  # the thread has left its loop
        self._release_on_exit = False  # close() gave up waiting: the thread releases

    def start(self) -> StoreFollower:
        self._thread.start()
        return self

    CLOSE_WAIT_S = 10.0

    def close(self) -> None:
        """Stop reading (after the batch in hand), release the consumer, run ``on_close``.

        A thread still inside a write after ``CLOSE_WAIT_S`` (a locked store, a slow disk)
        keeps the consumer and releases everything itself when that write ends: closing the
        consumer under it would make it fail on a closed handle.
        """
        self._closed.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=self.CLOSE_WAIT_S)
            with self._exit_lock:
                if not self._finished:
                    log.warning("store follower: still writing; it closes when the write ends")
                    self._release_on_exit = True
                    return
        self._release()

    def _release(self) -> None:
        self._consumer.close()
        for release in self._on_close:
            release()

    def __enter__(self) -> StoreFollower:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _assign_new_topics(self) -> None:
        """Assign the partitions of followed topics that exist by now, each from the position
        the copy saved, or from its start: when none was saved, or the topic was recreated (its
        id changed, or without ids, a position lies beyond a partition's end). A recreated
        topic's table is emptied first: its rows came from a topic that no longer exists (a
        new embedded broker starts profile versions again at 1, which the old, higher versions
        would otherwise refuse)."""
        missing = [t for t in self._topics if t not in self._assigned]
        if not missing:
            return
        found = self._consumer.list_topics(timeout=5).topics
        present = {
            t: meta.partitions
            for t in missing
            if (meta := found.get(t)) is not None and meta.error is None and meta.partitions
        }
        ids = self._topic_ids(list(present))
        recreated = set(self._warehouse.adopt_replica_topics(ids, tables=self._tables))
        saved = self._warehouse.replica_positions()
        shorter: set[str] = set()  # without ids (or with a broker that lost records)
        for t, partitions in present.items():
            for p in partitions:
                position = saved.get((t, p))
                if position is None or t in recreated:
                    continue
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), timeout=5)
                if position > high:
                    log.warning(
                        "store follower: %s:%d ends at %d, before the copy's position %d",
                        t,
                        p,
                        high,
                        position,
                    )
                    shorter.add(t)
        if shorter:
            self._warehouse.restart_replica_topics(shorter, tables=self._tables)
        for t in sorted(recreated | shorter):
            log.warning("store follower: %s was recreated; its table is read again", t)
        saved = self._warehouse.replica_positions()
        fresh = [
            TopicPartition(t, p, saved.get((t, p), OFFSET_BEGINNING))
            for t, partitions in present.items()
            for p in partitions
        ]
        if fresh:
            self._consumer.incremental_assign(fresh)
            self._assigned.update(tp.topic for tp in fresh)

    def _topic_ids(self, topics: list[str]) -> dict[str, str]:
        """The broker's id of each topic, by name; those it has none for are left out."""
        if not topics:
            return {}
        ids: dict[str, str] = {}
        try:
            described = self._admin.describe_topics(TopicCollection(topics), request_timeout=5)
        except KafkaException as exc:  # an older broker: positions are checked by their end
            log.warning("store follower: no topic ids from the broker: %s", exc)
            return ids
        for t, future in described.items():
            try:
                topic_id = future.result().topic_id
            except KafkaException as exc:  # this one only (deleted meanwhile, say)
                log.warning("store follower: no topic id for %s: %s", t, exc)
                continue
            if topic_id is not None and str(topic_id) != _NO_TOPIC_ID:
                ids[t] = str(topic_id)
        return ids

    def _run(self) -> None:
        try:
            self._follow()
        finally:
            with self._exit_lock:
                self._finished = True
                release = self._release_on_exit
            if release:
                self._release()

    def _follow(self) -> None:
        next_look = 0.0
        messages: list[Any] = []  # read, not yet written (kept while the store refuses them)
        while not self._closed.is_set():
            try:
                if time.monotonic() >= next_look:
                    self._assign_new_topics()
                    next_look = time.monotonic() + (5.0 if self._assigned else self._poll_s)
                if not self._assigned:
                    self._closed.wait(self._poll_s)
                    continue
                messages = messages or self._consumer.consume(self._batch, self._poll_s)
                if messages:
                    self._apply(messages)
                    messages = []
                elif self._assigned.issuperset(self._topics):
                    self.caught_up.set()
            except (KafkaException, StoreError) as exc:  # the broker or the disk: try again
                self.retries += 1
                log.warning("store follower: %s; retrying", exc)
                self._closed.wait(self._poll_s)

    def _apply(self, messages: list[Any]) -> None:
        """Write one read batch in one transaction, then save how far it was read; a record the
        store cannot take (not as the processor writes it) is logged and dropped alone."""
        read: list[tuple[Any, dict[str, Any]]] = []
        read_to: dict[tuple[str, int], int] = {}  # next offset per partition, once applied
        skipped = 0  # undecodable, or about a forgotten customer
        for m in messages:
            error = m.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("store follower: %s", error)
                continue
            read_to[(m.topic(), m.partition())] = m.offset() + 1
            record = self._record(m)
            if not _is_output_record(record):
                skipped += 1
                log.warning("store follower: not an output record at %s:%s", m.topic(), m.offset())
                continue
            read.append((m, record))
        # an erasure: the list grew before it was sent, so re-read it for the records with it
        # and after it (as the processor does), which may be the forgotten customer's
        erasing = any(record["kind"] in _ERASURES for _, record in read)
        ids = self._suppressed(fresh=True) if erasing else self._suppressed()
        records: list[dict[str, Any]] = []
        positions: list[str] = []
        for m, record in read:
            if ids and record["kind"] not in _ERASURES and _forgotten(record, ids):
                skipped += 1
                continue
            records.append(record)
            positions.append(f"{m.topic()}:{m.partition()}:{m.offset()}")
        applied, refused = self._apply_records(records, positions) if records else (0, 0)
        if read_to:  # after the writes (and erasures): a crash in between replays the batch
            self._warehouse.save_replica_positions(read_to)
        # counted once the batch is done: a batch that failed part-way is applied again whole
        self.dropped += skipped + refused
        if applied:
            self.applied += applied
            self.last_applied_ms = time.time_ns() // 1_000_000

    def _record(self, message: Any) -> Any:
        """The output record a message carries (None where it carries none): its JSON value, or
        for a tombstone on a compacted table topic, the erasure it stands for: a customer's
        profile, or a device's link (and what else the processor erased with it). A device's
        anonymous profile is erased with the device's rows, as stage 1's erasure under that
        device's key does in the processor's store (its dead letters and alerts too)."""
        value, key = message.value(), message.key()
        if value is None and key:
            try:  # the processor's keys are ids; another producer's may be anything
                erased = key.decode("utf-8")
            except UnicodeDecodeError:
                return None
            topic = message.topic()
            if topic == self._profiles:
                if is_anonymous(erased) and len(erased) > len(ANON_PREFIX):
                    device = erased[len(ANON_PREFIX) :]
                    return {"kind": KIND_ERASED, "customer_id": erased, "key": device}
                return {"kind": KIND_ERASED, "customer_id": erased}
            if topic == self._identities:  # that device's link is gone
                return {"kind": KIND_UNLINKED, "anonymous_id": erased}
        try:
            return orjson.loads(value)
        except (orjson.JSONDecodeError, TypeError):
            return None

    def _apply_records(
        self, records: list[dict[str, Any]], positions: list[str]
    ) -> tuple[int, int]:
        """Write ``records``; returns how many were applied and how many refused."""
        try:
            self._write(records)
            return len(records), 0
        except Exception as exc:
            if not _about_the_records(exc):
                raise  # the store or the broker: _run tries the whole batch again
        # rolled back: write them one by one, so only the record(s) at fault are lost
        refused = 0
        for record, position in zip(records, positions, strict=True):
            try:
                self._write([record])
            except Exception as exc:
                if not _about_the_records(exc):
                    raise
                refused += 1
                log.warning("store follower: record at %s not applied: %r", position, exc)
        return len(records) - refused, refused

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Write ``records`` in one store transaction, then apply their erasures."""
        batch = RecordBatch.of(records)
        with self._warehouse.batch():
            write(self._warehouse, batch)
        if batch.erasures or batch.unlinked:
            erase(self._warehouse, batch)


def _about_the_records(exc: Exception) -> bool:
    """Whether a write failed on the records themselves (dropped) rather than on the store."""
    if isinstance(exc, StoreError):
        return isinstance(exc.__cause__, _REFUSED_ROW)
    return isinstance(exc, _MALFORMED_RECORD)


def seed_copy(seed: Path, path: Path) -> bool:
    """Start the copy at ``path`` from the snapshot ``seed`` (`pipeline snapshot`) when there is
    no copy there yet; returns whether it did. A copy already there (a restarted replica) is
    newer than any seed and is kept. The seed is checked by opening it as a store first."""
    if path.exists():
        log.info("store follower: %s exists; the seed %s is not used", path, seed)
        return False
    try:
        with LocalWarehouse(Path(seed), read_only=True) as snapshot:
            snapshot.snapshot(path)
    except StoreError as exc:
        raise StoreError(f"cannot start the copy from the snapshot {seed}: {exc}") from exc
    log.info("store follower: started %s from the snapshot %s", path, seed)
    return True


def purge_forgotten(warehouse: LocalWarehouse, ids: AbstractSet[str]) -> list[str]:
    """Delete every row about the customers among ``ids`` (hashed, the suppression list) that
    ``warehouse`` has a profile for; returns their ids. For a copy started from a snapshot, or
    kept across a restart: a customer forgotten after it was taken, or while the replica was
    down, may have left no erasure in the topics by now (compaction drops a tombstone after
    ``delete.retention.ms``)."""
    if not ids:
        return []
    profiles = warehouse.query("SELECT customer_id FROM profiles")["customer_id"]
    forgotten = [str(c) for c in profiles if sha256_hex(str(c)) in ids]
    for customer in forgotten:
        warehouse.delete_customer([customer], warehouse.linked_devices(customer), customer)
    return forgotten


def follow_topics(settings: Settings, path: Path) -> StoreFollower:
    """Start keeping the warehouse at ``path`` from the output topics of the broker the
    settings name (or a running `pipeline up`'s), forgotten customers left out; from the
    snapshot ``settings.replica_seed`` when there is no copy yet. Customers forgotten since
    the copy was made or last kept (a seed, a restarted replica) are deleted from it first."""
    address = broker_address(settings)
    if settings.replica_seed is not None:
        seed_copy(settings.replica_seed, path)
    warehouse = LocalWarehouse(path)
    suppressed = suppression_source(settings, address)  # forgotten on any machine
    purged = purge_forgotten(warehouse, suppressed(fresh=True))
    if purged:
        log.info("store follower: %d forgotten customers deleted from the copy", len(purged))
    follower = StoreFollower(
        settings,
        address,
        warehouse,
        suppressed=suppressed,
        on_close=(lambda: close_source(suppressed), warehouse.close),
    )
    log.info("keeping %s from the output topics of %s", path, address)
    return follower.start()
