"""Producing a request's messages and waiting for the broker's acknowledgements.

:class:`KafkaPublisher` wraps an idempotent ``acks=all`` producer: a background thread polls
delivery reports and resolves each request's future on the event loop, so the loop never
blocks. :class:`MemoryPublisher` is the in-memory stand-in for tests without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from pipeline.broker import producer_config
from pipeline.collector.errors import BrokerUnavailableError
from pipeline.collector.intake import KeyedMessage
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Where the collector sends accepted messages."""

    async def send(self, topic: str, messages: Sequence[KeyedMessage]) -> None:
        """Return once every message is acknowledged; raise BrokerUnavailableError otherwise."""
        ...

    async def healthy(self) -> bool:
        """Whether the broker answers right now."""
        ...

    def alive(self) -> bool:
        """Whether this publisher could deliver once the broker answers (nothing in this
        process that a restart would mend has failed)."""
        ...

    def close(self) -> None:
        """Deliver what is in flight (bounded wait) and release the connection."""
        ...


def collector_producer(settings: Settings, address: str) -> Producer:
    """Idempotent ``acks=all`` producer that gives up on a message when a request would."""
    return Producer(
        {
            **producer_config(settings, address),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 100_000,
            "message.timeout.ms": int(settings.collector.ack_timeout_s * 1000),
            "client.id": "pipeline-collector",
        }
    )


class _Pending:
    """Acknowledgements still awaited for one request; resolved from the polling thread."""

    __slots__ = ("future", "loop", "remaining")

    def __init__(self, n: int, future: asyncio.Future[str | None], loop: asyncio.AbstractEventLoop):
        self.remaining = n
        self.future = future
        self.loop = loop

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._resolve(f"{err.name()}: {err.str()}")
            return
        self.remaining -= 1
        if self.remaining == 0:
            self._resolve(None)

    def _resolve(self, error: str | None) -> None:
        # A closed loop means that nobody waits for the answer any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set_once, self.future, error)


def _set_once(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)


class KafkaPublisher:
    """Produces with a confluent-kafka producer; one polling thread serves delivery reports."""

    def __init__(
        self,
        producer: Producer,
        *,
        ack_timeout_s: float,
        health_timeout_s: float = 2.0,
    ) -> None:
        self._producer = producer
        self._ack_timeout_s = ack_timeout_s
        self._health_timeout_s = health_timeout_s
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="collector-acks", daemon=True)
        self._poller.start()

    @classmethod
    def connect(cls, settings: Settings, address: str) -> KafkaPublisher:
        cfg = settings.collector
        return cls(
            collector_producer(settings, address),
            ack_timeout_s=cfg.ack_timeout_s,
            health_timeout_s=cfg.health_timeout_s,
        )

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def send(self, topic: str, messages: Sequence[KeyedMessage]) -> None:
        if not messages:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()
        pending = _Pending(len(messages), future, loop)
        try:
            for key, value in messages:
                self._producer.produce(topic, value=value, key=key, on_delivery=pending.on_delivery)
        except BufferError:
            raise BrokerUnavailableError(
                "queue_full", "the producer queue is full; the broker is slow or down"
            ) from None
        except KafkaException as exc:
            raise BrokerUnavailableError("delivery_failed", f"produce failed: {exc}") from None
        try:
            # librdkafka gives up at message.timeout.ms = ack_timeout_s; its report comes first.
            error = await asyncio.wait_for(future, self._ack_timeout_s + 1.0)
        except TimeoutError:
            raise BrokerUnavailableError(
                "delivery_timeout",
                f"the broker did not acknowledge within {self._ack_timeout_s:g}s",
            ) from None
        if error is not None:
            code = "delivery_timeout" if "TIMED_OUT" in error else "delivery_failed"
            raise BrokerUnavailableError(code, f"the broker did not take the events: {error}")

    async def healthy(self) -> bool:
        def probe() -> bool:
            try:
                self._producer.list_topics(timeout=self._health_timeout_s)
            except KafkaException:
                return False
            return True

        return await asyncio.to_thread(probe)

    def alive(self) -> bool:
        """The delivery-report thread runs: without it no request would ever be answered."""
        return self._poller.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=1.0)
        left = self._producer.flush(self._ack_timeout_s)
        if left:
            log.warning("collector closed with %d unacknowledged messages", left)


class MemoryPublisher:
    """In-memory stand-in: keeps (topic, key, value) of every message it is sent."""

    def __init__(self, *, available: bool = True) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.available = available
        self.closed = False

    async def send(self, topic: str, messages: Sequence[KeyedMessage]) -> None:
        if not self.available:
            raise BrokerUnavailableError("delivery_timeout", "the broker is unavailable")
        self.sent.extend((topic, key, value) for key, value in messages)

    async def healthy(self) -> bool:
        return self.available

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True
