"""The two stateful steps of the processor, written against a minimal key-value state.

Stage 1 runs per device (keyed by anonymousId, or userId for server-side events): it drops
duplicate messageIds and stitches identities. Stage 2 runs per customer: it drops replayed
records (the embedded broker can expose records of aborted transactions, so effects must be
idempotent) and folds events into the profile. The stream topology and ``pipeline.testing``
call these same functions: the first with quixstreams state, the second with a dict.

Replays are recognised by position, not by messageId: stage 1 stamps each record it passes on
with ``seq`` = (raw partition, raw offset, index among that message's outputs). Stage 1 reads
a partition in order and its output keeps that order, so for one customer the positions from
one raw partition only grow, and a replay (the same input processed again after an abort or a
restart) repeats positions already applied. Stage 2 keeps the newest position per raw partition
beside the profile, in the same state value: no extra state read or write per event.

The same guard lets stage 2 read stage 1's output uncommitted (``consumer_isolation``), as soon
as it is written rather than when stage 1's transaction commits: if that transaction aborts,
stage 1 replays the same input from the same restored state and so sends the same records at
the same positions, which stage 2 drops. That needs stage 1 to be deterministic: its only
wall-clock input is the future-skew check in parsing, so an event right at that boundary could
be judged differently on the replay.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from pipeline import identity
from pipeline.events import CleanEvent
from pipeline.scoring import (
    Profile,
    ScoringParams,
    adopt_timezone,
    apply_event,
    merge_provenance,
    new_profile,
    profile_from_dict,
    profile_to_dict,
)
from pipeline.segments import SegmentPlan, SegmentRule, diff
from pipeline.sync import merge_crm_record

# Every record between and out of the stages is a flat dict tagged with its ``kind``.
KIND_EVENT = "event"
KIND_RETIRE = "retire"
KIND_LINK = "link"
KIND_PROFILE = "profile"
KIND_DEAD_LETTER = "dead_letter"
KIND_SEGMENT_CHANGE = "segment_change"
KIND_CRM = "crm"
KIND_SUPPRESSED = "suppressed"  # stage 2: a forgotten customer's event, dropped
KIND_REKEY = "rekey"
KIND_ALERT = "alert"
KIND_ERASE = "erase"  # stage 1 -> stage 2: delete a customer's profile (GDPR erasure)
KIND_ERASED = "erased"  # stage 2 -> profiles topic and sinks: that profile is gone
KIND_UNLINKED = "unlinked"  # stage 1 -> identities topic: that device's link is gone
KIND_TICK = "tick"  # the trigger scan -> stage 2: the stream's clock moved (see segments_due)

_SEEN = "seen:"
_APPLIED = "_applied"  # beside the profile's fields in its state value: newest seq per partition
_LINKED = "linked"
_LINKED_MS = "linked_ms"  # event time of the linked customer's newest event on the device
_HISTORY_LEN = "history_len"
_HISTORY_HEAD = "history_head"  # the oldest slot, once the buffer is full and wraps round
_HISTORY = "history:"
_SPANS = "spans"  # when each user took the device: [[from_ms, customer_id], ...] (identity)
_PROFILE = "profile"


class KeyValueState(Protocol):
    """The part of quixstreams' per-key ``State`` the stages use."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def set(self, key: Any, value: Any, ttl: timedelta | None = None) -> None: ...
    def delete(self, key: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class StageConfig:
    """Parameters of the stateful steps, taken from settings."""

    dedupe_window: timedelta
    history_limit: int
    scoring: ScoringParams
    segments: tuple[SegmentRule, ...] = ()
    segment_plan: SegmentPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segment_plan", SegmentPlan(self.segments))


def first_sighting(state: KeyValueState, message_id: str, window: timedelta) -> bool:
    """True the first time ``message_id`` is seen under this key within ``window``.

    The window runs on the record timestamp (broker time), so a resend is caught however
    late its event time is; expired ids are swept by the state's TTL.
    """
    key = _SEEN + message_id
    if state.get(key) is not None:
        return False
    state.set(key, 1, ttl=window)
    return True


def stitch(
    event: CleanEvent,
    state: KeyValueState,
    config: StageConfig,
    *,
    position: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Stage 1: dedupe and attribute one event to a customer (per-device state).

    Returns the records to pass on: nothing for a duplicate; otherwise the event record with
    its ``customer_id``, preceded on a first link by the device's anonymous history
    (re-attributed, with ``merged_from``), a ``retire`` record for the anonymous profile and a
    ``link`` record. With the raw message's ``position`` (partition, offset), the records for
    stage 2 carry their ``seq`` (see the module docstring).
    """
    out = _stitch(event, state, config)
    if position is not None:
        partition, offset = position
        for index, record in enumerate(out):
            if record["kind"] != KIND_LINK:
                record["seq"] = [partition, offset, index]
    return out


def _stitch(event: CleanEvent, state: KeyValueState, config: StageConfig) -> list[dict[str, Any]]:
    if not first_sighting(state, event.message_id, config.dedupe_window):
        return []
    linked: str | None = state.get(_LINKED)
    device = identity.device_of(event)
    user = event.user_id
    # the users' turns matter to an anonymous event on a linked device (it may be late) and
    # change when a user takes the device or a late event of an earlier user comes
    spans: list[Any] = []
    if linked is not None and user != linked:
        # (a device linked before turns were kept: its user had it from the start)
        spans = state.get(_SPANS) or [[0, linked]]
    res = identity.resolve(event, linked, state.get(_LINKED_MS), spans)
    out: list[dict[str, Any]] = []
    if res.linked_ms is not None:
        state.set(_LINKED_MS, res.linked_ms)
    if user and device is not None and user != linked:
        state.set(_SPANS, identity.add_span(spans, event.timestamp_ms, user))
    if res.link is not None and device is not None:
        state.set(_LINKED, res.link)
        merged = 0
        if res.first_link:
            anon_id = identity.anonymous_customer_id(device)
            n = int(state.get(_HISTORY_LEN, 0))
            head = int(state.get(_HISTORY_HEAD, 0))
            for i in range(n):  # oldest first
                slot = f"{_HISTORY}{(head + i) % n}"
                past = state.get(slot)
                state.delete(slot)
                if past is not None:
                    past["customer_id"] = res.link
                    past["merged_from"] = anon_id
                    past["kind"] = KIND_EVENT
                    out.append(past)
                    merged += 1
            state.delete(_HISTORY_LEN)
            state.delete(_HISTORY_HEAD)
            if n:
                out.append(
                    {
                        "kind": KIND_RETIRE,
                        "customer_id": anon_id,
                        "merged_into": res.link,
                        "linked_ms": event.timestamp_ms,
                        "via_message_id": event.message_id,
                    }
                )
        out.append(
            {
                "kind": KIND_LINK,
                "anonymous_id": device,
                "customer_id": res.link,
                "previous_customer_id": res.previous_customer_id,
                "linked_ms": event.timestamp_ms,
                "via_message_id": event.message_id,
                "merged_events": merged,
            }
        )
    wire = event.to_dict()  # a dict of its own: setting the customer here copies nothing
    wire["customer_id"] = res.customer_id
    if identity.is_anonymous(res.customer_id) and config.history_limit > 0:
        # the newest ``history_limit`` events (the cart just before a login matters most): a
        # ring buffer whose oldest slot is overwritten once it is full
        n = int(state.get(_HISTORY_LEN, 0))
        if n < config.history_limit:
            state.set(f"{_HISTORY}{n}", wire)
            state.set(_HISTORY_LEN, n + 1)
        else:
            head = int(state.get(_HISTORY_HEAD, 0))
            state.set(f"{_HISTORY}{head}", wire)
            state.set(_HISTORY_HEAD, (head + 1) % n)
    wire["kind"] = KIND_EVENT
    out.append(wire)
    return out


def erase_key(
    key: str, customer_id: str, state: KeyValueState, *, requested_at: str | None = None
) -> list[dict[str, Any]]:
    """Stage 1, for an erasure request under stage-1 ``key`` (a device, or the user id that keys
    server-side events): drop the key's anonymous history and its link to the customer (not a
    shared device's link to someone else), ask stage 2 to drop the profiles the key can have
    (its anonymous one; the customer's when the key is their id), and for a device whose link
    went, say so (a tombstone on the compacted links topic).

    Dedupe entries stay until the dedupe window expires them: they hold message ids only.
    """
    n = int(state.get(_HISTORY_LEN, 0))
    for i in range(n):
        state.delete(f"{_HISTORY}{i}")
    state.delete(_HISTORY_LEN)
    state.delete(_HISTORY_HEAD)
    profiles = [identity.anonymous_customer_id(key)]
    if key == customer_id:
        profiles.append(customer_id)
    out: list[dict[str, Any]] = [
        {"kind": KIND_ERASE, "customer_id": c, "key": key, "requested_at": requested_at}
        for c in profiles
    ]
    linked = state.get(_LINKED)
    if linked is None or linked == customer_id:
        state.delete(_LINKED)
        state.delete(_LINKED_MS)
        state.delete(_SPANS)
        # a device (or a key that was linked: a client whose anonymousId is its userId): its
        # link record becomes a tombstone; a server-side key was never linked
        if key != customer_id or linked is not None:
            out.append(
                {
                    "kind": KIND_UNLINKED,
                    "anonymous_id": key,
                    "customer_id": customer_id,
                    "requested_at": requested_at,
                }
            )
    else:  # a shared device, linked to another customer since: that link is theirs and stays
        spans = state.get(_SPANS, ())
        kept = [span for span in spans if span[1] != customer_id]  # their turns go
        if len(kept) != len(spans):
            state.set(_SPANS, kept)
    return out


def forgotten_sign_in(
    event: CleanEvent, state: KeyValueState, suppressed: Set[str]
) -> list[dict[str, Any]]:
    """Stage 1, a dropped event of a forgotten customer (under its device's key): when it signs
    them in on a device that was not erased with them (not linked to them yet when they were
    forgotten, so ``pipeline forget`` could not name it), that device's history, link and
    anonymous profile are erased now (:func:`erase_key`); otherwise nothing."""
    device = identity.device_of(event)
    if (
        device is None
        or not identity.is_suppressed(suppressed, user_id=event.user_id)
        or identity.is_suppressed(suppressed, customer_id=identity.anonymous_customer_id(device))
    ):
        return []
    customer_id = str(event.user_id)
    # only a device holding something of theirs: its pending anonymous history (theirs now
    # that they signed in on it), or a link to them; not every event of theirs again
    if not int(state.get(_HISTORY_LEN, 0)) and state.get(_LINKED) != customer_id:
        return []
    return erase_key(device, customer_id, state)


def _load(state: KeyValueState, customer_id: str) -> tuple[Profile, dict[str, list[int]]]:
    """The customer's profile and the newest stage-1 position applied per raw partition."""
    stored = state.get(_PROFILE)
    if stored is None:
        return new_profile(customer_id, is_anonymous=identity.is_anonymous(customer_id)), {}
    # the state store deserialized it afresh: the profile can take its containers over
    return profile_from_dict(stored, copy=False), stored.get(_APPLIED) or {}


def _store(state: KeyValueState, profile: Profile, applied: dict[str, list[int]]) -> dict[str, Any]:
    """Save the profile with its applied positions; returns the profile record to emit."""
    # shared, not copied: the state serializes it now, and the profile is not changed again
    stored = profile_to_dict(profile, copy=False)
    emitted = {**stored, "kind": KIND_PROFILE}
    if applied:
        stored[_APPLIED] = applied
    state.set(_PROFILE, stored)
    return emitted


def _is_replay(record: dict[str, Any], applied: dict[str, list[int]]) -> bool:
    """Whether stage 2 applied this record before; notes its position in ``applied`` if not."""
    partition, offset, index = record["seq"]
    key = str(partition)
    newest = applied.get(key)
    if newest is not None and (offset, index) <= (newest[0], newest[1]):
        return True
    applied[key] = [offset, index]
    return False


def fold(
    record: dict[str, Any],
    state: KeyValueState,
    config: StageConfig,
    *,
    now_ms: int,
    suppressed: Set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Stage 2: apply one stage-1 record to the customer's profile (per-customer state).

    Returns the applied event and the updated profile (both tagged), only the profile for a
    retired anonymous profile, nothing for a record already applied (a replay), for an
    erasure the ``erased`` notice (the profile and its applied positions are deleted), and for
    an event or CRM record of a forgotten customer (hashed ids in ``suppressed``) a
    ``suppressed`` marker and no state change: stage 1 checks too, but its list can be seconds
    older than an erasure that overtook the event, and the profile must not come back.
    """
    kind = record["kind"]
    if (
        suppressed
        # a CRM re-import must not revive them, nor a retirement (a replayed one) recreate
        # the anonymous profile of a device that was theirs
        and kind in (KIND_EVENT, KIND_CRM, KIND_RETIRE)
        and identity.is_suppressed(
            suppressed,
            customer_id=record["customer_id"],
            user_id=record.get("merged_into") if kind == KIND_RETIRE else record.get("user_id"),
            anonymous_id=record.get("anonymous_id"),
        )
    ):
        return [{"kind": KIND_SUPPRESSED, "customer_id": record["customer_id"]}]
    if record["kind"] == KIND_RETIRE:
        profile, applied = _load(state, record["customer_id"])
        if profile.merged_into == record["merged_into"]:
            return []
        profile.merged_into = record["merged_into"]
        profile.version += 1
        profile.updated_ms = now_ms
        return [_store(state, profile, applied)]
    if record["kind"] == KIND_CRM:
        return _apply_crm(record, state, now_ms=now_ms)
    if record["kind"] == KIND_TICK:
        return _tick(record, state, config, now_ms=now_ms)
    if record["kind"] == KIND_ERASE:
        state.delete(_PROFILE)  # and with it the applied positions: nothing of theirs is kept
        return [
            {
                "kind": KIND_ERASED,
                "customer_id": record["customer_id"],
                "requested_at": record.get("requested_at"),
                "erased_ms": now_ms,
            }
        ]
    profile, applied = _load(state, record["customer_id"])
    if "seq" in record:
        if _is_replay(record, applied):
            return []
        del record["seq"]  # internal to the hop: not part of the clean event
    elif not first_sighting(state, record["message_id"], config.dedupe_window):
        return []  # a record without position (a stage 1 from before positions): by messageId
    event = CleanEvent.from_dict(record)
    device = identity.device_of(event)
    if event.user_id is not None and device is not None:
        merge_provenance(
            profile, device, linked_ms=event.timestamp_ms, via_message_id=event.message_id
        )
    apply_event(profile, event, config.scoring, processed_ms=now_ms)
    changes = _update_segments(profile, config) if config.segments else []
    emitted = _store(state, profile, applied)
    record["scored_ms"] = now_ms  # lineage: the event's last stage before the sinks
    return [record, emitted, *changes]


def _apply_crm(
    record: dict[str, Any], state: KeyValueState, *, now_ms: int
) -> list[dict[str, Any]]:
    """Merge one CRM record into the profile's traits (precedence rules in pipeline.sync)."""
    profile, applied = _load(state, record["customer_id"])
    traits = merge_crm_record(profile.traits, record, traits_updated_ms=profile.traits_ms)
    if traits == profile.traits:
        return []  # a re-sent or older record: nothing changes, no new version
    profile.traits = traits
    tz = traits.get("timezone")
    if isinstance(tz, str) and tz:
        adopt_timezone(profile, tz, profile.as_of_ms or now_ms)
    profile.version += 1
    profile.updated_ms = now_ms
    return [_store(state, profile, applied)]


def segments_due(profile: Profile, config: StageConfig, at_ms: int) -> bool:
    """Whether the clock at ``at_ms`` (the stream's event-time watermark) changes the
    customer's segments with no new event of theirs: rules that read the time ("not seen for
    30 days", "a cart left for an hour") enter and exit only as time passes. The trigger scan
    sends such customers a tick (:data:`KIND_TICK`) that stage 2 applies in order with their
    events, so the segment changes stay in the stream and a replay yields the same ones."""
    if not config.segments or profile.as_of_ms is None or profile.is_anonymous:
        return False
    if profile.merged_into is not None or at_ms <= max(profile.as_of_ms, profile.segments_ms or 0):
        return False
    after = config.segment_plan.evaluate(profile, at_ms, scoring=config.scoring)
    return after != frozenset(profile.segments)


def _tick(
    record: dict[str, Any], state: KeyValueState, config: StageConfig, *, now_ms: int
) -> list[dict[str, Any]]:
    """Stage 2, a tick of the clock: the segments at its time, if they change (the profile and
    the changes, or nothing; a profile that is gone is not recreated)."""
    stored = state.get(_PROFILE)
    if stored is None:
        return []
    profile, applied = profile_from_dict(stored, copy=False), stored.get(_APPLIED) or {}
    at_ms = int(record["at_ms"])
    if not segments_due(profile, config, at_ms):
        return []  # a repeated or stale tick, or an event got there first
    profile.segments_ms = at_ms
    profile.version += 1
    profile.updated_ms = now_ms
    changes = _update_segments(profile, config)
    return [_store(state, profile, applied), *changes]


def _update_segments(profile: Profile, config: StageConfig) -> list[dict[str, Any]]:
    """Re-evaluate segment membership as of the profile's newest event; enter/exit records.

    Evaluated in event time, so a replay of the same events yields the same changes: at the
    newest event's time, or the clock's last tick if later (a late event does not turn it back).
    """
    assert profile.as_of_ms is not None
    at_ms = max(profile.as_of_ms, profile.segments_ms or 0)
    before = frozenset(profile.segments)
    after = config.segment_plan.evaluate(profile, at_ms, scoring=config.scoring)
    if after == before:
        return []
    entered, exited = diff(before, after)
    profile.segments = sorted(after)
    return [
        {
            "kind": KIND_SEGMENT_CHANGE,
            "customer_id": profile.customer_id,
            "segment": name,
            "change": change,
            "at_ms": at_ms,
            "profile_version": profile.version,
        }
        for change, names in (("enter", entered), ("exit", exited))
        for name in sorted(names)
    ]
