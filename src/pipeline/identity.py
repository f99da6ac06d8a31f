"""Identity stitching: which customer an event belongs to, and when a device becomes known.

A device is an ``anonymousId`` (or an alias's ``previousId``). Until it carries a ``userId``,
its events belong to the anonymous profile ``anon:<anonymousId>``. The first event that pairs
the device with a ``userId`` (identify, alias, or any event sent after login) links them:
the device's anonymous history is re-attributed to the customer, with provenance, and the
anonymous profile is retired into the known one. A later, different ``userId`` on the same
device (a shared computer) re-links the device for future events only. The device keeps when
each user took it (:func:`add_span`), so an anonymous event that arrives late goes to whoever
had the device at its event time, not to whoever has it now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from pipeline.events import CleanEvent
from pipeline.pii import sha256_hex

ANON_PREFIX = "anon:"


def anonymous_customer_id(device_id: str) -> str:
    """The profile key of a device that is not linked to a customer yet."""
    return f"{ANON_PREFIX}{device_id}"


def is_anonymous(customer_id: str) -> bool:
    return customer_id.startswith(ANON_PREFIX)


def reserved_id_problem(customer_id: object) -> str | None:
    """Why ``customer_id`` (a ``userId``, a CRM record's id) cannot name a customer, or None:
    ids that start with ``anon:`` name devices' anonymous profiles, so a customer with such an
    id would be folded into one, and never counted as known."""
    if type(customer_id) is str and customer_id.startswith(ANON_PREFIX):
        return f"starts with {ANON_PREFIX!r}, the prefix reserved for anonymous profiles"
    return None


def partition_key(payload: Mapping[str, Any]) -> str | None:
    """The raw-topic key of a Segment payload: its device, as stage 1 groups by it.

    ``anonymousId``, else an alias's ``previousId``, else ``userId`` (server-side events), the
    same order as :attr:`CleanEvent.identity_key`; a message keyed otherwise is re-keyed by
    the processor, at the cost of one more trip through the raw topic.
    """
    anonymous_id, user_id = payload.get("anonymousId"), payload.get("userId")
    previous_id = payload.get("previousId") if payload.get("type") == "alias" else None
    for value in (anonymous_id, previous_id, user_id):
        if type(value) is str and value:
            return value
    for value in (anonymous_id, user_id):
        if type(value) in (int, float):
            return str(value)  # the schema refuses it later, with its reason
    return None


def device_of(event: CleanEvent) -> str | None:
    """The device id an event speaks for: ``anonymousId``, or an alias's ``previousId``."""
    return event.anonymous_id or event.previous_id


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where one event goes and what it changes in the device's identity.

    ``link`` is set when the event pairs the device with a customer it was not linked to;
    ``first_link`` tells whether the device was anonymous until now (its history must merge).
    ``linked_ms`` is set when the device's link now stands at a newer event time (to keep).
    """

    customer_id: str
    link: str | None = None
    first_link: bool = False
    previous_customer_id: str | None = None
    linked_ms: int | None = None


SPANS_KEPT = 16
"""How many users' turns on one device are kept (a shared computer's recent users)."""

Span = Sequence[Any]
"""``(from_ms, customer_id)``: the customer had the device from that event time on (a JSON
pair in the stream's state)."""


def add_span(spans: Sequence[Span], from_ms: int, customer_id: str) -> list[list[Any]]:
    """``spans`` (in event-time order) with ``customer_id`` holding the device from
    ``from_ms``: a turn of the same customer right before it is extended instead; only the
    newest :data:`SPANS_KEPT` are kept."""
    out = sorted([[int(t), str(c)] for t, c in spans] + [[from_ms, customer_id]])
    merged: list[list[Any]] = []
    for span in out:
        if not merged or merged[-1][1] != span[1]:
            merged.append(span)
    return merged[-SPANS_KEPT:]


def owner_at(spans: Sequence[Span], ts_ms: int) -> str | None:
    """Who had the device at ``ts_ms`` when that is before the current user's turn (a late
    event): the user whose turn it was, or the first user for a time before every turn (the
    anonymous history before a first login is theirs). None when the current user had it."""
    if len(spans) < 2 or ts_ms >= spans[-1][0]:
        return None
    owner = str(spans[0][1])
    for from_ms, customer_id in spans:
        if from_ms > ts_ms:
            break
        owner = str(customer_id)
    return owner


def resolve(
    event: CleanEvent,
    linked_customer: str | None,
    linked_ms: int | None = None,
    spans: Sequence[Span] = (),
) -> Resolution:
    """Attribute ``event`` given the customer its device is currently linked to (or None),
    the event time of that customer's newest event on it (``linked_ms``) and the device's
    users' turns (``spans``, see :func:`add_span`).

    A device follows its newest user in event time, not in arrival order: a late event of a
    shared device's previous user is theirs but does not take the device back (the same two
    users' events give the same final link in any order; ties go to the greater id). An
    anonymous event goes to whoever had the device at its event time.
    """
    device = device_of(event)
    user = event.user_id
    if user:
        if device is None:
            return Resolution(customer_id=user)
        ts = event.timestamp_ms
        newer = linked_ms is None or (ts, user) > (linked_ms, linked_customer or "")
        if linked_customer == user:
            return Resolution(customer_id=user, linked_ms=ts if newer else None)
        if linked_customer is not None and not newer:
            return Resolution(customer_id=user)
        return Resolution(
            customer_id=user,
            link=user,
            first_link=linked_customer is None,
            previous_customer_id=linked_customer,
            linked_ms=ts,
        )
    if linked_customer is not None:
        return Resolution(customer_id=owner_at(spans, event.timestamp_ms) or linked_customer)
    assert device is not None, "validated events carry userId or anonymousId"
    return Resolution(customer_id=anonymous_customer_id(device))


def is_suppressed(
    suppressed: Set[str],
    *,
    customer_id: object = None,
    user_id: object = None,
    anonymous_id: object = None,
    previous_id: object = None,
) -> bool:
    """True when a record belongs to a forgotten customer (hashed ids in ``suppressed``).

    A record of a known customer (its ``userId``, or a customer id that is not anonymous) is
    theirs alone: another customer's events on a device that a forgotten customer used (a
    shared computer) are kept. Only a record without one is judged by its devices
    (``anonymousId``, or the device an alias's ``previousId`` names). Ids that are not strings
    (unvalidated input at the collector) match no one; the schema refuses them later.
    """
    if not suppressed:
        return False
    known = [k for k in (user_id, customer_id) if type(k) is str and k and not is_anonymous(k)]
    if known:
        return any(sha256_hex(k) in suppressed for k in known)
    devices = [
        anonymous_customer_id(d) for d in (anonymous_id, previous_id) if type(d) is str and d
    ]
    keys = [customer_id, *devices]
    return any(type(k) is str and sha256_hex(k) in suppressed for k in keys)
