"""Shared helpers of the collector integration tests: settings, a running server, a topic reader."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import SecretStr

from pipeline.broker import free_port
from pipeline.collector.config import CollectorSettings
from pipeline.collector.server import serve_in_thread
from pipeline.settings import Settings

KEYS = {"storefront": "wk_store_test", "backend": "wk_backend_test"}
ALLOWED_ORIGIN = "http://shop.test"


def collector_settings(home: Path, **collector: Any) -> Settings:
    """Settings for tests: two sources, one allowed browser origin, a free port."""
    return Settings(
        home=home,
        partitions=2,
        commit_interval_s=0.3,
        collector=CollectorSettings(
            port=free_port(),
            write_keys={source: SecretStr(key) for source, key in KEYS.items()},
            cors_origins=(ALLOWED_ORIGIN,),
            **collector,
        ),
    )


@contextmanager
def running_collector(settings: Settings, address: str) -> Iterator[str]:
    """A real uvicorn collector on 127.0.0.1; yields its base URL and stops it afterwards."""
    running = serve_in_thread(settings, address)
    try:
        yield running.url
    finally:
        running()


def read_raw(
    settings: Settings, address: str, message_ids: set[str], *, timeout_s: float = 20.0
) -> dict[str, tuple[bytes | None, dict[str, Any]]]:
    """The raw-topic messages whose messageId is in ``message_ids``: id -> (key, payload).

    Partitions are assigned from the beginning (no group join, which is slow on Tansu).
    """
    consumer = _reader(settings, address)
    found: dict[str, tuple[bytes | None, dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not message_ids <= found.keys():
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            payload = orjson.loads(msg.value())
            if payload.get("messageId") in message_ids:
                found[payload["messageId"]] = (msg.key(), payload)
    finally:
        consumer.close()
    return found


def read_raw_matching(
    settings: Settings,
    address: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    expect: int,
    timeout_s: float = 20.0,
) -> list[dict[str, Any]]:
    """Raw-topic payloads for which ``predicate`` holds, once ``expect`` of them were read."""
    consumer = _reader(settings, address)
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(found) < expect:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            payload = orjson.loads(msg.value())
            if predicate(payload):
                found.append(payload)
    finally:
        consumer.close()
    return found


def _reader(settings: Settings, address: str) -> Consumer:
    consumer = Consumer(
        {"bootstrap.servers": address, "group.id": "collector-test", "enable.auto.commit": False}
    )
    consumer.assign(
        [
            TopicPartition(settings.topics.raw, p, OFFSET_BEGINNING)
            for p in range(settings.partitions)
        ]
    )
    return consumer


def all_raw_ids(settings: Settings, address: str, *, quiet_s: float = 1.5) -> list[str]:
    """Every messageId on the raw topic (read until nothing new arrives for ``quiet_s``)."""
    consumer = _reader(settings, address)
    ids: list[str] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            ids.append(orjson.loads(msg.value()).get("messageId"))
            last = time.monotonic()
    finally:
        consumer.close()
    return ids
