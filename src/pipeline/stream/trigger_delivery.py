"""From trigger to inbox: render the email, schedule it at the optimized send time, deliver it.

Each new trigger (see :mod:`pipeline.triggers`) becomes one rendered email (recommendations with
reasons, as-of snapshot) queued at the customer's best send time; every scan delivers what is
due through the email platform client (retries, idempotency keys). Sent emails land in the
``sent_emails`` table; permanent failures go to the email dead-letter topic.

The queue survives restarts: each queued email is also kept in the ``scheduled_emails`` table
(without its address) until it is sent or fails for good, and :meth:`TriggeredDelivery.recover`
queues them again at start-up. A trigger is recorded as emitted (``email_triggers``) in the
transaction that keeps its email, so one whose email could not be rendered is emitted again by
the next scan. When an email falls due, it is not sent if its row is gone (``pipeline forget``
deletes the customer's), if its very trigger is no longer due (the customer ordered, emptied
the cart, or added to it since: a newer trigger's email replaces it), or if the customer can no
longer be emailed (consent withdrawn, no address); otherwise it goes to the customer's address
as it is then. An email whose send time was missed (the process or the platform was down past
that local hour) waits for the same hour of a later day, unless its trigger has expired
meanwhile (``triggers.max_age_hours``): then it is dropped. What is not settled when a step
fails (the record of sent emails, the dead letters' acknowledgement) stays scheduled and is
queued again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from confluent_kafka import Producer

from pipeline.api.service import PersonalizationService
from pipeline.delivery.client import EmailPlatform
from pipeline.delivery.payload import (
    Delivered,
    DeliveryFailure,
    DeliveryOutcome,
    EmailPayload,
    idempotency_key,
    payload_for,
)
from pipeline.delivery.scheduler import DeliveryScheduler, RenderJob, deliver_due
from pipeline.errors import BrokerError, PipelineError, ProfileNotFoundError
from pipeline.scoring import Profile, profile_from_dict
from pipeline.sendtime import open_slot_ms
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.trigger_scan import watermark
from pipeline.triggers import TRIGGER_KINDS, Trigger, TriggerParams, due_triggers, expired

log = logging.getLogger(__name__)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class DeliveryStats:
    """What the trigger delivery did since it started."""

    scheduled: int = 0
    skipped_no_consent: int = 0  # no address or consent: when queued, recovered or due
    delivered: int = 0
    failed: int = 0
    recovered: int = 0
    dropped_forgotten: int = 0
    dropped_stale: int = 0  # their trigger was no longer due when the email fell due
    dropped_expired: int = 0  # send time missed and the trigger too old for another day
    replanned: int = 0  # send time missed: moved to the same local hour of a later day
    deferred: int = 0  # sends that failed while the platform was down, tried again later


RENDER_TRIES = 5
"""Scans that try a trigger's email before it is given up (a render that cannot succeed)."""

