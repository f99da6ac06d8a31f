"""The stateful stages (dedupe, stitching, profile fold) driven with in-memory state."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from pipeline.events import CleanEvent
from pipeline.pii import sha256_hex
from pipeline.scoring import ScoringParams, profile_from_dict, profile_to_dict
from pipeline.stream.stages import (
    KIND_CRM,
    KIND_ERASE,
    KIND_ERASED,
    KIND_EVENT,
    KIND_LINK,
    KIND_PROFILE,
    KIND_RETIRE,
    KIND_SUPPRESSED,
    KIND_TICK,
    KIND_UNLINKED,
    StageConfig,
    erase_key,
    fold,
    forgotten_sign_in,
    stitch,
)
from pipeline.testing import T0_MS, MemoryState, make_event

CONFIG = StageConfig(dedupe_window=timedelta(hours=24), history_limit=3, scoring=ScoringParams())
HOUR = 3_600_000


def anon(name: str = "Product Viewed", ts: int = T0_MS, **kw: Any) -> CleanEvent:
    return make_event(name, ts, user_id=None, customer_id=None, anonymous_id="dev1", **kw)


def device_state(store: dict[Any, Any], ts: int) -> MemoryState:
    s = MemoryState(store, "dev1")
    s.timestamp_ms = ts
    return s


def test_duplicate_message_id_is_dropped_within_the_window_only() -> None:
    store: dict[Any, Any] = {}
    e = anon()
    assert stitch(e, device_state(store, T0_MS), CONFIG)
    assert stitch(e, device_state(store, T0_MS + 23 * HOUR), CONFIG) == []
    # after the window (on broker time) the id is forgotten
    assert stitch(e, device_state(store, T0_MS + 25 * HOUR), CONFIG)


def test_first_login_merges_anonymous_history_and_retires_the_anonymous_profile() -> None:
    store: dict[Any, Any] = {}
    views = [anon(ts=T0_MS + i) for i in range(2)]
    for v in views:
        out = stitch(v, device_state(store, T0_MS), CONFIG)
        assert [r["customer_id"] for r in out] == ["anon:dev1"]
    login = make_event(
        "Identify", T0_MS + 10, anonymous_id="dev1", user_id="cus_1", customer_id=None
    )
    out = stitch(login, device_state(store, T0_MS), CONFIG)
    kinds = [r["kind"] for r in out]
    assert kinds == [KIND_EVENT, KIND_EVENT, KIND_RETIRE, KIND_LINK, KIND_EVENT]
    merged = out[:2]
    assert [m["message_id"] for m in merged] == [v.message_id for v in views]
    assert all(m["customer_id"] == "cus_1" and m["merged_from"] == "anon:dev1" for m in merged)
    assert out[2]["customer_id"] == "anon:dev1" and out[2]["merged_into"] == "cus_1"
    assert out[3]["merged_events"] == 2 and out[3]["via_message_id"] == login.message_id
    # afterwards anonymous events of the device go straight to the customer, nothing buffered
    later = stitch(anon(ts=T0_MS + 20), device_state(store, T0_MS), CONFIG)
    assert [r["customer_id"] for r in later] == ["cus_1"]


def test_history_beyond_the_limit_is_not_buffered() -> None:
    store: dict[Any, Any] = {}
    for i in range(5):
        stitch(anon(ts=T0_MS + i), device_state(store, T0_MS), CONFIG)
    login = make_event("Logged In", T0_MS + 10, anonymous_id="dev1", user_id="cus_1")
    out = stitch(login, device_state(store, T0_MS), CONFIG)
    assert sum(1 for r in out if r["kind"] == KIND_EVENT and r.get("merged_from")) == 3


def test_fold_counts_each_message_once_and_retires() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    cust.timestamp_ms = T0_MS
    e = make_event("Product Viewed", T0_MS, customer_id="cus_1", category="dresses")
    record = {**e.to_dict(), "kind": KIND_EVENT}
    first = fold(record, cust, CONFIG, now_ms=T0_MS)
    assert [r["kind"] for r in first] == [KIND_EVENT, KIND_PROFILE]
    assert first[1]["event_count"] == 1
    assert fold(record, cust, CONFIG, now_ms=T0_MS) == []  # a replayed record
    second = {**replace(e, message_id="other").to_dict(), "kind": KIND_EVENT}
    assert fold(second, cust, CONFIG, now_ms=T0_MS)[1]["event_count"] == 2

    anon_state = MemoryState(store, "anon:dev1")
    anon_event = {**anon().to_dict(), "customer_id": "anon:dev1", "kind": KIND_EVENT}
    fold(anon_event, anon_state, CONFIG, now_ms=T0_MS)
    retire = {"kind": KIND_RETIRE, "customer_id": "anon:dev1", "merged_into": "cus_1"}
    retired = fold(retire, anon_state, CONFIG, now_ms=T0_MS)
    assert len(retired) == 1 and retired[0]["merged_into"] == "cus_1"
    assert fold(retire, anon_state, CONFIG, now_ms=T0_MS) == []


def test_fold_emits_segment_enter_and_exit_in_event_time() -> None:
    from pipeline.events import LineItem
    from pipeline.segments import load_segments
    from pipeline.stream.stages import KIND_SEGMENT_CHANGE

    config = replace(CONFIG, segments=tuple(load_segments()))
    state = MemoryState({}, "cus_1")
    added = make_event(
        "Product Added",
        T0_MS,
        customer_id="cus_1",
        product_id="P1",
        properties={"product_id": "P1", "quantity": 1},
    )
    out = fold({**added.to_dict(), "kind": KIND_EVENT}, state, config, now_ms=T0_MS)
    changes = [r for r in out if r["kind"] == KIND_SEGMENT_CHANGE]
    assert [(c["segment"], c["change"], c["at_ms"]) for c in changes] == [
        ("cart_abandoners", "enter", T0_MS)
    ]
    order = make_event(
        "Order Completed",
        T0_MS + HOUR,
        customer_id="cus_1",
        revenue=50.0,
        items=[LineItem("P1", 1, 50.0)],
    )
    out = fold({**order.to_dict(), "kind": KIND_EVENT}, state, config, now_ms=T0_MS)
    changes = [(r["segment"], r["change"]) for r in out if r["kind"] == KIND_SEGMENT_CHANGE]
    assert ("cart_abandoners", "exit") in changes
    assert out[1]["segments"] == sorted(c for c, ch in changes if ch == "enter")


def test_stitch_stamps_each_record_for_stage_2_with_its_position() -> None:
    store: dict[Any, Any] = {}
    stitch(anon(ts=T0_MS), device_state(store, T0_MS), CONFIG, position=(2, 40))
    login = make_event("Identify", T0_MS + 10, anonymous_id="dev1", user_id="cus_1")
    out = stitch(login, device_state(store, T0_MS), CONFIG, position=(2, 41))
    assert [(r["kind"], r.get("seq")) for r in out] == [
        (KIND_EVENT, [2, 41, 0]),  # the merged history, re-sent at the login's position
        (KIND_RETIRE, [2, 41, 1]),
        (KIND_LINK, None),  # links go to their own topic, not to stage 2
        (KIND_EVENT, [2, 41, 3]),
    ]


def _seq_record(message_id: str, seq: list[int], ts: int = T0_MS) -> dict[str, Any]:
    e = make_event("Product Viewed", ts, message_id=message_id, customer_id="cus_1")
    return {**e.to_dict(), "kind": KIND_EVENT, "seq": seq}


def test_fold_drops_records_at_positions_already_applied_per_raw_partition() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    cust.timestamp_ms = T0_MS

    def count(record: dict[str, Any]) -> int | None:
        out = fold(record, cust, CONFIG, now_ms=T0_MS)
        return out[1]["event_count"] if out else None

    assert count(_seq_record("a", [0, 10, 0])) == 1
    assert count(_seq_record("b", [0, 12, 0])) == 2
    # stage 1 ran again from offset 10 (an abort, a restart): the same records, dropped
    assert count(_seq_record("a", [0, 10, 0])) is None
    assert count(_seq_record("b", [0, 12, 0])) is None
    # another raw partition (another device of the customer) has its own order
    assert count(_seq_record("c", [1, 3, 0])) == 3
    # a CRM update and a later record keep the positions: the replay is still known
    crm = {"kind": "crm", "customer_id": "cus_1", "email": "a@b.c", "updated_at": "2026-01-01"}
    assert fold(crm, cust, CONFIG, now_ms=T0_MS)
    assert count(_seq_record("b", [0, 12, 0])) is None
    assert count(_seq_record("d", [0, 12, 1])) == 4  # the next output of the same message


def test_position_stays_inside_the_hop() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    cust.timestamp_ms = T0_MS
    event, profile = fold(_seq_record("a", [0, 10, 0]), cust, CONFIG, now_ms=T0_MS)
    assert "seq" not in event
    assert not any(key.startswith("_") for key in profile)


def test_a_shared_device_ends_linked_to_its_newest_user_in_any_arrival_order() -> None:
    """Two customers sign in on one computer, A then B (event time); however their events
    arrive, each is attributed to its own customer and the device ends linked to B, so its
    next anonymous event is B's. Before, a late event of A's took the device back."""

    def user(cid: str, name: str, ts: int) -> CleanEvent:
        return make_event(name, ts, anonymous_id="dev1", user_id=cid, customer_id=None)

    events = [
        user("cus_a", "Identify", T0_MS + 10),
        user("cus_a", "Product Viewed", T0_MS + 20),
        user("cus_b", "Identify", T0_MS + 30),
        user("cus_b", "Product Added", T0_MS + 40),
    ]
    for order in itertools.permutations(events):
        store: dict[Any, Any] = {}
        links: list[str] = []
        for e in order:
            out = stitch(e, device_state(store, T0_MS), CONFIG)
            assert [r["customer_id"] for r in out if r["kind"] == KIND_EVENT] == [e.user_id]
            links += [r["customer_id"] for r in out if r["kind"] == KIND_LINK]
        assert MemoryState(store, "dev1").get("linked") == "cus_b", order
        assert links[-1] == "cus_b" and len(links) <= 2
        after = stitch(anon(ts=T0_MS + 50), device_state(store, T0_MS), CONFIG)
        assert [r["customer_id"] for r in after] == ["cus_b"]


def test_a_late_anonymous_event_on_a_shared_device_goes_to_its_user_at_the_time() -> None:
    """A signs in, browses, leaves; B signs in later on the same computer. An anonymous event
    of A's session that arrives after B took the device is A's (it went to B), in any order
    of the sign-ins' arrival."""

    def user(cid: str, ts: int) -> CleanEvent:
        return make_event("Identify", ts, anonymous_id="dev1", user_id=cid, customer_id=None)

    sign_ins = [user("cus_a", T0_MS + 10), user("cus_b", T0_MS + 30)]
    for order in itertools.permutations(sign_ins):
        store: dict[Any, Any] = {}
        for e in order:
            stitch(e, device_state(store, T0_MS), CONFIG)
        owners = {
            ts: [r["customer_id"] for r in stitch(anon(ts=ts), device_state(store, T0_MS), CONFIG)]
            for ts in (T0_MS + 20, T0_MS + 40)
        }
        assert owners == {T0_MS + 20: ["cus_a"], T0_MS + 40: ["cus_b"]}, order
    # forgetting A leaves nothing of theirs under the device, B's link and turn stay
    erase_key("dev1", "cus_a", device_state(store, T0_MS))
    assert not [v for (prefix, _), v in store.items() if prefix == "dev1" and "cus_a" in str(v)]
    assert MemoryState(store, "dev1").get("linked") == "cus_b"


