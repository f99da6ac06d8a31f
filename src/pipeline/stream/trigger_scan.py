"""The scheduled trigger scan: profile store + watermark in, ``email.triggers`` records out.

Produce first (idempotent producer, acknowledged), then record the trigger id: a crash in
between re-emits the same id on the next scan, never loses one (see :mod:`pipeline.triggers`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import orjson
from confluent_kafka import Producer

from pipeline.errors import BrokerError
from pipeline.scoring import profile_from_dict
from pipeline.stores.local import LocalWarehouse
from pipeline.triggers import Trigger, TriggerParams, due_triggers

log = logging.getLogger(__name__)

_CANDIDATES = """
SELECT profile FROM profiles
WHERE is_anonymous = 0 AND merged_into IS NULL
  AND (json_extract(profile, '$.last_cart_ms') IS NOT NULL
       OR json_extract(profile, '$.last_view_ms') IS NOT NULL)
"""


def watermark(warehouse: LocalWarehouse) -> int | None:
    """The stream's event-time watermark: the newest event time stored."""
    value = warehouse.scalar("SELECT MAX(event_ts_ms) FROM events")
    return None if value is None else int(value)


def find_due(warehouse: LocalWarehouse, params: TriggerParams) -> list[Trigger]:
    """Every trigger due at the current watermark, emitted before or not."""
    mark = watermark(warehouse)
    if mark is None:
        return []
    rows = warehouse.query(_CANDIDATES)["profile"]
    found: list[Trigger] = []
    for raw in rows:
        found.extend(due_triggers(profile_from_dict(orjson.loads(raw)), mark, params))
    return found


def emit_due(
    warehouse: LocalWarehouse, producer: Producer, topic: str, params: TriggerParams
) -> list[Trigger]:
    """Produce the triggers not emitted yet and record them; returns those emitted now."""
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
    warehouse.write_triggers([t.to_dict() for t in fresh])
    return fresh


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
