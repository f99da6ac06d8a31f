"""Identity resolution: attribution of events to customers and when a device links."""

from __future__ import annotations

from pipeline.events import CleanEvent
from pipeline.identity import (
    SPANS_KEPT,
    Resolution,
    add_span,
    anonymous_customer_id,
    device_of,
    is_anonymous,
    is_suppressed,
    owner_at,
    resolve,
)
from pipeline.pii import sha256_hex


def ev(**kw: object) -> CleanEvent:
    base: dict[str, object] = {
        "message_id": "m1",
        "type": "track",
        "name": "Product Viewed",
        "timestamp_ms": 1_000,
        "ingested_ms": 1_000,
    }
    return CleanEvent(**{**base, **kw})  # type: ignore[arg-type]


def test_unlinked_anonymous_event_goes_to_the_anonymous_profile() -> None:
    assert resolve(ev(anonymous_id="a1"), None) == Resolution(customer_id="anon:a1")


def test_linked_device_routes_anonymous_events_to_its_customer() -> None:
    assert resolve(ev(anonymous_id="a1"), "cus_1") == Resolution(customer_id="cus_1")


def test_first_login_links_the_device_and_asks_for_a_merge() -> None:
    res = resolve(ev(type="identify", name="Identify", anonymous_id="a1", user_id="cus_1"), None)
    assert res == Resolution(customer_id="cus_1", link="cus_1", first_link=True, linked_ms=1_000)


def test_known_pair_only_moves_the_links_event_time_forward() -> None:
    known = ev(anonymous_id="a1", user_id="cus_1")
    assert resolve(known, "cus_1", 500) == Resolution("cus_1", linked_ms=1_000)
    assert resolve(known, "cus_1", 2_000) == Resolution("cus_1")


def test_another_user_on_a_shared_device_relinks_without_merge() -> None:
    res = resolve(ev(anonymous_id="a1", user_id="cus_2"), "cus_1", 900)
    assert res == Resolution(
        customer_id="cus_2",
        link="cus_2",
        first_link=False,
        previous_customer_id="cus_1",
        linked_ms=1_000,
    )


def test_a_late_event_of_a_shared_devices_previous_user_is_theirs_but_does_not_relink() -> None:
    late = ev(anonymous_id="a1", user_id="cus_1", timestamp_ms=1_000)
    assert resolve(late, "cus_2", 2_000) == Resolution("cus_1")
    # the same time: the greater id keeps the device, whichever came first
    tie = ev(anonymous_id="a1", user_id="cus_1", timestamp_ms=2_000)
    assert resolve(tie, "cus_2", 2_000) == Resolution("cus_1")
    tie_b = ev(anonymous_id="a1", user_id="cus_2", timestamp_ms=2_000)
    assert resolve(tie_b, "cus_1", 2_000).link == "cus_2"


def test_a_late_anonymous_event_goes_to_whoever_had_the_device_at_its_time() -> None:
    spans = [[100, "cus_1"], [500, "cus_2"]]
    assert resolve(ev(anonymous_id="a1", timestamp_ms=300), "cus_2", 600, spans).customer_id == (
        "cus_1"
    )
    assert resolve(ev(anonymous_id="a1", timestamp_ms=50), "cus_2", 600, spans).customer_id == (
        "cus_1"  # before any login: the first user's, as the merged history was
    )
    assert resolve(ev(anonymous_id="a1", timestamp_ms=500), "cus_2", 600, spans).customer_id == (
        "cus_2"
    )


def test_turns_on_a_device_are_kept_in_time_order_merged_and_bounded() -> None:
    spans = add_span([], 500, "cus_2")
    spans = add_span(spans, 100, "cus_1")  # an earlier user's event, late
    spans = add_span(spans, 200, "cus_1")  # the same turn
    assert spans == [[100, "cus_1"], [500, "cus_2"]]
    assert owner_at(spans, 499) == "cus_1" and owner_at(spans, 700) is None
    assert owner_at([[100, "cus_1"]], 50) is None  # one user: always theirs
    many: list[list[object]] = []
    for i in range(SPANS_KEPT + 5):
        many = add_span(many, i, f"cus_{i}")
    assert len(many) == SPANS_KEPT and many[-1] == [SPANS_KEPT + 4, f"cus_{SPANS_KEPT + 4}"]


def test_server_side_event_without_device_is_attributed_but_links_nothing() -> None:
    assert resolve(ev(user_id="cus_1", device_type="server"), None) == Resolution("cus_1")


def test_alias_links_previous_id() -> None:
    alias = ev(type="alias", name="Alias", previous_id="a9", user_id="cus_3")
    assert device_of(alias) == "a9"
    assert resolve(alias, None) == Resolution(
        "cus_3", link="cus_3", first_link=True, linked_ms=1_000
    )


def test_anonymous_ids_are_recognizable() -> None:
    assert is_anonymous(anonymous_customer_id("x"))
    assert not is_anonymous("cus_1")


def test_suppression_judges_a_known_customer_by_them_and_a_device_only_without_one() -> None:
    forgotten = frozenset({sha256_hex("C"), sha256_hex("anon:shared")})
    assert is_suppressed(forgotten, user_id="C", anonymous_id="elsewhere")
    assert is_suppressed(forgotten, customer_id="C")
    # anonymous events of the forgotten customer's device, and an alias naming it
    assert is_suppressed(forgotten, customer_id="anon:shared", anonymous_id="shared")
    assert is_suppressed(forgotten, user_id=None, anonymous_id="shared")
    assert is_suppressed(forgotten, anonymous_id="new-device", previous_id="shared")
    # another customer signed in on that device keeps their events
    assert not is_suppressed(forgotten, user_id="B", anonymous_id="shared")
    assert not is_suppressed(forgotten, customer_id="B", anonymous_id="shared")
    # ids that are not strings (unvalidated, at the collector) match no one and do not raise
    assert not is_suppressed(forgotten, user_id=12345, anonymous_id={"x": 1})
    assert not is_suppressed(frozenset(), user_id="C")