def test_erasure_drops_the_device_state_and_both_profiles_it_can_have() -> None:
    store: dict[Any, Any] = {}
    for i in range(2):  # anonymous history buffered under the device
        stitch(anon(ts=T0_MS + i), device_state(store, T0_MS), CONFIG)
    login = make_event("Identify", T0_MS + 10, anonymous_id="dev1", user_id="cus_1")
    stitch(login, device_state(store, T0_MS), CONFIG)
    stitch(anon(ts=T0_MS + 20), device_state(store, T0_MS), CONFIG)
    assert MemoryState(store, "dev1").get("linked") == "cus_1"
    for i in range(2):
        stitch(anon(name="Page Viewed", ts=T0_MS + 30 + i), MemoryState(store, "dev2"), CONFIG)

    out = erase_key("dev1", "cus_1", device_state(store, T0_MS), requested_at="2026-11-27")
    assert out == [
        {
            "kind": KIND_ERASE,
            "customer_id": "anon:dev1",
            "key": "dev1",
            "requested_at": "2026-11-27",
        },
        # its link record on the compacted links topic becomes a tombstone
        {
            "kind": KIND_UNLINKED,
            "anonymous_id": "dev1",
            "customer_id": "cus_1",
            "requested_at": "2026-11-27",
        },
    ]
    # nothing but dedupe ids (message ids, expired by the window) is left under the device
    assert {key for prefix, key in store if prefix == "dev1"} <= {
        key for prefix, key in store if prefix == "dev1" and str(key).startswith("seen:")
    }
    # the device forgets its link: a new event is anonymous again, not the customer's
    later = stitch(anon(ts=T0_MS + 40), device_state(store, T0_MS), CONFIG)
    assert [r["customer_id"] for r in later] == ["anon:dev1"]
    # another device's history is untouched, until that device is erased too
    assert MemoryState(store, "dev2").get("history_len") == 2
    erase_key("dev2", "cus_1", MemoryState(store, "dev2"))
    assert [key for prefix, key in store if prefix == "dev2" and "history" in key] == []
    # a shared device linked to another customer since keeps that link (and no tombstone)
    login_b = make_event("Identify", T0_MS + 50, anonymous_id="dev3", user_id="cus_2")
    stitch(login_b, MemoryState(store, "dev3"), CONFIG)
    shared = erase_key("dev3", "cus_1", MemoryState(store, "dev3"))
    assert [r["kind"] for r in shared] == [KIND_ERASE]
    assert MemoryState(store, "dev3").get("linked") == "cus_2"
    # the user id keys server-side events: its request also names the customer's profile
    user_key = erase_key("cus_1", "cus_1", MemoryState(store, "cus_1"))
    assert [r["customer_id"] for r in user_key] == ["anon:cus_1", "cus_1"]


