"""The scheduled trigger scan: profile store + watermark in, ``email.triggers`` records out,
and ticks of the stream's clock for segments that change with time alone (SegmentClock).

Produce first (idempotent producer, acknowledged), then record the trigger id: a crash in
between re-emits the same id on the next scan, never loses one (see :mod:`pipeline.triggers`).
When emails are sent for triggers, the delivery records each one with its email instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import orjson
from confluent_kafka import Producer

from pipeline.errors import BrokerError
from pipeline.scoring import profile_from_dict
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.stages import KIND_TICK, StageConfig, segments_due
from pipeline.triggers import Trigger, TriggerParams, due_triggers, expired

log = logging.getLogger(__name__)

_CANDIDATES = """
SELECT profile FROM profiles
WHERE is_anonymous = 0 AND merged_into IS NULL
  AND (json_extract(profile, '$.last_cart_ms') IS NOT NULL
       OR json_extract(profile, '$.last_view_ms') IS NOT NULL)
"""


# How far event time may run ahead of the newest arrival: device clocks a little fast
ARRIVAL_ALLOWANCE_MS = 60_000

# two subqueries: each is an index lookup, where one SELECT of both maxima reads every row
_WATERMARK = (
    "SELECT MIN((SELECT MAX(event_ts_ms) FROM events), (SELECT MAX(ingested_ms) FROM events) + ?)"
)


def watermark(warehouse: LocalWarehouse) -> int | None:
    """The stream's event-time watermark: the newest event time stored, but no later than the
    newest arrival at the broker (``ingested_ms``) plus :data:`ARRIVAL_ALLOWANCE_MS`.

    Event times come from the customers' devices and are accepted up to a day in the future;
    arrival times come from our side. Without the bound, one device with a fast clock would
    move the stream's clock ahead for everyone and fire every pending trigger early.
    """
    value = warehouse.scalar(_WATERMARK, (ARRIVAL_ALLOWANCE_MS,))
    return None if value is None else int(value)


def find_due(warehouse: LocalWarehouse, params: TriggerParams) -> list[Trigger]:
    """Every trigger due at the current watermark and not expired, emitted before or not."""
    mark = watermark(warehouse)
    if mark is None:
        return []
    rows = warehouse.query(_CANDIDATES)["profile"]
    found: list[Trigger] = []
    for raw in rows:
        for trigger in due_triggers(profile_from_dict(orjson.loads(raw)), mark, params):
            if not expired(trigger, mark, params):
                found.append(trigger)
    return found


def emit_due(
    warehouse: LocalWarehouse,
    producer: Producer,
    topic: str,
    params: TriggerParams,
    *,
    record: bool = True,
) -> list[Trigger]:
    """Produce the triggers not emitted yet and record them; returns those emitted now.

    ``record=False`` leaves the recording to the caller (the email delivery records a trigger
    with its email): until then, every scan emits it again under the same id.
    """
    emitted = set(warehouse.query("SELECT trigger_id FROM email_triggers")["trigger_id"])
    fresh = [t for t in find_due(warehouse, params) if t.trigger_id not in emitted]
    if not fresh:
        return []
    for t in fresh:
        producer.produce(
            topic,
            key=t.customer_id.encode(),
            value=orjson.dumps(t.to_dict()),
            headers={"trigger_id": t.trigger_id.encode()},
        )
    if producer.flush(30):
        raise BrokerError(f"triggers not acknowledged by the broker on {topic!r}")
    if record:
        warehouse.write_triggers([t.to_dict() for t in fresh])
    return fresh


_CUSTOMERS = "SELECT profile FROM profiles WHERE is_anonymous = 0 AND merged_into IS NULL"


def emit_segment_ticks(
    warehouse: LocalWarehouse, producer: Producer, topic: str, config: StageConfig, at_ms: int
) -> int:
    """Send stage 2 a tick of the clock at ``at_ms`` for every customer whose segments it
    changes (:func:`~pipeline.stream.stages.segments_due`); returns how many were sent."""
    due = [
        profile.customer_id
        for profile in (
            profile_from_dict(orjson.loads(raw)) for raw in warehouse.query(_CUSTOMERS)["profile"]
        )
        if segments_due(profile, config, at_ms)
    ]
    for customer_id in due:
        tick = {"kind": KIND_TICK, "customer_id": customer_id, "at_ms": at_ms}
        producer.produce(topic, key=customer_id.encode(), value=orjson.dumps(tick))
    if due and producer.flush(30):
        raise BrokerError(f"segment ticks not acknowledged by the broker on {topic!r}")
    return len(due)


class SegmentClock:
    """Ticks the stream's clock for time-dependent segments from the trigger scan: each time
    the event-time watermark has moved ``every_ms`` since the last tick, and at most once per
    ``every_ms`` of wall-clock time (a tick reads every customer's profile, about 12 us each:
    while a backlog is caught up, event time runs far faster than the scan)."""

    def __init__(
        self,
        warehouse: LocalWarehouse,
        producer: Producer,
        topic: str,
        config: StageConfig,
        every_ms: int,
        *,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._warehouse = warehouse
        self._producer = producer
        self._topic = topic
        self._config = config
        self._every_ms = every_ms
        self._wall_ms = wall_ms
        self._last_ms: int | None = None
        self._last_wall_ms: int | None = None
        self.ticks = 0

    def tick(self) -> int:
        """Send the ticks due now (none while the clock has not moved far enough)."""
        if not self._config.segments:
            return 0
        now = self._wall_ms()
        if self._last_wall_ms is not None and now - self._last_wall_ms < self._every_ms:
            return 0
        mark = watermark(self._warehouse)
        if mark is None or (self._last_ms is not None and mark - self._last_ms < self._every_ms):
            return 0
        sent = emit_segment_ticks(self._warehouse, self._producer, self._topic, self._config, mark)
        self._last_ms, self._last_wall_ms = mark, now
        self.ticks += sent
        return sent


def scan_periodically(
    scan: Callable[[], object], interval_s: float, stop: threading.Event
) -> threading.Thread:
    """Run ``scan`` every ``interval_s`` seconds in a daemon thread until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                scan()
            except Exception:  # a bug or an unforeseen answer must not end the schedule
                log.exception("trigger scan failed; retried at the next interval")

    thread = threading.Thread(target=loop, name="trigger-scan", daemon=True)
    thread.start()
    return thread
