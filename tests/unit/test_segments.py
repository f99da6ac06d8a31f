"""Unit tests of the segment rules: each packaged rule at its boundaries, and rule-file errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import PipelineError, SegmentRuleError
from pipeline.scoring import DAY_MS, HOUR_MS, Profile
from pipeline.segments import (
    FACTS,
    SegmentRule,
    diff,
    evaluate,
    load_segments,
    parse_segments,
    profile_facts,
)
from pipeline.testing import T0_MS

RULES = load_segments()
NOW = T0_MS + 60 * DAY_MS


def profile(**fields: Any) -> Profile:
    """A known customer seen just now, with ``fields`` overriding the defaults."""
    values: dict[str, Any] = {
        "customer_id": "c1",
        "is_anonymous": False,
        "first_seen_ms": NOW - 40 * DAY_MS,
        "last_seen_ms": NOW,
        "as_of_ms": NOW,
    }
    values.update(fields)
    return Profile(**values)


def segments_of(p: Profile, at_ms: int = NOW) -> frozenset[str]:
    return evaluate(p, at_ms, RULES)


def test_packaged_rules_load() -> None:
    assert [r.name for r in RULES] == [
        "cart_abandoners",
        "high_intent_browsers",
        "lapsed",
        "vip",
        "new_signups",
    ]
    assert all(r.description for r in RULES)


def test_cart_abandoner_within_24_hours_of_an_add_with_no_order_since() -> None:
    cart = {"P1": 1}
    assert "cart_abandoners" in segments_of(profile(last_cart_ms=NOW - 23 * HOUR_MS, cart=cart))
    # 24 h exactly is still inside (le 24); one ms more is outside.
    assert "cart_abandoners" in segments_of(profile(last_cart_ms=NOW - 24 * HOUR_MS, cart=cart))
    assert "cart_abandoners" not in segments_of(
        profile(last_cart_ms=NOW - 24 * HOUR_MS - 1, cart=cart)
    )


def test_cart_abandoner_needs_items_and_no_order_since_the_add() -> None:
    last_cart = NOW - HOUR_MS
    assert "cart_abandoners" not in segments_of(profile(last_cart_ms=last_cart, cart={}))
    ordered_after = profile(last_cart_ms=last_cart, cart={"P1": 1}, last_order_ms=last_cart + 1)
    assert "cart_abandoners" not in segments_of(ordered_after)
    ordered_before = profile(last_cart_ms=last_cart, cart={"P1": 1}, last_order_ms=last_cart - 1)
    assert "cart_abandoners" in segments_of(ordered_before)


def test_no_cart_ever_is_not_an_abandoner() -> None:
    assert "cart_abandoners" not in segments_of(profile(cart={"P1": 1}))


def test_high_intent_browser_by_views_and_interaction_score() -> None:
    # Seen now: s_R = 1. Engagement 20 ln 2 gives s_F = 1 - exp(-ln 2) = 0.5, monetary 0 gives
    # s_M = 0, so CIS = 100 * (0.3 * 1 + 0.4 * 0.5 + 0.3 * 0) = 50 >= 40.
    views = {
        "counts": {"Product Viewed": 5},
        "recent_views": ["P1", "P2", "P3"],
        "last_view_ms": NOW - 7 * DAY_MS,
    }
    engaged = profile(engagement=20 * math.log(2), **views)
    assert profile_facts(engaged, NOW, fields=["cis"])["cis"] == pytest.approx(50.0)
    assert "high_intent_browsers" in segments_of(engaged)
    # No engagement: CIS = 100 * 0.3 = 30 < 40.
    assert "high_intent_browsers" not in segments_of(profile(**views))
    assert "high_intent_browsers" not in segments_of(
        profile(engagement=20 * math.log(2), **{**views, "counts": {"Product Viewed": 4}})
    )
    assert "high_intent_browsers" not in segments_of(
        profile(engagement=20 * math.log(2), **{**views, "last_view_ms": NOW - 7 * DAY_MS - 1})
    )


def test_lapsed_after_more_than_30_days() -> None:
    assert "lapsed" not in segments_of(profile(last_seen_ms=NOW - 30 * DAY_MS))
    assert "lapsed" in segments_of(profile(last_seen_ms=NOW - 30 * DAY_MS - 1))
    assert "lapsed" not in segments_of(Profile(customer_id="c0", is_anonymous=True))


def test_vip_by_revenue_or_order_count() -> None:
    assert "vip" in segments_of(profile(revenue_total=500.0))
    assert "vip" in segments_of(profile(order_count=5))
    assert "vip" not in segments_of(profile(revenue_total=499.99, order_count=4))


def test_new_signup_within_7_days_of_first_sighting() -> None:
    signed = {"counts": {"Signed Up": 1}}
    assert "new_signups" in segments_of(profile(first_seen_ms=NOW - 7 * DAY_MS, **signed))
    assert "new_signups" not in segments_of(profile(first_seen_ms=NOW - 7 * DAY_MS - 1, **signed))
    assert "new_signups" not in segments_of(profile(first_seen_ms=NOW - DAY_MS))


def test_evaluation_is_at_the_as_of_time() -> None:
    p = profile(last_cart_ms=NOW, cart={"P1": 1})
    assert "cart_abandoners" in segments_of(p, NOW + 24 * HOUR_MS)
    assert "cart_abandoners" not in segments_of(p, NOW + 25 * HOUR_MS)


def test_diff_names_entered_and_exited() -> None:
    entered, exited = diff(frozenset({"vip", "lapsed"}), frozenset({"vip", "cart_abandoners"}))
    assert entered == frozenset({"cart_abandoners"})
    assert exited == frozenset({"lapsed"})
    assert diff(frozenset({"vip"}), frozenset({"vip"})) == (frozenset(), frozenset())


def rules(*segments: dict[str, Any]) -> list[SegmentRule]:
    return parse_segments({"version": 1, "segments": list(segments)})


def test_any_and_all_combine() -> None:
    [rule] = rules(
        {
            "name": "mid",
            "all": [{"field": "order_count", "op": "ge", "value": 1}],
            "any": [
                {"field": "timezone", "op": "in", "value": ["Europe/Paris", "Europe/Berlin"]},
                {"field": "has_email", "op": "eq", "value": True},
            ],
        }
    )
    assert evaluate(profile(order_count=1, timezone="Europe/Paris"), NOW, [rule]) == {"mid"}
    assert evaluate(profile(order_count=1, traits={"email": "a@b.c"}), NOW, [rule]) == {"mid"}
    assert evaluate(profile(order_count=1, timezone="Asia/Tokyo"), NOW, [rule]) == frozenset()
    assert evaluate(profile(order_count=0, timezone="Europe/Paris"), NOW, [rule]) == frozenset()


def test_missing_values_fail_comparisons_and_satisfy_is_null() -> None:
    never = profile()
    [lt, ne, null] = rules(
        {"name": "lt", "all": [{"field": "hours_since_last_order", "op": "lt", "value": 1e9}]},
        {"name": "ne", "all": [{"field": "top_category", "op": "ne", "value": "dresses"}]},
        {"name": "null", "all": [{"field": "hours_since_last_order", "op": "is_null"}]},
    )
    assert evaluate(never, NOW, [lt, ne, null]) == {"null"}


def test_every_fact_computes_for_an_empty_profile() -> None:
    facts = profile_facts(Profile(customer_id="c0", is_anonymous=True), NOW)
    assert set(facts) == set(FACTS)


@pytest.mark.parametrize(
    ("segment", "fragment"),
    [
        (
            {"name": "bad_field", "all": [{"field": "shoe_size", "op": "eq", "value": 1}]},
            "shoe_size",
        ),
        (
            {"name": "bad_op", "all": [{"field": "order_count", "op": "between", "value": 1}]},
            "between",
        ),
        (
            {"name": "bool_order", "all": [{"field": "signed_up", "op": "gt", "value": 1}]},
            "does not apply",
        ),
        (
            {"name": "wrong_type", "all": [{"field": "order_count", "op": "ge", "value": "5"}]},
            "does not fit",
        ),
        (
            {
                "name": "bool_as_number",
                "all": [{"field": "order_count", "op": "ge", "value": True}],
            },
            "does not fit",
        ),
        (
            {"name": "null_value", "all": [{"field": "cis", "op": "is_null", "value": 3}]},
            "no value",
        ),
        ({"name": "empty_in", "all": [{"field": "cis", "op": "in", "value": []}]}, "non-empty"),
        (
            {"name": "extra", "all": [{"field": "cis", "op": "ge", "value": 1, "unit": "x"}]},
            "unit",
        ),
        ({"name": "nothing"}, "at least one condition"),
        (
            {"name": "typo", "al": [{"field": "cis", "op": "ge", "value": 1}]},
            "al",
        ),
    ],
)
def test_invalid_rules_raise_naming_the_rule(segment: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SegmentRuleError) as caught:
        rules(segment)
    message = str(caught.value)
    assert repr(segment["name"]) in message
    assert fragment in message


def test_invalid_documents() -> None:
    ok = {"name": "a", "all": [{"field": "cis", "op": "ge", "value": 1}]}
    with pytest.raises(SegmentRuleError, match="duplicate name"):
        rules(ok, ok)
    with pytest.raises(SegmentRuleError, match="#1"):
        rules({"all": [{"field": "cis", "op": "ge", "value": 1}]})
    with pytest.raises(SegmentRuleError, match="Bad Name"):
        rules({**ok, "name": "Bad Name"})
    with pytest.raises(SegmentRuleError, match="segments"):
        parse_segments({"version": 1})
    with pytest.raises(SegmentRuleError, match="version"):
        parse_segments({"version": 2, "segments": []})
    with pytest.raises(SegmentRuleError):
        parse_segments(["not", "a", "mapping"])


def test_load_segments_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SegmentRuleError, match=r"missing\.yaml"):
        load_segments(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("segments: [\n", encoding="utf-8")
    with pytest.raises(SegmentRuleError, match="not valid YAML"):
        load_segments(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        "segments:\n  - name: shoppers\n    all:\n      - {field: basket, op: gt, value: 0}\n",
        encoding="utf-8",
    )
    with pytest.raises(PipelineError, match=r"unknown.yaml: segment 'shoppers': .*'basket'"):
        load_segments(unknown)


def test_custom_rule_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\nsegments:\n"
        "  - name: big_spenders\n    label: Big spenders\n"
        "    all:\n      - {field: revenue_total, op: ge, value: 100}\n",
        encoding="utf-8",
    )
    [rule] = load_segments(path)
    assert rule.title == "Big spenders"
    assert evaluate(profile(revenue_total=100.0), NOW, [rule]) == {"big_spenders"}


def test_compiled_plan_agrees_with_every_fact_computed_up_front() -> None:
    """The stream's lazy, short-circuiting plan decides exactly as the full fact table does.

    Profiles come from a simulated fortnight folded by the real stages, at several as-of times
    (so elapsed-time facts cross the rules' bounds), plus rules of every operator kind.
    """
    from datetime import UTC, datetime

    from pipeline.catalog import load_catalog
    from pipeline.scoring import profile_from_dict
    from pipeline.segments import SegmentPlan
    from pipeline.simulate import SimulationConfig, simulate
    from pipeline.testing import replay

    catalog = load_catalog()
    sim = simulate(SimulationConfig(4000, end=datetime(2026, 11, 1, tzinfo=UTC)), catalog)
    result = replay([(m.key, m.value) for m in sim.messages], catalog=catalog)
    extra = parse_segments(
        {
            "segments": [
                {"name": "tops", "all": [{"field": "top_category", "op": "in", "value": ["tops"]}]},
                {"name": "no_tz", "all": [{"field": "timezone", "op": "is_null"}]},
                {
                    "name": "either",
                    "all": [{"field": "is_anonymous", "op": "ne", "value": True}],
                    "any": [
                        {"field": "cis", "op": "lt", "value": 20},
                        {"field": "sessions", "op": "not_in", "value": [1, 2]},
                    ],
                },
            ]
        }
    )
    rules = [*RULES, *extra]
    plan = SegmentPlan(rules)
    seen: set[str] = set()
    outside: set[str] = set()
    for stored in result.profiles.values():
        p = profile_from_dict(stored)
        assert p.as_of_ms is not None
        for at in (p.as_of_ms, p.as_of_ms + 2 * DAY_MS, p.as_of_ms + 40 * DAY_MS):
            facts = profile_facts(p, at)
            expected = frozenset(r.name for r in rules if r.matches(facts))
            assert plan.evaluate(p, at) == expected == evaluate(p, at, rules)
            seen |= expected
            outside |= {r.name for r in rules} - expected
    # the comparison covered members and non-members of every rule
    assert seen == outside == {r.name for r in rules}