def test_fold_erasure_deletes_the_profile_and_its_applied_positions() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    e = make_event("Product Viewed", T0_MS, customer_id="cus_1", category="dresses")
    record = {**e.to_dict(), "kind": KIND_EVENT, "seq": [0, 7, 0]}
    assert fold(dict(record), cust, CONFIG, now_ms=T0_MS)
    assert cust.get("profile")["_applied"] == {"0": [7, 0]}

    erased = fold(
        {"kind": KIND_ERASE, "customer_id": "cus_1", "requested_at": "x"},
        cust,
        CONFIG,
        now_ms=T0_MS + 5,
    )
    assert erased == [
        {"kind": KIND_ERASED, "customer_id": "cus_1", "requested_at": "x", "erased_ms": T0_MS + 5}
    ]
    assert store == {}
    # idempotent: an erasure replayed after an aborted transaction finds nothing and says so
    assert (
        fold({"kind": KIND_ERASE, "customer_id": "cus_1"}, cust, CONFIG, now_ms=T0_MS)[0]["kind"]
        == KIND_ERASED
    )
    assert store == {}


def test_fold_drops_a_forgotten_customers_events_and_crm_records_without_touching_state() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    forgotten = frozenset({sha256_hex("cus_1")})
    crm = {"kind": KIND_CRM, "customer_id": "cus_1", "email": "a@b.c", "updated_at": "2026-01-01"}
    for record in (_seq_record("a", [0, 10, 0]), crm):
        assert fold(dict(record), cust, CONFIG, now_ms=T0_MS, suppressed=forgotten) == [
            {"kind": KIND_SUPPRESSED, "customer_id": "cus_1"}
        ]
    assert store == {}  # no profile came back, not even an empty one
    # an anonymous device of theirs is matched by its hashed anonymous profile id too
    device = make_event(
        "Product Viewed", T0_MS, customer_id="anon:dev9", anonymous_id="dev9", user_id=None
    )
    by_device = frozenset({sha256_hex("anon:dev9")})
    device_record = {**device.to_dict(), "kind": KIND_EVENT, "seq": [1, 3, 0]}
    out = fold(
        device_record, MemoryState(store, "anon:dev9"), CONFIG, now_ms=T0_MS, suppressed=by_device
    )
    assert [r["kind"] for r in out] == [KIND_SUPPRESSED]
    # everyone else is folded as before, and so are another customer's events on a device the
    # forgotten one used (a shared computer)
    other = MemoryState(store, "cus_2")
    for seq, ids, fields in (
        ([0, 11, 0], forgotten, {}),
        ([1, 4, 0], by_device, {"anonymous_id": "dev9"}),
    ):
        e = make_event("Product Viewed", T0_MS, customer_id="cus_2", **fields)
        record = {**e.to_dict(), "kind": KIND_EVENT, "seq": seq}
        kept = fold(record, other, CONFIG, now_ms=T0_MS, suppressed=ids)
        assert [r["kind"] for r in kept] == [KIND_EVENT, KIND_PROFILE]
    # a retirement of a forgotten device's anonymous profile (a replay) does not recreate it
    retire = {"kind": KIND_RETIRE, "customer_id": "anon:dev9", "merged_into": "cus_1"}
    anon_state = MemoryState(store, "anon:dev9")
    assert fold(retire, anon_state, CONFIG, now_ms=T0_MS, suppressed=forgotten) == [
        {"kind": KIND_SUPPRESSED, "customer_id": "anon:dev9"}
    ]
    assert anon_state.get("profile") is None


