"""Holding rendered emails until their optimized send time; pure (the caller passes now)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pipeline.delivery.client import EmailPlatform
from pipeline.delivery.payload import DeliveryFailure, DeliveryOutcome, EmailPayload


@dataclass(frozen=True, slots=True)
class RenderJob:
    """One email to send at ``send_at_ms`` (UTC ms), e.g. the customer's best send time."""

    send_at_ms: int
    payload: EmailPayload

    @property
    def key(self) -> str:
        return self.payload.idempotency_key


class DeliveryScheduler:
    """A queue of render jobs by send time; :meth:`due` yields those whose time has come.

    A job whose idempotency key is already queued is ignored (re-renders of the same as-of
    profile are the same email); ties in time keep insertion order.
    """

    def __init__(self, jobs: Iterable[RenderJob] = ()) -> None:
        self._heap: list[tuple[int, int, RenderJob]] = []
        self._queued: set[str] = set()
        self._order = itertools.count()
        for job in jobs:
            self.add(job)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, job: RenderJob) -> bool:
        """Queue ``job``; False when a job with its key is already queued."""
        if job.key in self._queued:
            return False
        self._queued.add(job.key)
        heapq.heappush(self._heap, (job.send_at_ms, next(self._order), job))
        return True

    def next_due_ms(self) -> int | None:
        """The earliest queued send time, None when empty (how long a worker may sleep)."""
        return self._heap[0][0] if self._heap else None

    def due(self, now_ms: int) -> list[RenderJob]:
        """Remove and return every job with ``send_at_ms <= now_ms``, earliest first."""
        ready: list[RenderJob] = []
        while self._heap and self._heap[0][0] <= now_ms:
            job = heapq.heappop(self._heap)[2]
            self._queued.discard(job.key)
            ready.append(job)
        return ready


def deliver_due(
    scheduler: DeliveryScheduler,
    platform: EmailPlatform,
    now_ms: int,
    *,
    keep: Callable[[Sequence[RenderJob]], Sequence[RenderJob]] | None = None,
    stop: Callable[[DeliveryOutcome], bool] | None = None,
) -> tuple[list[DeliveryOutcome], list[DeliveryFailure]]:
    """Send every job due at ``now_ms`` (those ``keep`` keeps, if given; the others are
    dropped); ``(all outcomes, the failures for the dead letters)``. After an outcome for
    which ``stop`` is true (the platform is down), the jobs not tried yet are queued again as
    they were. If ``keep`` or the platform raises, the jobs are queued again and the exception
    propagates."""
    due = scheduler.due(now_ms)
    jobs: Sequence[RenderJob] = due
    outcomes: list[DeliveryOutcome] = []
    try:
        if keep:
            jobs = keep(due)  # (a read that fails in there must not lose what was popped)
        for index, job in enumerate(jobs):
            outcome = platform.send(job.payload)
            outcomes.append(outcome)
            if stop is not None and stop(outcome):
                for untried in jobs[index + 1 :]:
                    scheduler.add(untried)
                break
    except BaseException:
        # a platform client that raised (it should answer with a failure) loses nothing: every
        # job goes back on the queue, sent ones too, since their outcome is not recorded
        # (sending one again is a no-op at the platform, by its idempotency key)
        for job in jobs:
            scheduler.add(job)
        raise
    return outcomes, [o for o in outcomes if isinstance(o, DeliveryFailure)]
