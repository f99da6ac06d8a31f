"""From trigger to inbox: render the email, schedule it at the optimized send time, deliver it.

Each new trigger (see :mod:`pipeline.triggers`) becomes one rendered email (recommendations with
reasons, as-of snapshot) queued at the customer's best send time; every scan delivers what is
due through the email platform client (retries, idempotency keys). Sent emails land in the
``sent_emails`` table; permanent failures go to the email dead-letter topic.

The queue survives restarts: each queued email is also kept in the ``scheduled_emails`` table
(without its address) until it is sent or fails for good, and :meth:`TriggeredDelivery.recover`
queues them again at start-up, looking the address and consent up again. An email whose row is
gone when it falls due (``pipeline forget`` deletes the customer's) is not sent, and neither is
one whose trigger is no longer due then (the customer ordered, or emptied the cart, since).
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
from pipeline.errors import BrokerError, PipelineError, ProfileNotFoundError
from pipeline.scoring import profile_from_dict
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.trigger_scan import watermark
from pipeline.triggers import TRIGGER_KINDS, Trigger, TriggerParams, due_triggers

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
    recovered: int = 0
    dropped_forgotten: int = 0
    dropped_stale: int = 0  # their trigger was no longer due when the email fell due


@dataclass
class TriggeredDelivery:
    """Schedules an email per trigger and sends those that are due (see module docstring)."""

    service: PersonalizationService
    platform: EmailPlatform
    warehouse: LocalWarehouse
    producer: Producer
    dlq_topic: str
    clock_ms: Callable[[], int] = _wall_ms
    trigger_params: TriggerParams = field(default_factory=TriggerParams)
    scheduler: DeliveryScheduler = field(default_factory=DeliveryScheduler)
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _pending: dict[str, tuple[EmailPayload, Mapping[str, Any]]] = field(default_factory=dict)

    def schedule(self, triggers: Sequence[Trigger]) -> int:
        """Render and queue one email per trigger; customers without an address or consent
        are skipped. Returns how many were queued."""
        queued: list[tuple[RenderJob, Mapping[str, Any]]] = []
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
            payload = payload_for(view.email, view.to, trigger.trigger_id)
            job = RenderJob(view.send_time.send_at_ms, payload)
            if self._queue(job, view.email.snapshot):
                queued.append((job, view.email.snapshot))
        if queued:
            self.warehouse.write_scheduled_emails(
                [_scheduled_row(job, snapshot) for job, snapshot in queued]
            )
        self.stats.scheduled += len(queued)
        return len(queued)

    def recover(self) -> int:
        """Queue again what an earlier run scheduled and did not send; returns how many.

        The address and consent are looked up again: a customer who lost either since is
        dropped from the schedule.
        """
        recovered, gone = 0, []
        for row in self.warehouse.scheduled_emails():
            to = self._address(row["customer_id"])
            if to is None:
                gone.append(row["email_id"])
                self.stats.skipped_no_consent += 1
                continue
            payload = EmailPayload(
                to=to,
                subject=row["subject"],
                html=row["html"],
                text=row["text"],
                campaign=row["campaign_id"],
                customer=row["customer_id"],
                idempotency_key=row["email_id"],
            )
            recovered += self._queue(RenderJob(row["send_at_ms"], payload), row["snapshot"])
        if gone:
            self.warehouse.unschedule_emails(gone)
        self.stats.recovered += recovered
        return recovered

    def deliver(self) -> tuple[int, int]:
        """Send what is due now; record sent emails and dead-letter permanent failures."""

        def still_wanted(jobs: Sequence[RenderJob]) -> list[RenderJob]:
            kept = self.warehouse.still_scheduled([job.key for job in jobs])
            for job in jobs:
                if job.key not in kept:  # the customer was forgotten since it was queued
                    self._pending.pop(job.key, None)
                    self.stats.dropped_forgotten += 1
            wanted = [job for job in jobs if job.key in kept]
            # the send time can be days after the trigger: a customer who ordered (or
            # emptied the cart) since is not told they left it
            mark = watermark(self.warehouse) if wanted else None
            stale = [job.key for job in wanted if not self._still_due(job.payload, mark)]
            if stale:
                self.warehouse.unschedule_emails(stale)
                for key in stale:
                    self._pending.pop(key, None)
                self.stats.dropped_stale += len(stale)
            return [job for job in wanted if job.key not in stale]

        outcomes, failures = deliver_due(
            self.scheduler, self.platform, self.clock_ms(), keep=still_wanted
        )
        sent = [o for o in outcomes if isinstance(o, Delivered)]
        if outcomes:
            with self.warehouse.batch():  # sent and off the schedule together
                if sent:
                    self.warehouse.write_sent_emails([self._sent_row(o) for o in sent])
                self.warehouse.unschedule_emails([o.idempotency_key for o in outcomes])
        for failure in failures:
            self._dead_letter(failure)
        for outcome in outcomes:
            self._pending.pop(outcome.idempotency_key, None)
        self.stats.delivered += len(sent)
        self.stats.failed += len(failures)
        return len(sent), len(failures)

    def _still_due(self, payload: EmailPayload, mark: int | None) -> bool:
        """Whether the trigger behind a queued email is still due for its customer at the
        stream's watermark ``mark``."""
        if payload.campaign not in TRIGGER_KINDS:
            return True  # not a trigger's email
        try:
            stored = self.warehouse.get_profile(payload.customer)
        except ProfileNotFoundError:
            return False
        if mark is None:
            return True
        due = due_triggers(profile_from_dict(stored), mark, self.trigger_params)
        return any(t.trigger == payload.campaign for t in due)

    def _queue(self, job: RenderJob, snapshot: Mapping[str, Any]) -> bool:
        if not self.scheduler.add(job):
            return False
        self._pending[job.key] = (job.payload, snapshot)
        return True

    def _address(self, customer_id: str) -> str | None:
        """The customer's address if they can still be emailed (profile kept, consent)."""
        try:
            traits = self.warehouse.get_profile(customer_id).get("traits", {})
        except PipelineError:
            return None
        to = traits.get("email")
        if not isinstance(to, str) or traits.get("emailConsent") is False:
            return None
        return to

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


def _scheduled_row(job: RenderJob, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    p = job.payload
    return {
        "email_id": job.key,
        "customer_id": p.customer,
        "campaign_id": p.campaign,
        "send_at_ms": job.send_at_ms,
        "subject": p.subject,
        "html": p.html,
        "text": p.text,
        "snapshot": snapshot,
    }