def test_a_forgotten_customer_signing_in_on_an_unerased_device_erases_that_device() -> None:
    store: dict[Any, Any] = {}
    for i in range(2):  # browsed anonymously: not linked to them when they were forgotten
        stitch(anon(ts=T0_MS + i), device_state(store, T0_MS), CONFIG)
    forgotten = frozenset({sha256_hex("cus_1")})
    sign_in = make_event("Identify", T0_MS + 5, user_id="cus_1", anonymous_id="dev1")
    out = forgotten_sign_in(sign_in, device_state(store, T0_MS), forgotten)
    assert [(r["kind"], r.get("customer_id")) for r in out] == [
        (KIND_ERASE, "anon:dev1"),
        (KIND_UNLINKED, "cus_1"),
    ]
    assert [key for prefix, key in store if prefix == "dev1" and "history" in key] == []
    # their next event there finds nothing left of theirs: no erasure again (and again)
    again = make_event("Product Viewed", T0_MS + 6, user_id="cus_1", anonymous_id="dev1")
    assert forgotten_sign_in(again, device_state(store, T0_MS), forgotten) == []
    # nothing to do for someone else, or for a device erased with them already
    other = make_event("Identify", T0_MS + 6, user_id="cus_2", anonymous_id="dev1")
    assert forgotten_sign_in(other, device_state(store, T0_MS), forgotten) == []
    erased_too = forgotten | {sha256_hex("anon:dev1")}
    assert forgotten_sign_in(sign_in, device_state(store, T0_MS), erased_too) == []