PLATFORM_DOWN: frozenset[str] = frozenset({"retries_exhausted", "token_rejected", "unauthorized"})
"""Failures that say the platform (or its identity provider) is down or our credentials are
being rotated, not that this email is wrong: the email is tried again later."""
PAUSE_MS = 30_000
"""How long sending pauses after the platform failed; doubled for each failure in a row."""
MAX_PAUSE_MS = 15 * 60_000


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
    _render_failures: dict[str, int] = field(default_factory=dict)  # per trigger id
    _outages: int = 0  # deliveries in a row that found the platform down
    _paused_until_ms: int = 0  # no sends before this (the platform was down)

    def schedule(self, triggers: Sequence[Trigger]) -> int:
        """Render and queue one email per trigger; customers without an address or consent
        are skipped. Returns how many were queued.

        Each trigger is recorded as emitted with its email, in one transaction (a skipped one
        too): one that could not be rendered stays unrecorded, so the next scan emits it again
        (see :func:`~pipeline.stream.trigger_scan.emit_due`), up to :data:`RENDER_TRIES`
        scans; then it is recorded without an email, and an error logged.
        """
        queued: dict[str, tuple[RenderJob, Mapping[str, Any]]] = {}
        handled: list[Trigger] = []
        for trigger in triggers:
            try:
                view = self.service.campaign_email(trigger.customer_id, trigger.trigger)
                stored = self.warehouse.get_profile(trigger.customer_id)
            except ProfileNotFoundError:
                # forgotten meanwhile: nothing to send, and no row to keep about them
                log.info("%s for %s: the customer is gone", trigger.trigger, trigger.customer_id)
                continue
            except PipelineError:
                tries = self._render_failures.get(trigger.trigger_id, 0) + 1
                if tries < RENDER_TRIES:
                    self._render_failures[trigger.trigger_id] = tries
                    log.warning(
                        "cannot render %s for %s: retried", trigger.trigger, trigger.customer_id
                    )
                    continue
                log.error(
                    "cannot render %s for %s after %d tries: given up",
                    trigger.trigger,
                    trigger.customer_id,
                    tries,
                    exc_info=True,
                )
                self._render_failures.pop(trigger.trigger_id, None)
                handled.append(trigger)  # recorded: not emitted again
                continue
            self._render_failures.pop(trigger.trigger_id, None)
            handled.append(trigger)
            to = _address_of(stored)
            if to is None:
                self.stats.skipped_no_consent += 1
                continue
            payload = payload_for(view.email, to, trigger.trigger_id)
            job = RenderJob(view.send_time.send_at_ms, payload)
            if job.key not in self._pending:  # (the same as-of email is queued once)
                queued[job.key] = (job, view.email.snapshot)
        if handled:
            # kept before it is queued: a queued email without its row would be dropped as
            # forgotten when it falls due
            with self.warehouse.batch():
                if queued:
                    self.warehouse.write_scheduled_emails(
                        [_scheduled_row(job, snapshot) for job, snapshot in queued.values()]
                    )
                self.warehouse.write_triggers([t.to_dict() for t in handled])
        for job, snapshot in queued.values():
            self._queue(job, snapshot)
        self.stats.scheduled += len(queued)
        return len(queued)

    def recover(self) -> int:
        """Queue again what an earlier run scheduled and did not send; returns how many.

        The address and consent are looked up again: a customer who lost either since is
        dropped from the schedule. A read that fails raises (the caller tries again later):
        a transient store error must not drop anyone's email.
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
        """Send what is due now; record sent emails and dead-letter permanent failures.

        If recording or dead-lettering raises, the emails not settled yet stay scheduled and
        are queued again before the exception propagates: the next scan sends them again (a
        no-op at the platform, by their idempotency keys).

        A failure that says the platform is down (:data:`PLATFORM_DOWN`: its retries spent,
        the token refused) stops the batch: that email and the untried ones stay queued, and
        sending pauses, 30 s after the first such failure, twice as long after each one in a
        row, at most 15 min, so that an outage neither dead-letters every email due during it
        nor holds the scan in the client's retries email after email. An outage that outlasts
        an email's send hour moves it to that hour of a later day (see :meth:`_still_wanted`).
        """
        now = self.clock_ms()
        if now < self._paused_until_ms:
            return 0, 0
        sending: dict[str, RenderJob] = {}

        def keep(jobs: Sequence[RenderJob]) -> list[RenderJob]:
            wanted = self._still_wanted(jobs, now)
            sending.update((job.key, job) for job in wanted)
            return wanted

        def deferred(outcome: DeliveryOutcome) -> bool:
            return isinstance(outcome, DeliveryFailure) and outcome.reason in PLATFORM_DOWN

        outcomes, failures = deliver_due(
            self.scheduler, self.platform, now, keep=keep, stop=deferred
        )
        sent = [o for o in outcomes if isinstance(o, Delivered)]
        if sent:
            self._outages = 0
        for failure in [f for f in failures if deferred(f)]:  # (the batch's last outcome)
            failures.remove(failure)
            self.scheduler.add(sending[failure.idempotency_key])
            self.stats.deferred += 1
            self._outages += 1
            pause = min(MAX_PAUSE_MS, PAUSE_MS << min(self._outages - 1, 10))
            self._paused_until_ms = now + pause
            log.warning(
                "email platform down (%s); sending paused for %d s", failure.reason, pause // 1000
            )
        settled: set[str] = set()
        try:
            if sent:
                with self.warehouse.batch():  # sent and off the schedule together
                    self.warehouse.write_sent_emails([self._sent_row(o) for o in sent])
                    self.warehouse.unschedule_emails([o.idempotency_key for o in sent])
                settled.update(o.idempotency_key for o in sent)
                self.stats.delivered += len(sent)
            if failures:
                # off the schedule only once every dead letter is acknowledged
                self._dead_letter(failures)
                self.warehouse.unschedule_emails([f.idempotency_key for f in failures])
                settled.update(f.idempotency_key for f in failures)
                self.stats.failed += len(failures)
        except BaseException:
            for key, job in sending.items():
                if key not in settled:
                    self.scheduler.add(job)
            raise
        finally:
            for key in settled:
                self._pending.pop(key, None)
        return len(sent), len(failures)

    def _still_wanted(self, jobs: Sequence[RenderJob], now: int) -> list[RenderJob]:
        """Of the jobs due at ``now``, those to send now, each to the customer's current
        address; those whose send hour is over wait for that hour of a later day; the others
        leave the schedule. None leaves it or moves before every read has succeeded (a read
        that raises leaves the jobs to be queued again)."""
        kept = self.warehouse.still_scheduled([job.key for job in jobs])
        forgotten = [job.key for job in jobs if job.key not in kept]  # forgotten since queued
        # the send time can be days after the trigger: a customer who ordered (or emptied the
        # cart) since is not told they left it
        mark = watermark(self.warehouse) if kept else None
        wanted: list[RenderJob] = []
        later: list[RenderJob] = []
        dropped: dict[str, list[str]] = {"stale": [], "unreachable": [], "expired": []}
        for job in jobs:
            if job.key not in kept:
                continue
            try:
                stored: dict[str, Any] | None = self.warehouse.get_profile(job.payload.customer)
            except ProfileNotFoundError:
                stored = None
            profile = None if stored is None else profile_from_dict(stored)
            to = None if stored is None else _address_of(stored)
            due, trigger = self._still_due(job.payload, profile, mark)
            tz = (profile and profile.timezone) or self.service.config.send_time.default_timezone
            slot = open_slot_ms(job.send_at_ms, now, tz)
            if not due:
                dropped["stale"].append(job.key)
            elif to is None:  # consent withdrawn or address removed since it was queued
                dropped["unreachable"].append(job.key)
            elif slot != job.send_at_ms and self._expired(trigger, mark):
                dropped["expired"].append(job.key)
            elif slot > now:  # its hour is over: the same hour of a later day
                later.append(RenderJob(slot, job.payload))
            else:
                job = RenderJob(slot, job.payload)
                wanted.append(job if to == job.payload.to else self._readdressed(job, to))
        gone = [key for keys in dropped.values() for key in keys]
        if gone:
            self.warehouse.unschedule_emails(gone)
        if later:
            self.warehouse.reschedule_emails({job.key: job.send_at_ms for job in later})
        for job in later:
            self.scheduler.add(job)
        for key in (*forgotten, *gone):
            self._pending.pop(key, None)
        self.stats.dropped_forgotten += len(forgotten)
        self.stats.dropped_stale += len(dropped["stale"])
        self.stats.skipped_no_consent += len(dropped["unreachable"])
        self.stats.dropped_expired += len(dropped["expired"])
        self.stats.replanned += len(later)
        if dropped["expired"]:
            log.info(
                "%d emails missed their send time and their triggers expired: dropped",
                len(dropped["expired"]),
            )
        return wanted

    def _still_due(
        self, payload: EmailPayload, profile: Profile | None, mark: int | None
    ) -> tuple[bool, Trigger | None]:
        """Whether the trigger behind a queued email is still due for its customer
        (``profile``, None when gone) at the stream's watermark ``mark``: that very occurrence,
        not only its kind (a cart added to since arms a new trigger, whose own email is the
        one to send); and that trigger, when it could be read."""
        if payload.campaign not in TRIGGER_KINDS:
            return True, None  # not a trigger's email
        if profile is None:
            return False, None
        if mark is None:
            return True, None
        for t in due_triggers(profile, mark, self.trigger_params):
            key = idempotency_key(payload.campaign, payload.customer, t.trigger_id)
            if key == payload.idempotency_key:
                return True, t
        return False, None

    def _expired(self, trigger: Trigger | None, mark: int | None) -> bool:
        return (
            trigger is not None and mark is not None and expired(trigger, mark, self.trigger_params)
        )

    def _readdressed(self, job: RenderJob, to: str) -> RenderJob:
        """``job`` sent to ``to``, the customer's address changed since it was queued."""
        payload = replace(job.payload, to=to)
        self._pending[job.key] = (payload, self._pending[job.key][1])
        return RenderJob(job.send_at_ms, payload)

    def _queue(self, job: RenderJob, snapshot: Mapping[str, Any]) -> bool:
        if not self.scheduler.add(job):
            return False
        self._pending[job.key] = (job.payload, snapshot)
        return True

    def _address(self, customer_id: str) -> str | None:
        """The customer's address if they can still be emailed (profile kept, consent); a
        failed read raises."""
        try:
            return _address_of(self.warehouse.get_profile(customer_id))
        except ProfileNotFoundError:
            return None

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

    def _dead_letter(self, failures: Sequence[DeliveryFailure]) -> None:
        """Produce every failure to the dead-letter topic, then wait once for them all; raises
        :class:`BrokerError` if any is not acknowledged (the caller keeps them scheduled)."""
        for failure in failures:
            self.producer.produce(
                self.dlq_topic,
                key=failure.customer.encode(),
                value=orjson.dumps(failure.to_dict()),
            )
        if self.producer.flush(30):
            raise BrokerError(f"email dead letters not acknowledged on {self.dlq_topic!r}")


def _address_of(stored: Mapping[str, Any]) -> str | None:
    """The address of a stored profile, None if it has none or the customer withdrew consent."""
    traits = stored.get("traits", {})
    to = traits.get("email")
    if not isinstance(to, str) or traits.get("emailConsent") is False:
        return None
    return to


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
