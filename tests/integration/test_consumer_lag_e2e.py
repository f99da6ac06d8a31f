"""Consumer lag from a real consumer's librdkafka statistics, against the embedded broker."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.broker import EmbeddedBroker
from pipeline.metrics import StreamMetrics, consumer_stats_config
from pipeline.observability import exposition, metrics_registry

pytestmark = pytest.mark.integration

TOPIC = "lag.test"
PARTITIONS = (0, 1)
PRODUCED = 20  # per partition
TAKE = 5  # consumed per partition before the partition is paused
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker.start() as running:
        admin = AdminClient({"bootstrap.servers": running.address})
        # explicit retention: Tansu's DescribeConfigs leaves it out (see pipeline.broker)
        config = {"retention.ms": "3600000", "retention.bytes": "-1"}
        for future in admin.create_topics(
            [NewTopic(TOPIC, len(PARTITIONS), 1, config=config)]
        ).values():
            future.result(timeout=15)
        producer = Producer({"bootstrap.servers": running.address, "enable.idempotence": True})
        for p in PARTITIONS:
            for i in range(PRODUCED):
                producer.produce(TOPIC, value=b"event %d" % i, key=b"k%d" % i, partition=p)
        assert producer.flush(15) == 0
        yield running


def _poll_until(
    consumer: Consumer, consumed: Counter[int], done: Callable[[], bool], what: str
) -> None:
    """Serve callbacks (stats among them) until ``done``; count any message that still comes."""
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        msg = consumer.poll(0.1)
        if msg is not None and msg.error() is None:
            consumed[msg.partition()] += 1


def test_lag_equals_produced_minus_consumed_before_and_after_commit(
    broker: EmbeddedBroker,
) -> None:
    metrics = StreamMetrics()
    raw: list[dict[str, Any]] = []
    config = consumer_stats_config(metrics, interval_ms=100)
    report = config["stats_cb"]

    def stats_cb(stats_json: str) -> None:
        raw.append(orjson.loads(stats_json))
        report(stats_json)

    consumer = Consumer(
        {
            "bootstrap.servers": broker.address,
            "group.id": "lag-test",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # as quixstreams configures its consumer: offsets are never stored
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
            **config,
            "stats_cb": stats_cb,
        }
    )
    consumed: Counter[int] = Counter()

    def take(msg: Any) -> None:
        consumed[msg.partition()] += 1
        if consumed[msg.partition()] == TAKE:
            consumer.pause([TopicPartition(TOPIC, msg.partition())])

    def expected() -> dict[tuple[str, int], int]:
        return {(TOPIC, p): PRODUCED - consumed[p] for p in PARTITIONS}

    def librdkafka_lag() -> dict[int, int]:
        partitions = raw[-1]["topics"][TOPIC]["partitions"] if raw else {}
        return {int(p): s["consumer_lag"] for p, s in partitions.items() if int(p) >= 0}

    try:
        consumer.subscribe([TOPIC])
        deadline = time.monotonic() + DEADLINE_S
        while any(consumed[p] < TAKE for p in PARTITIONS):
            assert time.monotonic() < deadline, f"consumed only {dict(consumed)}"
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                take(msg)

        _poll_until(consumer, consumed, lambda: metrics.consumer_lag() == expected(), "lag")
        assert sum(expected().values()) == PRODUCED * len(PARTITIONS) - sum(consumed.values())
        # nothing committed yet: librdkafka's own consumer_lag does not know, ours does
        assert librdkafka_lag() == {0: -1, 1: -1}

        consumer.commit(
            offsets=[TopicPartition(TOPIC, p, consumed[p]) for p in PARTITIONS],
            asynchronous=False,
        )
        committed = {p: PRODUCED - consumed[p] for p in PARTITIONS}
        _poll_until(consumer, consumed, lambda: librdkafka_lag() == committed, "commit")
        assert metrics.consumer_lag() == expected()
    finally:
        consumer.close()

    # the same statistics count the requests it sent, read off librdkafka's own counters
    brokers = raw[-1]["brokers"].values()
    fetches = sum(b["req"].get("Fetch", 0) for b in brokers)
    assert fetches > 0
    assert metrics.broker_requests()[("consumer", "Fetch")] == fetches
    assert metrics.broker_requests()[("consumer", "OffsetCommit")] >= 1  # the commit above
    lines = exposition(metrics_registry(metrics)).splitlines()
    for p in PARTITIONS:
        value = float(PRODUCED - consumed[p])
        assert f'pipeline_consumer_lag{{partition="{p}",topic="{TOPIC}"}} {value}' in lines