def test_a_client_whose_anonymous_id_is_its_user_id_has_its_link_tombstoned_at_erasure() -> None:
    """A link ``u1 -> u1`` was written to the compacted links topic: the erasure of ``u1``
    under that key must leave its tombstone, as for any device."""
    store: dict[Any, Any] = {}
    out = stitch(
        make_event("Identify", T0_MS, anonymous_id="cus_1", user_id="cus_1"),
        MemoryState(store, "cus_1"),
        CONFIG,
    )
    assert [(r["kind"], r.get("anonymous_id")) for r in out if r["kind"] == KIND_LINK] == [
        (KIND_LINK, "cus_1")
    ]
    erased = erase_key("cus_1", "cus_1", MemoryState(store, "cus_1"))
    assert [(r["kind"], r["customer_id"]) for r in erased] == [
        (KIND_ERASE, "anon:cus_1"),
        (KIND_ERASE, "cus_1"),
        (KIND_UNLINKED, "cus_1"),
    ]
    assert MemoryState(store, "cus_1").get("linked") is None


def test_past_the_history_limit_a_login_takes_the_newest_anonymous_events_in_order() -> None:
    store: dict[Any, Any] = {}
    names = ["Page Viewed", "Product Viewed", "Product Viewed", "Product Added", "Cart Viewed"]
    for i, name in enumerate(names):  # five events, three kept (CONFIG.history_limit)
        stitch(anon(name=name, ts=T0_MS + i), device_state(store, T0_MS), CONFIG)
    login = make_event("Identify", T0_MS + 10, anonymous_id="dev1", user_id="cus_1")
    out = stitch(login, device_state(store, T0_MS), CONFIG)
    merged = [r for r in out if r["kind"] == KIND_EVENT and r.get("merged_from")]
    # the cart just before the login is what matters most: the newest three, oldest first
    assert [(r["name"], r["timestamp_ms"]) for r in merged] == [
        ("Product Viewed", T0_MS + 2),
        ("Product Added", T0_MS + 3),
        ("Cart Viewed", T0_MS + 4),
    ]
    assert {r["customer_id"] for r in merged} == {"cus_1"}
    link = next(r for r in out if r["kind"] == KIND_LINK)
    assert link["merged_events"] == 3
    assert [k for p, k in store if p == "dev1" and str(k).startswith("history")] == []


