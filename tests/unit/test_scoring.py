"""Unit tests of the scoring formulas, with the arithmetic written out next to each expectation."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.events import CleanEvent, LineItem
from pipeline.scoring import (
    DAY_MS,
    DEFAULT_EVENT_WEIGHTS,
    HOUR_MS,
    Profile,
    ScoreBreakdown,
    ScoringParams,
    affinity_shares,
    apply_event,
    decay_factor,
    hour_of_week_bin,
    intent_stage,
    interaction_score,
    merge_provenance,
    new_profile,
    profile_from_dict,
    profile_to_dict,
    shift_hours,
)
from pipeline.testing import T0_MS, make_event

P = ScoringParams()


def fold(events: list[CleanEvent], params: ScoringParams = P) -> Profile:
    profile = new_profile("c1", is_anonymous=False)
    for i, event in enumerate(events):
        apply_event(profile, event, params, processed_ms=T0_MS + i)
    return profile


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)


def item(
    pid: str, qty: int = 1, price: float = 10.0, cat: str = "Dresses", brand: str = "Acme"
) -> LineItem:
    return LineItem(product_id=pid, quantity=qty, price=price, category=cat, brand=brand)


def test_decay_factor_halves_every_half_life() -> None:
    assert decay_factor(0, 14.0) == 1.0
    assert decay_factor(14 * DAY_MS, 14.0) == pytest.approx(0.5, abs=1e-15)
    assert decay_factor(28 * DAY_MS, 14.0) == pytest.approx(0.25, abs=1e-15)
    assert decay_factor(7 * DAY_MS, 14.0) == pytest.approx(1 / math.sqrt(2), abs=1e-15)


def test_new_profile_is_empty() -> None:
    p = new_profile("anon:d1", is_anonymous=True)
    assert (p.customer_id, p.is_anonymous, p.event_count, p.as_of_ms) == ("anon:d1", True, 0, None)
    assert interaction_score(p, T0_MS, P) == ScoreBreakdown(0.0, 0.0, 0.0, 0.0)
    assert intent_stage(p, T0_MS, P) == "browsing"


def test_two_views_half_life_apart() -> None:
    # Product Viewed weighs 1; half-life 14 d: 1 * 0.5 + 1 = 1.5.
    p = fold([make_event(ts=T0_MS), make_event(ts=T0_MS + 14 * DAY_MS)])
    assert p.engagement == pytest.approx(1.5, abs=1e-12)
    assert p.as_of_ms == p.last_seen_ms == T0_MS + 14 * DAY_MS
    assert p.first_seen_ms == T0_MS
    assert (p.event_count, p.version, p.counts) == (2, 2, {"Product Viewed": 2})
    assert p.updated_ms == T0_MS + 1


def test_late_event_decays_from_as_of_and_keeps_as_of() -> None:
    # The older view arrives second: it adds 1 * 2 ** (-14/14) = 0.5 → 1.5, as in time order.
    p = fold([make_event(ts=T0_MS + 14 * DAY_MS), make_event(ts=T0_MS)])
    assert p.engagement == pytest.approx(1.5, abs=1e-12)
    assert p.as_of_ms == p.last_seen_ms == T0_MS + 14 * DAY_MS
    assert p.first_seen_ms == T0_MS


def test_each_sum_uses_its_own_half_life() -> None:
    # Dresses viewed at T0 then an order of Shoes at T0 + 30 d (revenue 100, no items).
    # engagement: 1 * 2**(-30/14) + 10; affinity (30 d): Dresses 1 * 0.5, Shoes 10;
    # monetary: 100 added at as_of → 100; a later order 90 d on → 100 * 0.5 + 50 = 100.
    events = [
        make_event(ts=T0_MS, category="Dresses", brand="Acme"),
        make_event(
            "Order Completed", ts=T0_MS + 30 * DAY_MS, category="Shoes", brand="Zed", revenue=100.0
        ),
    ]
    p = fold(events)
    assert p.engagement == pytest.approx(2 ** (-30 / 14) + 10, abs=1e-12)
    assert p.category_affinity == pytest.approx({"Dresses": 0.5, "Shoes": 10.0}, abs=1e-12)
    assert p.brand_affinity == pytest.approx({"Acme": 0.5, "Zed": 10.0}, abs=1e-12)
    assert p.monetary == pytest.approx(100.0)
    apply_event(
        p, make_event("Order Completed", ts=T0_MS + 120 * DAY_MS, revenue=50.0), P, processed_ms=0
    )
    assert p.monetary == pytest.approx(100.0 * 0.5 + 50.0, abs=1e-9)
    assert (p.order_count, p.revenue_total) == (2, 150.0)


def test_item_events_split_weight_over_items() -> None:
    # Order Completed weighs 10, two items → 5 each: Dresses 5, Shoes 5, brand Acme 5 + 5 = 10.
    order = make_event(
        "Order Completed",
        revenue=100.0,
        items=[item("p1", cat="Dresses"), item("p2", cat="Shoes")],
    )
    p = fold([order])
    assert p.engagement == 10.0
    assert p.category_affinity == {"Dresses": 5.0, "Shoes": 5.0}
    assert p.brand_affinity == {"Acme": 10.0}
    # Checkout Started weighs 6, three items: 2 each; an item without brand loses its brand share.
    checkout = make_event(
        "Checkout Started",
        items=[item("p1"), item("p2"), LineItem("p3", 1, 5.0, category="Bags", brand=None)],
    )
    q = fold([checkout])
    assert q.category_affinity == {"Dresses": 4.0, "Bags": 2.0}
    assert q.brand_affinity == {"Acme": 4.0}


def test_order_revenue_falls_back_to_items() -> None:
    # 2 * 30 + 1 * 40 = 100.
    order = make_event(
        "Order Completed", items=[item("p1", qty=2, price=30.0), item("p2", qty=1, price=40.0)]
    )
    p = fold([order])
    assert (p.revenue_total, p.monetary, p.order_count, p.last_order_ms) == (
        100.0,
        100.0,
        1,
        T0_MS,
    )


def test_removed_lowers_affinity_and_clamps_at_zero() -> None:
    # Added 5, Removed -1 → 4; a view (1) then two removals → 1 - 1 → 0 → gone, stays gone.
    p = fold(
        [
            make_event("Product Added", category="Dresses", product_id="p1"),
            make_event("Product Removed", category="Dresses", product_id="p1"),
            make_event(category="Shoes", brand="Zed"),
            make_event("Product Removed", category="Shoes", brand="Zed"),
            make_event("Product Removed", category="Shoes", brand="Zed"),
        ]
    )
    assert p.category_affinity == {"Dresses": 4.0}
    assert p.brand_affinity == {}
    # Engagement is a plain signed sum: 5 - 1 + 1 - 1 - 1 = 3.
    assert p.engagement == 3.0
    # From zero a new view adds its full weight again.
    apply_event(p, make_event(category="Shoes"), P, processed_ms=0)
    assert p.category_affinity == {"Dresses": 4.0, "Shoes": 1.0}


def test_cart_bookkeeping() -> None:
    p = fold(
        [
            make_event("Product Added", product_id="p1", properties={"quantity": 2}),
            make_event("Product Added", ts=T0_MS + HOUR_MS, product_id="p1"),
            make_event(
                "Product Added", ts=T0_MS - HOUR_MS, product_id="p2", properties={"quantity": "x"}
            ),
        ]
    )
    # 2 + 1 (default) = 3; a bad quantity counts as 1; a late add does not move last_cart back.
    assert p.cart == {"p1": 3, "p2": 1}
    assert p.last_cart_ms == T0_MS + HOUR_MS
    later = T0_MS + 2 * HOUR_MS  # after both adds
    for event in [
        make_event("Product Removed", later, product_id="p1", properties={"quantity": 2}),
        make_event("Product Removed", later, product_id="p9"),
    ]:
        apply_event(p, event, P, processed_ms=0)
    assert p.cart == {"p1": 1, "p2": 1}
    apply_event(p, make_event("Product Removed", later, product_id="p1"), P, processed_ms=0)
    assert p.cart == {"p2": 1}
    apply_event(p, make_event("Order Completed", later, items=[item("p2")]), P, processed_ms=0)
    assert p.cart == {}
    assert p.purchased == ["p2"]
    # JSON Schema's integers include 3.0 (the schema accepts it): three, not one
    for name, qty in (("Product Added", 3.0), ("Product Removed", 2.0)):
        event = make_event(name, later, product_id="p3", properties={"quantity": qty})
        apply_event(p, event, P, processed_ms=0)
    assert p.cart == {"p3": 1}
    for odd in (2.5, True, 0, -1.0):  # not a positive whole number: one
        event = make_event("Product Added", later, product_id="p4", properties={"quantity": odd})
        apply_event(p, event, P, processed_ms=0)
    assert p.cart == {"p3": 1, "p4": 4}


def test_purchased_most_recent_first_unique_capped() -> None:
    params = ScoringParams(purchases_kept=3)
    p = fold(
        [
            make_event("Order Completed", ts=T0_MS, items=[item("p1"), item("p2")]),
            make_event("Order Completed", ts=T0_MS + DAY_MS, items=[item("p3"), item("p1")]),
        ],
        params,
    )
    assert p.purchased == ["p3", "p1", "p2"]
    apply_event(
        p,
        make_event("Order Completed", ts=T0_MS + 2 * DAY_MS, product_id="p4"),
        params,
        processed_ms=0,
    )
    assert p.purchased == ["p4", "p3", "p1"]
    # A late order cannot jump ahead of newer ones; with the list full it adds nothing.
    apply_event(
        p,
        make_event("Order Completed", ts=T0_MS - DAY_MS, items=[item("p5")]),
        params,
        processed_ms=0,
    )
    assert p.purchased == ["p4", "p3", "p1"]
    assert p.last_order_ms == T0_MS + 2 * DAY_MS


def test_late_order_fills_room_at_the_back() -> None:
    p = fold(
        [
            make_event("Order Completed", ts=T0_MS, items=[item("p1")]),
            make_event("Order Completed", ts=T0_MS - DAY_MS, items=[item("p2"), item("p1")]),
        ]
    )
    assert p.purchased == ["p1", "p2"]


def test_recent_views_most_recent_first_unique_capped() -> None:
    params = ScoringParams(recent_views_kept=3)
    p = fold(
        [
            make_event(ts=T0_MS + 0, product_id="a"),
            make_event("Product Clicked", ts=T0_MS + 1, product_id="b"),
            make_event(ts=T0_MS + 2, product_id="a"),
            make_event(ts=T0_MS + 3, product_id="c"),
            make_event(ts=T0_MS + 4, product_id="d"),
        ],
        params,
    )
    assert p.recent_views == ["d", "c", "a"]
    assert p.last_view_ms == T0_MS + 4
    apply_event(p, make_event(ts=T0_MS - 5, product_id="z"), params, processed_ms=0)
    assert p.recent_views == ["d", "c", "a"]
    assert p.last_view_ms == T0_MS + 4
    empty = fold([make_event(product_id="a")], ScoringParams(recent_views_kept=0))
    assert empty.recent_views == []


def test_hour_of_week_bin_utc_and_tokyo() -> None:
    # T0 is Monday 2024-01-01 00:00 UTC = Monday 09:00 in Tokyo (UTC+9, no DST).
    assert hour_of_week_bin(T0_MS, "UTC") == 0
    assert hour_of_week_bin(T0_MS, "Asia/Tokyo") == 9
    # One hour earlier is Sunday 23:00 UTC (6 * 24 + 23 = 167) but Monday 08:00 in Tokyo.
    assert hour_of_week_bin(T0_MS - HOUR_MS, "UTC") == 167
    assert hour_of_week_bin(T0_MS - HOUR_MS, "Asia/Tokyo") == 8
    # Friday 2024-01-05 20:30 UTC = Saturday 05:30 JST → 5 * 24 + 5 = 125.
    assert hour_of_week_bin(utc_ms(2024, 1, 5, 20, 30), "Asia/Tokyo") == 125


def test_hour_of_week_bin_across_dst() -> None:
    # New York springs forward Sunday 2024-03-10 02:00 EST → 03:00 EDT.
    # 06:30 UTC = 01:30 EST → 6 * 24 + 1 = 145; 07:30 UTC = 03:30 EDT → 147 (02:xx never happens).
    assert hour_of_week_bin(utc_ms(2024, 3, 10, 6, 30), "America/New_York") == 145
    assert hour_of_week_bin(utc_ms(2024, 3, 10, 7, 30), "America/New_York") == 147
    # Berlin falls back Sunday 2024-10-27 03:00 CEST → 02:00 CET: 00:30 and 01:30 UTC are
    # both 02:30 local → 6 * 24 + 2 = 146.
    assert hour_of_week_bin(utc_ms(2024, 10, 27, 0, 30), "Europe/Berlin") == 146
    assert hour_of_week_bin(utc_ms(2024, 10, 27, 1, 30), "Europe/Berlin") == 146


def test_hour_of_week_bin_unknown_zone_is_utc() -> None:
    assert hour_of_week_bin(T0_MS + 5 * HOUR_MS, "Mars/Olympus") == 5
    assert hour_of_week_bin(T0_MS + 5 * HOUR_MS, "../etc/passwd") == 5
    assert hour_of_week_bin(T0_MS + 5 * HOUR_MS, "") == 5
    # folders of the time-zone database (ZoneInfo raises IsADirectoryError): a poison record
    # for stage 2 before, replayed after every restart
    for folder in ("Europe", "America", "Etc"):
        assert hour_of_week_bin(T0_MS + 5 * HOUR_MS, folder) == 5


def test_hour_of_week_histogram() -> None:
    p = fold(
        [
            make_event(ts=T0_MS, timezone="Asia/Tokyo"),  # Mon 09:00 JST → "9" += 1
            make_event("Email Opened", ts=T0_MS),  # profile tz is now Tokyo → "9" += 3
            make_event("Email Clicked", ts=T0_MS + HOUR_MS, timezone="UTC"),  # Mon 01:00 → "1" += 3
            make_event("Identify", ts=T0_MS, traits={"email": "a@b.c"}),  # not engagement
            make_event("Product Removed", ts=T0_MS),  # negative weight: not engagement
        ]
    )
    assert p.hour_of_week == {"9": 4.0, "1": 3.0}
    assert fold([make_event(ts=T0_MS + 2 * HOUR_MS)]).hour_of_week == {"2": 1.0}


def test_cis_formula_with_explicit_numbers() -> None:
    p = new_profile("c1", is_anonymous=False)
    p.first_seen_ms = p.last_seen_ms = p.as_of_ms = T0_MS
    p.engagement, p.monetary = 20.0, 200.0
    # At T0: s_R = 1, s_F = 1 - e^(-20/20) = 0.6321206, s_M = 1 - e^(-200/200) = 0.6321206;
    # CIS = 100 * (0.3 + 0.4 * 0.6321206 + 0.3 * 0.6321206) = 74.2484391.
    now = interaction_score(p, T0_MS, P)
    assert now.recency == 1.0
    assert now.frequency == pytest.approx(0.6321205588, abs=1e-9)
    assert now.monetary == pytest.approx(0.6321205588, abs=1e-9)
    assert now.score == pytest.approx(74.2484391180, abs=1e-8)
    # 14 d later: s_R = 0.5; engagement 20 * 0.5 = 10 → s_F = 1 - e^-0.5 = 0.3934693;
    # monetary 200 * 2^(-14/90) = 179.5573170 → s_M = 1 - e^-0.8977866 = 0.5925294;
    # CIS = 100 * (0.3 * 0.5 + 0.4 * 0.3934693 + 0.3 * 0.5925294) = 48.5146567.
    later = interaction_score(p, T0_MS + 14 * DAY_MS, P)
    assert later.recency == pytest.approx(0.5, abs=1e-12)
    assert later.frequency == pytest.approx(0.3934693403, abs=1e-9)
    assert later.monetary == pytest.approx(0.5925294362, abs=1e-9)
    assert later.score == pytest.approx(48.5146566985, abs=1e-8)
    # A time before as_of reads as as_of: no un-decay.
    assert interaction_score(p, T0_MS - DAY_MS, P) == now


def test_cis_set_by_apply_event() -> None:
    # One order of 200: engagement 10, monetary 200, seen now →
    # 100 * (0.3 * 1 + 0.4 * (1 - e^-0.5) + 0.3 * (1 - e^-1)) = 30 + 15.7387736 + 18.9636168.
    p = fold([make_event("Order Completed", revenue=200.0)])
    assert p.cis == pytest.approx(64.7023903764, abs=1e-8)
    assert p.intent_stage == "purchased"


def test_negative_engagement_scores_zero_frequency() -> None:
    p = fold([make_event("Product Removed")])
    assert p.engagement == -1.0
    assert interaction_score(p, T0_MS, P).frequency == 0.0
    # Only recency remains: 100 * 0.3 * 1 = 30.
    assert p.cis == pytest.approx(30.0)


def test_intent_never_seen_and_lapsed_boundary() -> None:
    p = fold([make_event(ts=T0_MS)])
    assert intent_stage(p, T0_MS, P) == "browsing"
    assert intent_stage(p, T0_MS + 30 * DAY_MS, P) == "browsing"  # exactly 30 d: not yet
    assert intent_stage(p, T0_MS + 30 * DAY_MS + 1, P) == "lapsed"
    assert intent_stage(new_profile("x", is_anonymous=True), T0_MS, P) == "browsing"


def test_intent_purchased_boundaries() -> None:
    p = fold([make_event("Order Completed", ts=T0_MS, revenue=10.0)])
    assert intent_stage(p, T0_MS + 14 * DAY_MS, P) == "purchased"
    assert intent_stage(p, T0_MS + 14 * DAY_MS + 1, P) == "browsing"
    # Order and cart add at the same instant: the order wins (last_order >= last_cart).
    q = fold(
        [
            make_event("Product Added", ts=T0_MS, product_id="p2"),
            make_event("Order Completed", ts=T0_MS, items=[item("p1")]),
        ]
    )
    assert intent_stage(q, T0_MS, P) == "purchased"
    # Lapsed wins over purchased when the window is longer than the lapse.
    long = ScoringParams(purchased_window_days=60)
    assert intent_stage(p, T0_MS + 31 * DAY_MS, long) == "lapsed"


def test_intent_cart_boundaries() -> None:
    p = fold([make_event("Product Added", ts=T0_MS, product_id="p1")])
    assert p.intent_stage == "cart"
    assert intent_stage(p, T0_MS + 72 * HOUR_MS, P) == "cart"
    assert intent_stage(p, T0_MS + 72 * HOUR_MS + 1, P) == "browsing"
    # An add after an order: back to cart; an emptied cart: browsing.
    q = fold(
        [
            make_event("Order Completed", ts=T0_MS, items=[item("p1")]),
            make_event("Product Added", ts=T0_MS + 1, product_id="p2"),
        ]
    )
    assert q.intent_stage == "cart"
    apply_event(q, make_event("Product Removed", ts=T0_MS + 2, product_id="p2"), P, processed_ms=0)
    assert q.intent_stage == "browsing"


def test_sessions_devices_timezone_and_traits() -> None:
    p = fold(
        [
            make_event(ts=T0_MS, session_id="s1", device_type="mobile", timezone="Europe/Paris"),
            make_event(ts=T0_MS + 1, session_id="s1", device_type="mobile"),
            make_event(ts=T0_MS + 2, session_id="s2", device_type="desktop"),
            make_event(ts=T0_MS + 3),
        ]
    )
    assert (p.sessions, p.last_session_id) == (2, "s2")
    assert p.devices == {"mobile": 2, "desktop": 1}
    assert p.timezone == "Europe/Paris"
    identify = make_event(
        "Identify",
        ts=T0_MS + 10,
        traits={
            "email": "new@x.io",
            "firstName": "Ada",
            "timezone": "Asia/Tokyo",
            "lastName": None,
        },
    )
    late_identify = make_event(
        "Identify", ts=T0_MS + 5, traits={"email": "old@x.io", "lastName": "Lovelace"}
    )
    for event in [identify, late_identify, make_event(ts=T0_MS + 20, timezone="America/Chicago")]:
        apply_event(p, event, P, processed_ms=0)
    # The newer identify keeps its email; the late one only fills lastName; the traits
    # timezone wins over a context timezone that comes later.
    assert p.traits == {
        "email": "new@x.io",
        "firstName": "Ada",
        "timezone": "Asia/Tokyo",
        "lastName": "Lovelace",
    }
    assert p.timezone == "Asia/Tokyo"
    assert p.engagement == pytest.approx(5.0, abs=1e-6)  # 5 views ms apart; identify weighs 0


def test_merge_provenance_is_idempotent_and_keeps_earliest() -> None:
    p = new_profile("c1", is_anonymous=False)
    merge_provenance(p, "d1", linked_ms=T0_MS, via_message_id="m1")
    merge_provenance(p, "d1", linked_ms=T0_MS, via_message_id="m1")
    merge_provenance(p, "d1", linked_ms=T0_MS + 1, via_message_id="m2")
    assert p.anonymous_ids == {"d1": {"linked_ms": T0_MS, "via": "m1"}}
    merge_provenance(p, "d1", linked_ms=T0_MS - 1, via_message_id="m0")
    merge_provenance(p, "d2", linked_ms=T0_MS, via_message_id="m3")
    assert p.anonymous_ids == {
        "d1": {"linked_ms": T0_MS - 1, "via": "m0"},
        "d2": {"linked_ms": T0_MS, "via": "m3"},
    }


def test_affinity_shares() -> None:
    # 3 / (1 + 3) = 0.75, 1 / 4 = 0.25; non-positive entries carry no share.
    shares = affinity_shares({"a": 1.0, "b": 3.0, "c": 0.0})
    assert shares == {"b": 0.75, "a": 0.25}
    assert list(shares) == ["b", "a"]
    assert list(affinity_shares({"y": 1.0, "x": 1.0})) == ["x", "y"]
    assert affinity_shares({}) == {}
    assert affinity_shares({"a": 0.0}) == {}


def test_profile_round_trip_through_json() -> None:
    p = fold(
        [
            make_event(ts=T0_MS, category="Dresses", product_id="p1", session_id="s1"),
            make_event("Product Added", ts=T0_MS + 1, product_id="p1", device_type="ios"),
            make_event("Order Completed", ts=T0_MS + 2, items=[item("p1")], revenue=30.0),
            make_event("Identify", ts=T0_MS + 3, traits={"email": "a@b.c", "tags": ["vip"]}),
        ]
    )
    merge_provenance(p, "d1", linked_ms=T0_MS, via_message_id="m1")
    d = profile_to_dict(p)
    assert set(d) == set(Profile.__slots__)
    back = profile_from_dict(orjson.loads(orjson.dumps(d)))
    assert back == p
    # The dict is a copy: changing it does not touch the live profile.
    d["counts"]["x"] = 1
    d["anonymous_ids"]["d1"]["via"] = "changed"
    assert "x" not in p.counts and p.anonymous_ids["d1"]["via"] == "m1"


def test_profile_from_dict_fills_defaults_for_older_state() -> None:
    p = profile_from_dict({"customer_id": "c9", "is_anonymous": True})
    assert p == new_profile("c9", is_anonymous=True)


def test_params_refuse_weights_not_summing_to_one() -> None:
    with pytest.raises(ValidationError, match="not 1"):
        ScoringParams(weight_recency=0.5)  # 0.5 + 0.4 + 0.3 = 1.2
    with pytest.raises(ValidationError):
        ScoringParams.model_validate({"half_life": 3})
    assert ScoringParams(weight_recency=0.2, weight_frequency=0.5, weight_monetary=0.3)


def test_make_event_defaults() -> None:
    a, b = make_event(), make_event("Identify", items=[item("p1")])
    assert (a.type, a.name, a.timestamp_ms, a.customer_id) == (
        "track",
        "Product Viewed",
        T0_MS,
        "c1",
    )
    assert b.type == "identify" and isinstance(b.items, tuple)
    assert a.message_id != b.message_id


NAMES = sorted(DEFAULT_EVENT_WEIGHTS)
CATS = ["Dresses", "Shoes", "Bags"]
BRANDS = ["Acme", "Zed"]


@st.composite
def events_strategy(draw: Any, allow_negative: bool) -> list[CleanEvent]:
    names = [n for n in NAMES if allow_negative or DEFAULT_EVENT_WEIGHTS[n] >= 0]
    n = draw(st.integers(1, 25))
    events = []
    for _ in range(n):
        name = draw(st.sampled_from(names))
        ts = T0_MS + draw(st.integers(0, 200 * DAY_MS))
        fields: dict[str, Any] = {
            "category": draw(st.sampled_from([None, *CATS])),
            "brand": draw(st.sampled_from([None, *BRANDS])),
        }
        if name in ("Order Completed", "Cart Viewed", "Checkout Started"):
            k = draw(st.integers(0, 3))
            fields["items"] = [
                item(f"p{i}", cat=draw(st.sampled_from(CATS)), brand=draw(st.sampled_from(BRANDS)))
                for i in range(k)
            ]
            fields["revenue"] = draw(st.floats(0, 500))
        events.append(make_event(name, ts=ts, **fields))
    return events


def expected_sum(events: list[CleanEvent], value: Any, half_life: float) -> float:
    as_of = max(e.timestamp_ms for e in events)
    return math.fsum(value(e) * decay_factor(as_of - e.timestamp_ms, half_life) for e in events)


def assert_same_sums(a: Profile, b: Profile, affinities: bool) -> None:
    assert a.engagement == pytest.approx(b.engagement, abs=1e-9)
    assert a.monetary == pytest.approx(b.monetary, abs=1e-9)
    assert (a.as_of_ms, a.first_seen_ms, a.last_seen_ms) == (
        b.as_of_ms,
        b.first_seen_ms,
        b.last_seen_ms,
    )
    assert (a.counts, a.event_count, a.order_count) == (b.counts, b.event_count, b.order_count)
    assert (a.last_order_ms, a.last_cart_ms, a.last_view_ms) == (
        b.last_order_ms,
        b.last_cart_ms,
        b.last_view_ms,
    )
    assert a.hour_of_week == b.hour_of_week
    assert a.cis == pytest.approx(b.cis, abs=1e-9)
    assert a.intent_stage == b.intent_stage
    if affinities:
        for mine, theirs in [
            (a.category_affinity, b.category_affinity),
            (a.brand_affinity, b.brand_affinity),
        ]:
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-9)


def test_same_events_in_two_orders_give_same_sums() -> None:
    events = [
        make_event(ts=T0_MS + 3 * DAY_MS, category="Dresses"),
        make_event("Product Added", ts=T0_MS, category="Shoes", product_id="p1"),
        make_event("Order Completed", ts=T0_MS + 40 * DAY_MS, revenue=80.0, items=[item("p1")]),
        make_event("Email Opened", ts=T0_MS + 10 * DAY_MS),
    ]
    forward = fold(sorted(events, key=lambda e: e.timestamp_ms))
    shuffled = fold(events)
    assert_same_sums(forward, shuffled, affinities=True)
    # engagement = 5 * 2^(-40/14) + 1 * 2^(-37/14) + 1 * 2^(-30/14) + 10
    assert forward.engagement == pytest.approx(
        5 * 2 ** (-40 / 14) + 2 ** (-37 / 14) + 2 ** (-30 / 14) + 10, abs=1e-12
    )


@settings(max_examples=200, deadline=None)
@given(events=events_strategy(allow_negative=False), seed=st.integers(0, 2**32))
def test_order_independence_property(events: list[CleanEvent], seed: int) -> None:
    shuffled = list(events)
    random.Random(seed).shuffle(shuffled)
    a, b = fold(events), fold(shuffled)
    assert_same_sums(a, b, affinities=True)
    weights = DEFAULT_EVENT_WEIGHTS
    assert a.engagement == pytest.approx(
        expected_sum(events, lambda e: weights[e.name], P.engagement_half_life_days), abs=1e-9
    )
    assert a.monetary == pytest.approx(
        expected_sum(
            events,
            lambda e: (e.revenue or 0.0) if e.name == "Order Completed" else 0.0,
            P.monetary_half_life_days,
        ),
        abs=1e-9,
    )


@settings(max_examples=100, deadline=None)
@given(events=events_strategy(allow_negative=True), seed=st.integers(0, 2**32))
def test_order_independence_with_removals(events: list[CleanEvent], seed: int) -> None:
    # Clamping affinities at 0 depends on order, so only the unclamped sums are compared.
    shuffled = list(events)
    random.Random(seed).shuffle(shuffled)
    assert_same_sums(fold(events), fold(shuffled), affinities=False)


def test_the_cart_does_not_depend_on_arrival_order() -> None:
    """Adds, removals and orders in every order they can arrive: the cart is what it was at
    the newest event time (before, a late add put a bought item back)."""
    import itertools

    h = HOUR_MS
    scenarios = [
        # added, then bought: nothing left
        [
            make_event("Product Added", T0_MS, product_id="p1"),
            make_event("Order Completed", T0_MS + h, items=[item("p1")]),
        ],
        # bought, then added again: one
        [
            make_event("Order Completed", T0_MS, items=[item("p1")]),
            make_event("Product Added", T0_MS + 5 * h, product_id="p1"),
        ],
        # added, removed, added again: one
        [
            make_event("Product Added", T0_MS, product_id="p1"),
            make_event("Product Removed", T0_MS + h, product_id="p1"),
            make_event("Product Added", T0_MS + 2 * h, product_id="p1"),
        ],
        # added twice, bought in between: the second add stays
        [
            make_event("Product Added", T0_MS, product_id="p1"),
            make_event("Order Completed", T0_MS + h, items=[item("p1")]),
            make_event("Product Added", T0_MS + 2 * h, product_id="p1"),
        ],
        # added twice, one removed: one (a removal arriving first is not the whole line)
        [
            make_event("Product Added", T0_MS, product_id="p1"),
            make_event("Product Added", T0_MS + h, product_id="p1"),
            make_event("Product Removed", T0_MS + 2 * h, product_id="p1"),
        ],
        # bought, then added twice: two
        [
            make_event("Order Completed", T0_MS, items=[item("p1")]),
            make_event("Product Added", T0_MS + h, product_id="p1"),
            make_event("Product Added", T0_MS + 2 * h, product_id="p1"),
        ],
        # removed before anything was added (a client's glitch), then added: one
        [
            make_event("Product Removed", T0_MS, product_id="p1"),
            make_event("Product Added", T0_MS + h, product_id="p1"),
        ],
        # two units added at once, one removed, bought, added again: one
        [
            make_event("Product Added", T0_MS, product_id="p1", properties={"quantity": 2}),
            make_event("Product Removed", T0_MS + h, product_id="p1"),
            make_event("Order Completed", T0_MS + 2 * h, items=[item("p1")]),
            make_event("Product Added", T0_MS + 3 * h, product_id="p1"),
        ],
    ]
    for events in scenarios:
        carts = {
            tuple(sorted(fold(list(order)).cart.items()))
            for order in itertools.permutations(events)
        }
        assert carts == {tuple(sorted(fold(events).cart.items()))}, events


def test_sessions_taking_turns_count_once_each() -> None:
    """Two tabs or devices interleaving (or a late event of an earlier session) are two
    sessions, not one per switch."""
    turns = [
        make_event(ts=T0_MS + i * 60_000, product_id="p", session_id=s)
        for i, s in enumerate(["s1", "s2", "s1", "s2"])
    ]
    assert fold(turns).sessions == 2
    assert fold([turns[0], turns[1], turns[3], turns[2]]).sessions == 2
    many = [make_event(ts=T0_MS + i, session_id=f"s{i}") for i in range(15)]
    p = fold(many)
    assert p.sessions == 15 and len(p.recent_sessions) == 10 and p.last_session_id == "s14"


def test_email_opens_seen_before_the_zone_was_known_are_read_in_it() -> None:
    """Server-side opens carry no zone and are binned in UTC until the profile learns one;
    then they move to local hours, so the best send time does not depend on which came first."""
    from pipeline.sendtime import best_send_time, default_prior

    week = 7 * 86_400_000
    opens = [make_event("Email Opened", T0_MS + week - w * week) for w in range(4)]
    visit = make_event("Page Viewed", T0_MS + 9 * 86_400_000, timezone="America/New_York")
    at = T0_MS + 10 * 86_400_000
    times = {
        best_send_time(fold(events), default_prior(), at_ms=at).local_time.strftime("%a %H:%M")
        for events in ([visit, *opens], [*opens, visit])
    }
    assert len(times) == 1, times


def test_a_histogram_moves_whole_hours_and_splits_at_half_and_quarter_hour_offsets() -> None:
    """UTC 10:00-10:59 is 15:30-16:29 in India (+5:30): half of a count in 15, half in 16;
    Nepal (+5:45) 15:45-16:44: a quarter in 15, three quarters in 16; Newfoundland (-3:30)
    06:30-07:29: half in 6, half in 7. Whole hours move a bin; totals are kept; the week wraps."""
    assert shift_hours({"10": 4.0}, 9) == {"19": 4.0}
    assert shift_hours({"10": 4.0}, 5.5) == {"15": 2.0, "16": 2.0}
    assert shift_hours({"10": 4.0}, 5.75) == {"15": 1.0, "16": 3.0}
    assert shift_hours({"10": 4.0}, -3.5) == {"6": 2.0, "7": 2.0}
    assert shift_hours({"167": 2.0, "0": 1.0}, 1) == {"0": 2.0, "1": 1.0}
    assert shift_hours({"1": 2.0}, -5) == {"164": 2.0}
    moved = shift_hours({"3": 1.0, "80": 2.5, "167": 0.5}, 5.5)
    assert sum(moved.values()) == pytest.approx(4.0)


def test_opens_counted_before_a_half_hour_zone_land_where_they_would_after_it() -> None:
    """Two email opens in the same UTC hour, at :15 and :45, binned in UTC before the profile
    learns it is in Asia/Kolkata: moved to local hours they weigh what the same opens counted
    after the zone would, summed over the two local hours they fall in."""
    opens = [
        make_event("Email Opened", utc_ms(2024, 1, 8, 10, 15)),
        make_event("Email Opened", utc_ms(2024, 1, 8, 10, 45)),
    ]
    visit = make_event("Page Viewed", utc_ms(2024, 1, 9, 9, 0), timezone="Asia/Kolkata")
    before = fold([*opens, visit]).hour_of_week
    after = fold([visit, *opens]).hour_of_week
    # Monday 15:45 and 16:15 IST: bins 15 and 16 carry the opens' weight either way
    assert before["15"] + before["16"] == pytest.approx(after["15"] + after["16"])
    assert before["15"] == pytest.approx(before["16"])  # split evenly, not all in one hour
    assert after["15"] == pytest.approx(after["16"])


@pytest.mark.parametrize("trait", ["", "Mars/Olympus", "europe/berlin"])
def test_an_empty_or_unknown_zone_trait_does_not_stand_in_for_the_customers_zone(
    trait: str,
) -> None:
    """Any string passes the schema as ``traits.timezone``; one that names no zone must not
    block the events' zone for good (the send time was then read in UTC, an hour off here)."""
    identify = make_event("Identify", utc_ms(2024, 1, 1), traits={"timezone": trait})
    opens = [
        make_event("Email Opened", utc_ms(2024, 1, day, 19), timezone="Europe/Berlin")
        for day in (2, 3, 4)
    ]
    p = fold([identify, *opens])
    assert p.timezone == "Europe/Berlin"
    assert p.traits["timezone"] == trait  # kept as sent: the traits are the customer's
    # Tuesday to Thursday 20:00 in Berlin: bins 24 * weekday + 20, three times as much as a visit
    assert p.hour_of_week == {"44": 3.0, "68": 3.0, "92": 3.0}


def test_an_unknown_event_zone_is_neither_adopted_nor_used_to_bin_the_hour() -> None:
    """A context zone that names no zone: its hour is binned in the profile's zone (or UTC,
    moved when the first real zone comes), as if it carried none."""
    opened = make_event("Email Opened", utc_ms(2024, 1, 15, 8))  # server-side: no zone
    bogus = make_event("Page Viewed", utc_ms(2024, 1, 15, 9), timezone="Mars/Olympus")
    new_york = make_event("Page Viewed", utc_ms(2024, 1, 15, 10), timezone="America/New_York")
    without = fold([opened, new_york])
    p = fold([opened, bogus, new_york])
    assert p.timezone == without.timezone == "America/New_York"
    # Monday 03:00 (the open, moved from 08:00 UTC), 04:00 (the bogus visit, binned in UTC
    # and moved with the open) and 05:00 in New York
    assert without.hour_of_week == {"3": 3.0, "5": 1.0}
    assert p.hour_of_week == {"3": 3.0, "4": 1.0, "5": 1.0}
