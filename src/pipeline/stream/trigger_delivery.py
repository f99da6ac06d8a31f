"""From trigger to inbox: render the email, schedule it at the optimized send time, deliver it.

Each new trigger (see :mod:`pipeline.triggers`) becomes one rendered email (recommendations with
reasons, as-of snapshot) queued at the customer's best send time; every scan delivers what is
due through the email platform client (retries, idempotency keys). Sent emails land in the
``sent_emails`` table; permanent failures go to the email dead-letter topic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Producer

from pipeline.api.service import PersonalizationService
from pipeline.delivery.client import EmailPlatform
from pipeline.delivery.payload import Delivered, DeliveryFailure, EmailPayload, payload_for
from pipeline.delivery.scheduler import DeliveryScheduler, RenderJob, deliver_due
from pipeline.errors import BrokerError, PipelineError
from pipeline.stores.local import LocalWarehouse
from pipeline.triggers import Trigger

log = logging.getLogger(__name__)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class DeliveryStats:
    """What the trigger delivery did since it started."""

    scheduled: int = 0
    skipped_no_consent: int = 0
    delivered: int = 0
    failed: int = 0


@dataclass
class TriggeredDelivery:
    """Schedules an email per trigger and sends those that are due (see module docstring)."""

    service: PersonalizationService
    platform: EmailPlatform
    warehouse: LocalWarehouse
    producer: Producer
    dlq_topic: str
    clock_ms: Callable[[], int] = _wall_ms
    scheduler: DeliveryScheduler = field(default_factory=DeliveryScheduler)
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _pending: dict[str, tuple[EmailPayload, Mapping[str, Any]]] = field(default_factory=dict)

    def schedule(self, triggers: Sequence[Trigger]) -> int:
        """Render and queue one email per trigger; customers without an address or consent
        are skipped. Returns how many were queued."""
        queued = 0
        for trigger in triggers:
            try:
                view = self.service.campaign_email(trigger.customer_id, trigger.trigger)
            except PipelineError:
                log.warning("cannot render %s for %s", trigger.trigger, trigger.customer_id)
                continue
            traits = self.warehouse.get_profile(trigger.customer_id).get("traits", {})
            if view.to is None or traits.get("emailConsent") is False:
                self.stats.skipped_no_consent += 1
                continue
            payload = payload_for(view.email, view.to)
            if self.scheduler.add(RenderJob(view.send_time.send_at_ms, payload)):
                self._pending[payload.idempotency_key] = (payload, view.email.snapshot)
                queued += 1
        self.stats.scheduled += queued
        return queued

    def deliver(self) -> tuple[int, int]:
        """Send what is due now; record sent emails and dead-letter permanent failures."""
        outcomes, failures = deliver_due(self.scheduler, self.platform, self.clock_ms())
        sent = [o for o in outcomes if isinstance(o, Delivered)]
        if sent:
            self.warehouse.write_sent_emails([self._sent_row(o) for o in sent])
        for failure in failures:
            self._dead_letter(failure)
        for outcome in outcomes:
            self._pending.pop(outcome.idempotency_key, None)
        self.stats.delivered += len(sent)
        self.stats.failed += len(failures)
        return len(sent), len(failures)

    def _sent_row(self, outcome: Delivered) -> dict[str, object]:
        payload, snapshot = self._pending[outcome.idempotency_key]
        return {
            "email_id": outcome.idempotency_key,
            "customer_id": outcome.customer,
            "campaign_id": outcome.campaign,
            "subject": payload.subject,
            "to": payload.to,
            "sent_ms": outcome.delivered_ms,
            "html": payload.html,
            "text": payload.text,
            "snapshot": snapshot,
        }

    def _dead_letter(self, failure: DeliveryFailure) -> None:
        self.producer.produce(
            self.dlq_topic, key=failure.customer.encode(), value=orjson.dumps(failure.to_dict())
        )
        if self.producer.flush(30):
            raise BrokerError(f"email dead letter not acknowledged on {self.dlq_topic!r}")