def test_the_clock_moves_time_dependent_segments_without_events_and_never_back() -> None:
    from pipeline.scoring import profile_from_dict
    from pipeline.segments import load_segments
    from pipeline.stream.stages import KIND_SEGMENT_CHANGE, segments_due

    config = replace(CONFIG, segments=tuple(load_segments()))
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    fold(_seq_record("a", [0, 1, 0]), cust, config, now_ms=T0_MS)

    def stored() -> Any:
        return profile_from_dict(cust.get("profile"))

    def changes(out: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [
            (r["segment"], r["change"], r["at_ms"]) for r in out if r["kind"] == KIND_SEGMENT_CHANGE
        ]

    day = 24 * HOUR
    assert not segments_due(stored(), config, T0_MS + 30 * day)  # "more than 30 days"
    assert segments_due(stored(), config, T0_MS + 31 * day)
    tick = {"kind": KIND_TICK, "customer_id": "cus_1", "at_ms": T0_MS + 31 * day}
    out = fold(dict(tick), cust, config, now_ms=T0_MS)
    assert changes(out) == [("lapsed", "enter", T0_MS + 31 * day)]
    assert out[0]["kind"] == KIND_PROFILE and out[0]["segments"] == ["lapsed"]
    assert out[0]["version"] == 2 and changes(out) and stored().segments_ms == T0_MS + 31 * day
    assert fold(dict(tick), cust, config, now_ms=T0_MS) == []  # the same tick again
    # a late event (from before the tick) does not turn the clock back: still lapsed
    out = fold(_seq_record("b", [0, 2, 0], ts=T0_MS + HOUR), cust, config, now_ms=T0_MS)
    assert changes(out) == [] and stored().segments == ["lapsed"]
    # a new one ends it, at its own time
    out = fold(_seq_record("c", [0, 3, 0], ts=T0_MS + 32 * day), cust, config, now_ms=T0_MS)
    assert changes(out) == [("lapsed", "exit", T0_MS + 32 * day)]
    # a tick for a profile that is gone (erased) recreates nothing
    gone = MemoryState(store, "cus_gone")
    assert fold({**tick, "customer_id": "cus_gone"}, gone, config, now_ms=T0_MS) == []
    assert gone.get("profile") is None


def test_memory_state_hands_out_values_of_their_own_as_quixstreams_does() -> None:
    """The stages may change what they read (the fold takes a profile's containers over):
    that is safe only because the state serializes on set, which the stand-in mirrors."""
    state = MemoryState({}, "cus_1")
    value = {"cart": {"P1": 1}, "views": ["P1"]}
    state.set("profile", value)
    value["cart"]["P2"] = 1  # the caller's object is not the stored one
    first = state.get("profile")
    first["views"].append("P9")
    assert state.get("profile") == {"cart": {"P1": 1}, "views": ["P1"]}
    with pytest.raises(TypeError):
        state.set("bad", {1, 2})  # JSON cannot hold a set: neither can quixstreams' state


def test_a_profile_folded_from_state_equals_one_folded_from_copies() -> None:
    store: dict[Any, Any] = {}
    cust = MemoryState(store, "cus_1")
    for i, name in enumerate(["Product Viewed", "Product Added", "Order Completed"]):
        record = {**make_event(name, ts=T0_MS + i * 1000).to_dict(), "kind": KIND_EVENT}
        record["seq"] = [0, i, 0]
        fold(record, cust, CONFIG, now_ms=T0_MS + i * 1000)
    stored = cust.get("profile")
    taken = profile_from_dict(cust.get("profile"), copy=False)
    copied = profile_from_dict(stored)
    assert taken == copied and taken.event_count == 3
    assert profile_to_dict(taken, copy=False) == profile_to_dict(copied)
