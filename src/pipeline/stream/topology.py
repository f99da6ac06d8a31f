"""The quixstreams topology: wires parsing, stitching and scoring; holds no business rules.

events.raw ─ parse+validate ─┬─▶ events.dlq (+ dead_letters table)
                             └─ enrich ─ group_by(device) ─ stitch (dedupe, identity)
                                   ├─▶ identities.links (+ identity_links table)
                                   └─▶ events.attributed (keyed by customer)
                                        ─ fold (profile scoring)
                                         ├─▶ events.clean (+ events table)
                                         └─▶ profiles.updates (+ profiles table)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from quixstreams import Application, message_context
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models import TopicConfig
from quixstreams.sinks import BatchingSink, SinkBatch

from pipeline.broker import client_config, topic_extra_config
from pipeline.enrich import ProductLookup, enrich
from pipeline.events import CleanEvent, Failure
from pipeline.metrics import StreamMetrics
from pipeline.parsing import ParseLimits, parse_event
from pipeline.schemas import SchemaRegistry
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.stages import KIND_LINK, StageConfig, fold, stitch


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class WarehouseSink(BatchingSink):
    """Writes one kind of record to the local warehouse at every checkpoint (idempotently)."""

    def __init__(
        self,
        warehouse: LocalWarehouse,
        write: Callable[[LocalWarehouse, list[dict[str, Any]]], None],
    ) -> None:
        super().__init__()
        self._warehouse = warehouse
        self._write = write

    def write(self, batch: SinkBatch) -> None:
        self._write(self._warehouse, [item.value for item in batch])


def stage_config(settings: Settings) -> StageConfig:
    return StageConfig(
        dedupe_window=timedelta(hours=settings.dedupe_window_hours),
        history_limit=settings.anonymous_history_limit,
        scoring=settings.scoring,
    )


def parse_limits(settings: Settings) -> ParseLimits:
    return ParseLimits(
        max_event_bytes=settings.max_event_bytes,
        max_future_skew_ms=settings.max_future_skew_s * 1000,
    )


def build_application(
    settings: Settings,
    address: str,
    *,
    catalog: ProductLookup,
    registry: SchemaRegistry,
    warehouse: LocalWarehouse,
    metrics: StreamMetrics,
) -> Application:
    """Build the processor application for the broker at ``address``."""
    exactly_once = settings.processing_guarantee == "exactly-once"
    producer_extra: dict[str, Any] = {"linger.ms": 5, "compression.type": "lz4"}
    if exactly_once:
        # A stable transactional.id lets a restarted replica fence and abort its predecessor's
        # open transaction; the embedded broker never times one out (see environment notes).
        producer_extra["transactional.id"] = f"{settings.consumer_group}-{settings.instance_id}"
    consumer_config: dict[str, Any] = {"fetch.wait.max.ms": 20}
    session_ms = settings.consumer_session_timeout_ms or (3000 if settings.embedded else None)
    if session_ms:
        consumer_config["session.timeout.ms"] = session_ms
        consumer_config["heartbeat.interval.ms"] = max(100, session_ms // 6)
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(client_config(settings, address)),
        consumer_group=settings.consumer_group,
        auto_offset_reset="earliest",
        commit_interval=settings.commit_interval_s,
        processing_guarantee=settings.processing_guarantee,
        state_dir=settings.state_dir,
        consumer_extra_config=consumer_config,
        producer_extra_config=producer_extra,
        consumer_poll_timeout=0.2,
        loglevel=settings.log_level,
    )
    topic_config = TopicConfig(
        num_partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        extra_config=topic_extra_config(settings),
    )
    names = settings.topics

    def out_topic(name: str) -> Any:
        return app.topic(
            name,
            key_serializer="str",
            key_deserializer="str",
            value_serializer="json",
            config=topic_config,
        )

    raw = app.topic(
        names.raw, value_deserializer="bytes", key_deserializer="bytes", config=topic_config
    )
    limits = parse_limits(settings)
    config = stage_config(settings)

    def parse(value: bytes, key: bytes | None, timestamp: int, headers: Any) -> dict[str, Any]:
        metrics.saw_raw()
        ctx = message_context()
        result = parse_event(
            value,
            registry=registry,
            limits=limits,
            now_ms=_now_ms(),
            ingested_ms=timestamp,
            key=key.decode("utf-8", errors="replace") if key is not None else None,
            topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
        )
        if isinstance(result, Failure):
            metrics.dead_lettered[result.reason] += 1
            return {"failure": result.to_dict()}
        metrics.valid += 1
        return {"event": enrich(result, catalog).to_dict()}

    def run_stitch(value: dict[str, Any], state: Any) -> list[dict[str, Any]]:
        metrics.stitched_in += 1
        out = stitch(CleanEvent.from_dict(value), state, config)
        if not out:
            metrics.duplicates_dropped += 1
        for record in out:
            if record["kind"] != KIND_LINK:
                metrics.attributed_out += 1
            else:
                metrics.identities_linked += 1
                if record["merged_events"]:
                    metrics.identities_merged += 1
                    metrics.events_merged += record["merged_events"]
        return out

    def run_fold(value: dict[str, Any], state: Any) -> dict[str, Any] | None:
        metrics.attributed_in += 1
        result = fold(value, state, config, now_ms=_now_ms())
        if result is None:
            metrics.replays_dropped += 1
        else:
            metrics.profile_updates += 1
            metrics.clean_out += "event" in result
        return result

    def write_events(wh: LocalWarehouse, rows: list[dict[str, Any]]) -> None:
        stored = wh.write_events(rows)
        metrics.stored_events([r["ingested_ms"] for r in rows], stored)

    def write_profiles(wh: LocalWarehouse, rows: list[dict[str, Any]]) -> None:
        wh.write_profiles(rows)
        metrics.profiles_stored += len(rows)

    def write_dead_letters(wh: LocalWarehouse, rows: list[dict[str, Any]]) -> None:
        wh.write_dead_letters(rows)
        metrics.dead_letters_stored += len(rows)

    def write_links(wh: LocalWarehouse, rows: Sequence[dict[str, Any]]) -> None:
        wh.write_identity_links([{k: v for k, v in r.items() if k != "kind"} for r in rows])

    parsed = app.dataframe(raw).apply(parse, metadata=True)

    failures = parsed.filter(lambda r: "failure" in r).apply(lambda r: r["failure"])
    # keyed like the raw message it failed on (bytes, possibly not UTF-8)
    failures.to_topic(
        app.topic(names.dlq, key_serializer="bytes", value_serializer="json", config=topic_config)
    )
    failures.sink(WarehouseSink(warehouse, write_dead_letters))

    events = parsed.filter(lambda r: "event" in r).apply(lambda r: r["event"])
    by_device = events.group_by(
        lambda e: e["anonymous_id"] or e["previous_id"] or e["user_id"], name="by_device"
    )
    stitched = by_device.apply(run_stitch, stateful=True, expand=True)

    links = stitched.filter(lambda r: r["kind"] == KIND_LINK)
    links.to_topic(out_topic(names.identities), key=lambda r: r["anonymous_id"])
    links.sink(WarehouseSink(warehouse, write_links))

    # quixstreams allows one group_by per dataframe: stage 2 reads an explicit topic instead
    attributed = out_topic(names.attributed)
    stitched.filter(lambda r: r["kind"] != KIND_LINK).to_topic(
        attributed,
        key=lambda r: r["customer_id"] if "customer_id" in r else r["event"]["customer_id"],
    )
    by_customer = app.dataframe(attributed)
    folded = by_customer.apply(run_fold, stateful=True).filter(lambda r: r is not None)

    clean = folded.filter(lambda r: "event" in r).apply(lambda r: r["event"])
    clean.to_topic(out_topic(names.clean))
    clean.sink(WarehouseSink(warehouse, write_events))

    profiles = folded.apply(lambda r: r["profile"])
    profiles.to_topic(out_topic(names.profiles))
    profiles.sink(WarehouseSink(warehouse, write_profiles))
    return app
