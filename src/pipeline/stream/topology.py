"""The quixstreams topology: wires parsing, stitching and scoring; holds no business rules.

    events.raw (keyed by device) ─ stage 1: parse + validate + enrich,
                                   anomaly detection, dedupe, identity stitching
        ├─▶ events.dlq         (+ dead_letters table)
        ├─▶ alerts             (+ alerts table)
        ├─▶ identities.links   (+ identity_links table)
        ├─▶ events.raw         (only a message keyed by something other than its device:
        │                       once more, under the device key)
        └─▶ events.attributed  (keyed by customer)
    events.attributed ─ stage 2: replay guard, scoring, segments
        ├─▶ events.clean       (+ events table)
        ├─▶ profiles.updates   (+ profiles table)
        └─▶ segments.changes   (+ segment_changes table)

Two consumer stages in one application (one Kafka hop between them); a real cluster can run
several replicas of it. The collector and the simulator key raw messages by device
(:func:`pipeline.identity.partition_key`), so stage 1 parses and stitches in one step; a
message keyed otherwise goes round once more under its device key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
from quixstreams import Application, message_context
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models import SerializationContext, Serializer, TopicConfig
from quixstreams.models.serializers.json import JSONSerializer
from quixstreams.sinks import BaseSink
from quixstreams.state.rocksdb import RocksDBOptions

from pipeline.anomaly import PartitionedDetector, alert_record, observation_of
from pipeline.broker import client_config, topic_config, topic_extra_config
from pipeline.enrich import ProductLookup, enrich
from pipeline.events import CleanEvent, Failure, FailureReason
from pipeline.gdpr import CONTROL_HEADER, ERASE, SuppressedIds, is_suppressed, nobody_suppressed
from pipeline.metrics import (
    SampledCpuClock,
    StreamMetrics,
    consumer_stats_config,
    producer_stats_config,
)
from pipeline.parsing import ParseLimits, parse_event
from pipeline.schemas import SchemaRegistry
from pipeline.segments import load_segments
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse, WarehouseWriter
from pipeline.stores.records import RecordBatch
from pipeline.stores.records import erase as erase_records
from pipeline.stores.records import write as write_records
from pipeline.stream.stages import (
    KIND_ALERT,
    KIND_CRM,
    KIND_DEAD_LETTER,
    KIND_ERASE,
    KIND_ERASED,
    KIND_EVENT,
    KIND_LINK,
    KIND_PROFILE,
    KIND_REKEY,
    KIND_RETIRE,
    KIND_SEGMENT_CHANGE,
    KIND_SUPPRESSED,
    KIND_TICK,
    KIND_UNLINKED,
    StageConfig,
    erase_key,
    fold,
    forgotten_sign_in,
    stitch,
)
from pipeline.sync import CrmRecord, SyncError

MB = 1024 * 1024
log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _keyed_by_device(key: bytes | None, device: str) -> bool:
    """Whether a raw message's key is its device's exactly, the bytes a re-key would write.

    State and partitions follow the key's bytes: a key compared after a lenient decode would
    take undecodable bytes (``b"d\\xff"``) for a device id that holds U+FFFD (``"d\\ufffd"``)
    and keep that device's state under two keys.
    """
    return key is not None and key == device.encode("utf-8")


def _framework_error(exc: BaseException) -> bool:
    """Whether an exception raised in a step comes from quixstreams, its state store or the
    Kafka client (a rebalance, a fenced transaction) rather than from the record: those must
    stop the step as quixstreams intends, not become a dead letter whose offset commits."""
    module = type(exc).__module__ or ""
    return module.startswith(("quixstreams", "confluent_kafka", "rocksdict", "cimpl"))


class WarehouseSink(BaseSink):
    """Writes a stage's records of the given kinds to the warehouses in micro-batches.

    A writer thread writes a batch as soon as its oldest record is ``max_delay_ms`` old (at 0,
    the default, as soon as the thread is free: what arrives during a write is the next batch,
    so batches grow with the load by themselves), so readers wait neither for the next record
    nor for the commit interval, and SQLite's work, which releases the GIL, overlaps the
    processing. (Measured at 1,000 events/s: p99 from
    broker to readable ~250 -> ~190-245 ms, the store step's p99 ~90 -> ~40 ms; no throughput
    difference under backlog within the noise.) At every checkpoint quixstreams calls
    :meth:`flush`, which writes whatever is left before the offsets commit; a failed write
    surfaces there (or at the next record) and fails the checkpoint.

    Writing ahead of the checkpoint is safe because every store write is idempotent (events
    insert-once by messageId, profiles version-guarded, dead letters keyed by offset): after an
    aborted transaction the replay rewrites the same rows. The thread exits after a second with
    nothing to write and starts again with the next record.
    """

    IDLE_EXIT_S = 1.0

    def __init__(
        self,
        write: Callable[[list[dict[str, Any]]], None],
        kinds: frozenset[str],
        *,
        max_delay_ms: float,
    ) -> None:
        super().__init__()
        self._write = write
        self._kinds = kinds
        self._max_delay_s = max_delay_ms / 1000
        self._pending: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._lock = threading.Lock()  # guards the fields above and the thread handle
        self._due = threading.Condition(self._lock)
        self._writing = threading.Lock()  # one batch at a time, in the order taken
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(
        self,
        value: Any,
        key: Any,
        timestamp: int,
        headers: Any,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        if value["kind"] not in self._kinds:
            return
        self._raise_failure()
        with self._lock:
            self._pending.append(value)
            if len(self._pending) == 1:
                self._oldest = time.monotonic()
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._run, name="warehouse-sink", daemon=True
                    )
                    self._writer.start()
                else:
                    self._due.notify()

    def flush(self) -> None:
        """Write everything added so far (the checkpoint is about to commit it)."""
        self._write_pending()
        self._raise_failure()

    def on_paused(self) -> None:
        with self._lock:
            self._pending.clear()

    def _write_pending(self) -> None:
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                self._write(batch)

    def _run(self) -> None:
        """The writer thread: write each batch when its oldest record is due."""
        while True:
            with self._lock:
                if not self._pending:
                    self._due.wait(self.IDLE_EXIT_S)
                    if not self._pending:
                        self._writer = None
                        return
                    continue
                wait = self._oldest + self._max_delay_s - time.monotonic()
                if wait > 0:
                    self._due.wait(wait)
                    continue
            try:
                self._write_pending()
            except BaseException as exc:  # handed to the processing thread
                with self._lock:
                    self._error = exc
                    self._writer = None
                return

    def _raise_failure(self) -> None:
        error = self._error
        if error is not None:
            self._error = None
            raise error


class BurstProducer(BaseSink):
    """Sends a stage's records to their topics in bursts: once the oldest waiting record is
    ``max_delay_ms`` old (checked as records are added) and at each checkpoint, inside the
    checkpoint's transaction either way.

    librdkafka sends a produce request per partition for each linger window with records in
    it, so paced traffic spread over a stage's output partitions makes nearly a request per
    record, and each costs the broker CPU whatever it carries (at 25% load the embedded
    broker spent more CPU per event than the processor). In a burst,
    a partition's records go in one request. Records of the kinds in ``newest_only``
    (profiles: their topic is a table, the newest per customer) are sent once per key and
    burst, the newest. Only at the checkpoint would make each commit, during which the loop
    processes nothing, produce and wait for a whole interval's records (90 -> 150 ms a
    commit on a backlog): bursts spread that work over the interval. It still stalls the loop
    while a burst goes, which is why it is off by default (``outputs_max_delay_ms``: fewer
    requests for the brokers against a longer latency tail).
    """

    def __init__(
        self,
        producer: Callable[[], Any],
        routes: dict[str, Any],
        *,
        max_delay_ms: float,
        newest_only: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._producer = producer  # the application's, created when it runs
        self._routes = routes  # kind -> quixstreams Topic
        self._max_delay_s = max_delay_ms / 1000
        self._newest_only = newest_only
        self._clock = clock
        # (topic, key, value, timestamp, headers) in the order made; newest-only ones by key
        self._pending: list[tuple[Any, Any, dict[str, Any], int, Any]] = []
        self._newest: dict[tuple[str, Any], tuple[Any, Any, dict[str, Any], int, Any]] = {}
        self._oldest = 0.0

    def add(
        self,
        value: Any,
        key: Any,
        timestamp: int,
        headers: Any,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        kind = value["kind"]
        out = self._routes.get(kind)
        if out is None:
            return
        now = self._clock()
        if not self._pending and not self._newest:
            self._oldest = now
        if kind in self._newest_only:
            self._newest[(out.name, key)] = (out, key, value, timestamp, headers)
        else:
            self._pending.append((out, key, value, timestamp, headers))
        if now - self._oldest >= self._max_delay_s:
            self.flush()

    def flush(self) -> None:
        """Produce everything added and not sent yet (at a checkpoint: the commit delivers it)."""
        records = [*self._pending, *self._newest.values()]
        if not records:
            return
        self._pending, self._newest = [], {}
        producer = self._producer()
        for out, key, value, timestamp, headers in records:
            message = out.serialize(key=key, value=value, headers=headers, timestamp_ms=timestamp)
            producer.produce(
                topic=out.name,
                key=message.key,
                value=message.value,
                headers=message.headers,
                timestamp=timestamp,
            )

    def on_paused(self) -> None:
        """The checkpoint is abandoned (backpressure): its input is read again."""
        self._pending, self._newest = [], {}


class FanOutSink(BaseSink):
    """One sink for several (quixstreams copies a record for every branch of a dataframe):
    each record is added to every part, and every part is flushed, in order."""

    def __init__(self, *parts: WarehouseSink | BurstProducer) -> None:
        super().__init__()
        self._parts = parts

    def add(
        self,
        value: Any,
        key: Any,
        timestamp: int,
        headers: Any,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        for part in self._parts:
            part.add(value, key, timestamp, headers, topic, partition, offset)

    def flush(self) -> None:
        for part in self._parts:
            part.flush()

    def on_paused(self) -> None:
        for part in self._parts:
            part.on_paused()


class TombstoneSerializer(Serializer):
    """Records as JSON, and those of the given kinds (an erasure) as tombstones (no value):
    the topic is a compacted table (pipeline.broker), and only a tombstone lets compaction drop
    the key."""

    def __init__(self, *kinds: str) -> None:
        self._json = JSONSerializer()
        self._kinds = frozenset(kinds)

    def __call__(self, value: dict[str, Any], ctx: SerializationContext) -> Any:
        if value["kind"] in self._kinds:
            return None
        return self._json(value, ctx)


class _RekeyedRaw(Serializer):
    """Writes a re-keyed raw message back unchanged: the record carries its original bytes."""

    def __call__(self, value: dict[str, Any], ctx: SerializationContext) -> bytes:
        raw: bytes = value["raw"]
        return raw


def stage_config(settings: Settings) -> StageConfig:
    return StageConfig(
        dedupe_window=timedelta(hours=settings.dedupe_window_hours),
        history_limit=settings.anonymous_history_limit,
        scoring=settings.scoring,
        segments=tuple(load_segments(settings.segments_path)),
    )


def parse_limits(settings: Settings) -> ParseLimits:
    return ParseLimits(
        max_event_bytes=settings.max_event_bytes,
        max_future_skew_ms=settings.max_future_skew_s * 1000,
    )


def processor_topic_config(settings: Settings, name: str | None = None) -> TopicConfig:
    """How the processor declares its topics, the topic ``name`` or any (explicit retention,
    compaction for profiles: see pipeline.broker)."""
    return TopicConfig(
        num_partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        extra_config=topic_extra_config(settings) if name is None else topic_config(settings, name),
    )


def new_application(
    settings: Settings,
    address: str,
    metrics: StreamMetrics,
    *,
    consumer_group: str | None = None,
    state_dir: Path | None = None,
) -> Application:
    """An empty quixstreams application with the processor's client, commit and state settings
    (the benchmark's topology floor runs on the same, to isolate the cost of the logic)."""
    exactly_once = settings.processing_guarantee == "exactly-once"
    producer_extra: dict[str, Any] = {
        "linger.ms": settings.producer_linger_ms,
        "compression.type": "lz4",
        **producer_stats_config(metrics),
    }
    if exactly_once:
        # A stable transactional.id lets a restarted replica fence and abort its predecessor's
        # open transaction; the embedded broker never times one out (see environment notes).
        group = consumer_group or settings.consumer_group
        producer_extra["transactional.id"] = f"{group}-{settings.instance_id}"
    # librdkafka statistics every second feed the consumer-lag gauge
    consumer_config: dict[str, Any] = {
        "fetch.wait.max.ms": settings.consumer_fetch_wait_max_ms,
        "isolation.level": settings.consumer_isolation,
        **consumer_stats_config(metrics),
    }
    session_ms = settings.consumer_session_timeout_ms or (3000 if settings.embedded else None)
    if session_ms:
        consumer_config["session.timeout.ms"] = session_ms
        consumer_config["heartbeat.interval.ms"] = max(100, session_ms // 6)
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(client_config(settings, address)),
        consumer_group=consumer_group or settings.consumer_group,
        auto_offset_reset="earliest",
        commit_interval=settings.commit_interval_s,
        processing_guarantee=settings.processing_guarantee,
        state_dir=state_dir or settings.state_dir,
        consumer_extra_config=consumer_config,
        producer_extra_config=producer_extra,
        consumer_poll_timeout=0.2,
        # quixstreams' RocksDB defaults (64 MB x 3 write buffers, 1 GB cache per store, 3 stores
        # per partition) let a laptop process grow for minutes: keep state memory bounded
        rocksdb_options=RocksDBOptions(
            write_buffer_size=settings.state_write_buffer_mb * MB,
            max_write_buffer_number=2,
            block_cache_size=settings.state_block_cache_mb * MB,
        ),
        loglevel=settings.log_level,
    )
    _time_checkpoints(app, metrics)
    return app


def _time_checkpoints(app: Application, metrics: StreamMetrics) -> None:
    """Count each checkpoint the loop commits and the wall time it blocks the loop for.

    quixstreams has no hook for it: its processing context's ``commit_checkpoint`` (called
    every loop iteration, committing only when the interval expired) is wrapped on this
    instance. A commit is recognised by the new checkpoint object it leaves behind; closing an
    empty checkpoint (nothing read since the last) is not one.
    """
    context = app._processing_context  # no public handle on the checkpoint
    commit = context.commit_checkpoint

    def timed(force: bool = False, revoking: bool = False) -> None:
        before = context._checkpoint
        started = time.monotonic()
        try:
            commit(force=force, revoking=revoking)
        finally:
            if context._checkpoint is not before and before is not None and not before.empty():
                metrics.checkpoints += 1
                metrics.checkpoint_s += time.monotonic() - started

    context.commit_checkpoint = timed  # type: ignore[method-assign]


def build_application(
    settings: Settings,
    address: str,
    *,
    catalog: ProductLookup,
    registry: SchemaRegistry,
    warehouse: LocalWarehouse,
    metrics: StreamMetrics,
    extra_warehouses: Sequence[WarehouseWriter] = (),
    suppressed: SuppressedIds = nobody_suppressed,
) -> Application:
    """Build the processor application for the broker at ``address``."""
    app = new_application(settings, address, metrics)
    default_config = processor_topic_config(settings)
    names = settings.topics

    def out_topic(name: str, value_serializer: Any = "json") -> Any:
        return app.topic(
            name,
            key_serializer="str",
            key_deserializer="str",
            value_serializer=value_serializer,
            config=processor_topic_config(settings, name),
        )

    # Read as bytes; written back (re-keyed, unchanged) only when a producer keyed a message
    # by something other than its device, so that stage 1's state always sees the device key.
    raw = app.topic(
        names.raw,
        value_deserializer="bytes",
        key_deserializer="bytes",
        value_serializer=_RekeyedRaw(),
        key_serializer="str",
        config=default_config,
    )
    limits = parse_limits(settings)
    config = stage_config(settings)
    # per input partition and in memory: see pipeline.anomaly for why, and what that misses
    detector = PartitionedDetector(settings.anomaly)

    def detect(
        result: CleanEvent | Failure, received_ms: int, partition: int, offset: int
    ) -> list[Any]:
        observed = observation_of(result, received_ms, _now_ms())
        alerts = detector.observe(partition, observed, offset)
        for a in alerts:
            metrics.alerts[(a.kind, a.severity)] += 1
        return [{**alert_record(a, partition), "kind": KIND_ALERT} for a in alerts]

    def dead_letter(
        reason: FailureReason, detail: str, raw: bytes, key: bytes | str | None, timestamp: int
    ) -> dict[str, Any]:
        """The typed dead-letter record of the message being processed."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        ctx = message_context()
        failure = Failure.of(
            reason,
            detail,
            raw,
            key=key,
            topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            ingested_ms=timestamp,
            failed_ms=_now_ms(),
        )
        metrics.dead_lettered[failure.reason] += 1
        return {**failure.to_dict(), "kind": KIND_DEAD_LETTER}

    def processing_failed(
        step: str, exc: Exception, raw: bytes, key: bytes | str | None, timestamp: int
    ) -> dict[str, Any]:
        """In an ``except`` block: the message ``step`` failed on (a bug, not bad input, which
        is refused with its reason) as a dead letter, so that one message cannot stop the
        stream. Errors of quixstreams, its state store or Kafka (a rebalance, a fenced
        transaction) are raised again: they must stop the step, not commit a dead letter."""
        if _framework_error(exc):
            raise exc
        log.exception("%s failed on a message; dead-lettered", step)
        return dead_letter("processing_failed", f"{step} failed: {exc!r}", raw, key, timestamp)

    def erase(
        value: bytes, raw_key: str | None, timestamp: int, state: Any
    ) -> list[dict[str, Any]]:
        """Stage 1, an erasure request (``pipeline forget``): drop this key's state, pass it on."""
        suppressed(fresh=True)  # the list grew before the request was sent
        try:
            request = orjson.loads(value)
            customer_id = request["customer_id"]
            if raw_key is None or type(customer_id) is not str:
                raise ValueError("an erasure request needs a key and a customer_id string")
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            detail = f"erasure request not carried out: {exc!r}"
            return [dead_letter("bad_control", detail, value or b"", raw_key, timestamp)]
        metrics.erasures += 1
        return erase_key(raw_key, customer_id, state, requested_at=request.get("requested_at"))

    cpu = metrics.step_cpu_s  # CPU per step, read off this thread's clock for sampled messages
    stage_1_clock = SampledCpuClock()
    stage_2_clock = SampledCpuClock()
    thread_time = time.thread_time

    def ingest(
        value: bytes, key: bytes | None, timestamp: int, headers: Any, state: Any
    ) -> list[dict[str, Any]]:
        """Stage 1, per device: parse + validate + enrich, then dedupe + stitch; a message it
        fails on (a bug, not bad input: that is refused with its reason) is dead-lettered,
        so that one message cannot stop the stream."""
        try:
            return _ingest(value, key, timestamp, headers, state)
        except Exception as exc:
            return [processing_failed("stage 1", exc, value or b"", key, timestamp)]

    def _ingest(
        value: bytes, key: bytes | None, timestamp: int, headers: Any, state: Any
    ) -> list[dict[str, Any]]:
        clock = stage_1_clock.for_message()
        started = clock()
        metrics.saw_raw()
        ctx = message_context()
        raw_key = key.decode("utf-8", errors="replace") if key is not None else None
        if headers and (CONTROL_HEADER, ERASE) in headers:
            return erase(value, raw_key, timestamp, state)
        result = parse_event(
            value,
            registry=registry,
            limits=limits,
            now_ms=_now_ms(),
            ingested_ms=timestamp,
            key=raw_key,
            topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
        )
        parsed_cpu = clock()
        cpu["parse"] += parsed_cpu - started
        if isinstance(result, Failure):
            metrics.dead_lettered[result.reason] += 1
            failed = {**result.to_dict(), "kind": KIND_DEAD_LETTER}
            out = [failed, *detect(result, timestamp, ctx.partition, ctx.offset)]
            cpu["detect"] += clock() - parsed_cpu
            return out
        device = result.identity_key
        if not _keyed_by_device(key, device):
            # keyed by something else (a third-party producer, userId-first): its device's
            # state lives under another key, so send it round again under the device key
            metrics.rekeyed += 1
            return [{"kind": KIND_REKEY, "key": device, "raw": value}]
        forgotten = suppressed()
        if is_suppressed(
            forgotten,
            user_id=result.user_id,
            anonymous_id=result.anonymous_id,
            previous_id=result.previous_id,
        ):
            # a forgotten customer: dropped, not dead-lettered (that would keep their data),
            # not observed either (no alert names them); a device they sign in on is erased
            metrics.suppressed += 1
            return forgotten_sign_in(result, state, forgotten)
        metrics.valid += 1
        alerts = detect(result, timestamp, ctx.partition, ctx.offset)
        detected_cpu = clock()
        cpu["detect"] += detected_cpu - parsed_cpu
        event = enrich(result, catalog)
        parsed = _now_ms()
        enriched_cpu = clock()
        cpu["enrich"] += enriched_cpu - detected_cpu
        metrics.stitched_in += 1
        out = stitch(event, state, config, position=(ctx.partition, ctx.offset))
        if not out:
            metrics.duplicates_dropped += 1
        stitched = _now_ms()
        cpu["stitch"] += clock() - enriched_cpu
        for record in out:
            kind = record["kind"]
            if kind == KIND_EVENT:
                if record["parsed_ms"] is None:  # (merged history was kept without it)
                    record["parsed_ms"] = parsed
                record["stitched_ms"] = stitched
            if kind != KIND_LINK:
                metrics.attributed_out += 1
            else:
                metrics.identities_linked += 1
                if record["merged_events"]:
                    metrics.identities_merged += 1
                    metrics.events_merged += record["merged_events"]
        out.extend(alerts)
        return out

    def run_fold(
        value: dict[str, Any], key: Any, timestamp: int, headers: Any, state: Any
    ) -> list[dict[str, Any]]:
        """Stage 2, per customer: scoring and segments; a record it fails on is dead-lettered
        (as stage 1 does), with the record as it arrived."""
        try:
            return _run_fold(value, state)
        except Exception as exc:
            raw = orjson.dumps(value, default=str)
            return [processing_failed("stage 2", exc, raw, key, timestamp)]

    def _run_fold(value: dict[str, Any], state: Any) -> list[dict[str, Any]]:
        metrics.attributed_in += 1
        kind = value["kind"]
        # an erasure: the list grew before it was sent, so re-read it for the events behind it
        forgotten = suppressed(fresh=kind == KIND_ERASE)
        clock = stage_2_clock.for_message()
        started = clock()
        out = fold(value, state, config, now_ms=_now_ms(), suppressed=forgotten)
        cpu["fold"] += clock() - started
        if kind == KIND_ERASE:
            return out
        if kind == KIND_TICK:  # the clock: segment changes without an event, or nothing
            metrics.profile_updates += 1 if out else 0
            return out
        if not out:
            metrics.replays_dropped += 1
        elif out[0]["kind"] == KIND_SUPPRESSED:
            metrics.suppressed += 1
            return []
        else:
            metrics.profile_updates += 1
            metrics.clean_out += sum(1 for r in out if r["kind"] == KIND_EVENT)
        return out

    sink_delay_ms = settings.sink_max_delay_ms

    def write(records: list[dict[str, Any]]) -> None:
        started = thread_time()
        try:
            _write(records)
        finally:
            metrics.stored_cpu(thread_time() - started)

    def _write(records: list[dict[str, Any]]) -> None:
        batch = RecordBatch.of(records)
        # the local warehouse first: it is the serving store, and latency is measured on it;
        # all of its tables in one transaction (a commit per flush, not per table)
        with warehouse.batch():
            stored = write_records(warehouse, batch)
        if stored is not None:
            # an event's latency and lineage once: a re-attributed copy (its device's history,
            # sent on at a login, maybe days later) is not a new arrival
            arrived = [e for e in batch.events if e.get("merged_from") is None]
            reattributed = len(batch.events) - len(arrived)
            ingested = [e["ingested_ms"] for e in arrived]
            metrics.stored_events(ingested, stored, reattributed=reattributed)
            metrics.traced(arrived, stored)
        metrics.profiles_stored += len(batch.profiles)
        metrics.dead_letters_stored += len(batch.failures)
        metrics.segment_changes += len(batch.changes)
        for wh in extra_warehouses:
            write_records(wh, batch)
        if batch.erasures or batch.unlinked:
            erase_records(warehouse, batch)  # (BigQuery: re-run forget)
            metrics.profiles_erased += batch.erased

    # Each stage is one linear chain (apply → to_topic by kind → sink): quixstreams copies
    # every record once per branch, so routing by kind instead of branching is cheaper.
    dlq = out_topic(names.dlq)
    attributed = out_topic(names.attributed)
    identities = out_topic(names.identities, TombstoneSerializer(KIND_UNLINKED))
    clean = out_topic(names.clean)
    profiles = out_topic(names.profiles, TombstoneSerializer(KIND_ERASED))
    segment_changes = out_topic(names.segment_changes)
    alerts_topic = out_topic(names.alerts)
    by_kind_out = {
        KIND_EVENT: clean,
        KIND_PROFILE: profiles,
        KIND_ERASED: profiles,  # consumers of profile updates learn that a profile is gone
        KIND_SEGMENT_CHANGE: segment_changes,
        KIND_DEAD_LETTER: dlq,  # a record stage 2 failed on
    }
    ingest_out = {
        KIND_DEAD_LETTER: dlq,
        KIND_ALERT: alerts_topic,
        KIND_LINK: identities,
        KIND_UNLINKED: identities,
        KIND_REKEY: raw,
        KIND_EVENT: attributed,
        KIND_RETIRE: attributed,
        KIND_ERASE: attributed,
    }

    def ingest_key(value: dict[str, Any]) -> Any:
        kind = value["kind"]
        if kind in (KIND_EVENT, KIND_RETIRE, KIND_ERASE):
            return value["customer_id"]
        if kind in (KIND_LINK, KIND_UNLINKED):
            return value["anonymous_id"]
        if kind == KIND_DEAD_LETTER:
            return value["key"]  # the raw message's key, decoded leniently
        if kind == KIND_ALERT:
            return f"{value['alert_kind']}:{value['subject']}"
        return value["key"]  # re-keyed raw: the device

    (
        app.dataframe(raw)
        .apply(ingest, stateful=True, metadata=True, expand=True)
        .to_topic(lambda v, *_: ingest_out[v["kind"]], key=ingest_key)
        .sink(
            WarehouseSink(
                write,
                frozenset({KIND_DEAD_LETTER, KIND_ALERT, KIND_LINK, KIND_ERASE, KIND_UNLINKED}),
                max_delay_ms=sink_delay_ms,
            )
        )
    )
    stage_2 = app.dataframe(attributed).apply(run_fold, stateful=True, expand=True, metadata=True)
    stage_2_store = WarehouseSink(write, frozenset(by_kind_out), max_delay_ms=sink_delay_ms)
    if settings.outputs_max_delay_ms > 0:
        # produced in bursts, the newest profile per customer in each (see BurstProducer)
        outputs = BurstProducer(
            lambda: app._producer,  # no public handle on it
            by_kind_out,
            max_delay_ms=settings.outputs_max_delay_ms,
            newest_only=frozenset({KIND_PROFILE, KIND_ERASED}),
        )
        # the outputs first: they are in flight while the warehouse write finishes
        stage_2.sink(FanOutSink(outputs, stage_2_store))
    else:
        stage_2.to_topic(lambda v, *_: by_kind_out[v["kind"]]).sink(stage_2_store)
    # CRM records join the customer's stream: fold merges them into the profile's traits
    crm = app.topic(
        names.crm_customers,
        key_deserializer="bytes",
        value_deserializer="bytes",
        config=default_config,
    )

    def check_crm(value: bytes, key: bytes | None, timestamp: int, headers: Any) -> Any:
        """A CRM record for stage 2, as ``pipeline sync`` writes it, or its dead letter: a
        record without a customer_id or a readable updated_at would stop stage 2."""
        try:
            row = orjson.loads(value)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            source = row.get("source")
            record = CrmRecord.parse(row, names.crm_customers).to_message(
                source if isinstance(source, str) else names.crm_customers
            )
        except (orjson.JSONDecodeError, TypeError, ValueError, SyncError) as exc:
            detail = f"CRM record not applied: {exc}"
            return dead_letter("bad_crm_record", detail, value or b"", key, timestamp)
        except Exception as exc:  # as in the stages: a bug must not stop the stream
            return processing_failed("the CRM check", exc, value or b"", key, timestamp)
        return {**record, "kind": KIND_CRM}

    (
        app.dataframe(crm)
        .apply(check_crm, metadata=True)
        .to_topic(
            lambda v, *_: dlq if v["kind"] == KIND_DEAD_LETTER else attributed,
            key=lambda v: v["key"] if v["kind"] == KIND_DEAD_LETTER else v["customer_id"],
        )
        .sink(WarehouseSink(write, frozenset({KIND_DEAD_LETTER}), max_delay_ms=sink_delay_ms))
    )
    return app
