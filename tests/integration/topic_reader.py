"""Read a whole topic back with a real consumer: what downstream readers of our topics see."""

from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.broker import client_config
from pipeline.settings import Settings


def read_topic(
    settings: Settings, address: str, topic: str, *, quiet_polls: int = 4
) -> list[tuple[bytes | None, bytes]]:
    """Every committed ``(key, value)`` of ``topic`` from the beginning, until it is quiet
    for ``quiet_polls`` half-second polls."""
    consumer = Consumer(
        {
            **client_config(settings, address),
            "group.id": f"test-reader-{topic}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[tuple[bytes | None, bytes]] = []
        idle = 0
        while idle < quiet_polls:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 1
            elif msg.error() is None:
                out.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return out
