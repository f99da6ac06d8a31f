"""Case-study statistics and planning: lift, Katz and bootstrap intervals, split, pacing, peaks."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.casestudy import (
    SEED_CLAIMS,
    SEED_CLAIMS_LABEL,
    WEEK_MS,
    CaseStudyParams,
    CaseStudyResult,
    answer_emails,
    arm_table,
    cluster_bootstrap_interval,
    katz_interval,
    latency_by_period,
    lift_table,
    next_utc_hour,
    peak_hours,
    plan_emails,
    relative_lift,
    replay_offsets_s,
    sensitivity_table,
    split_arms,
)
from pipeline.catalog import load_catalog
from pipeline.recommend import popular_baseline, signals_from_events
from pipeline.scoring import DAY_MS, HOUR_MS, hour_of_week_bin, profile_from_dict
from pipeline.simulate import SimulationConfig, simulate
from pipeline.simulate import behaviour as behaviour_model
from pipeline.simulate.behaviour import BehaviourParams
from pipeline.testing import replay

T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)  # a Monday, 00:00 UTC


def test_relative_lift_by_hand() -> None:
    assert relative_lift(30, 1000, 20, 1000) == pytest.approx(0.5)
    assert relative_lift(10, 500, 20, 1000) == pytest.approx(0.0)
    assert relative_lift(0, 100, 5, 100) == pytest.approx(-1.0)
    assert math.isnan(relative_lift(5, 100, 0, 100))
    assert math.isnan(relative_lift(5, 0, 5, 100))


def test_katz_interval_by_hand() -> None:
    # RR = 1.5, se = sqrt(1/30 - 1/1000 + 1/20 - 1/1000) = 0.285190
    low, high = katz_interval(30, 1000, 20, 1000)
    assert low == pytest.approx(math.exp(math.log(1.5) - 1.959964 * 0.285190) - 1, abs=1e-5)
    assert (low, high) == pytest.approx((-0.142297, 1.623285), abs=1e-5)
    assert low < relative_lift(30, 1000, 20, 1000) < high


def test_katz_interval_is_undefined_without_hits() -> None:
    assert all(math.isnan(v) for v in katz_interval(0, 100, 5, 100))
    assert all(math.isnan(v) for v in katz_interval(5, 100, 0, 100))


def test_katz_interval_narrows_with_more_data() -> None:
    small = katz_interval(30, 1000, 20, 1000)
    large = katz_interval(300, 10000, 200, 10000)
    assert large[1] - large[0] < (small[1] - small[0]) / 2


def test_cluster_bootstrap_matches_katz_with_one_email_per_customer() -> None:
    hits_t = [1] * 300 + [0] * 2700
    hits_c = [1] * 200 + [0] * 2800
    low, high = cluster_bootstrap_interval(
        hits_t, [1] * 3000, hits_c, [1] * 3000, resamples=4000, seed=1
    )
    k_low, k_high = katz_interval(300, 3000, 200, 3000)
    assert low == pytest.approx(k_low, abs=0.05)
    assert high == pytest.approx(k_high, abs=0.07)


def test_cluster_bootstrap_is_seeded_and_brackets_the_lift() -> None:
    rng = np.random.default_rng(0)
    hits_t, hits_c = rng.binomial(4, 0.08, 400), rng.binomial(4, 0.05, 400)
    sends = [4] * 400
    a = cluster_bootstrap_interval(hits_t, sends, hits_c, sends, resamples=500, seed=3)
    assert a == cluster_bootstrap_interval(hits_t, sends, hits_c, sends, resamples=500, seed=3)
    assert a != cluster_bootstrap_interval(hits_t, sends, hits_c, sends, resamples=500, seed=4)
    lift = relative_lift(hits_t.sum(), 1600, hits_c.sum(), 1600)
    assert a[0] < lift < a[1]


def test_cluster_bootstrap_upper_bound_is_unbounded_when_control_hits_are_rare() -> None:
    """3 control conversions among 300 customers: about 5% of resamples have none, so the
    lift's 97.5th percentile is +inf, not a percentile of the resamples that had some."""
    sends = [4] * 300
    hits_t, hits_c = [1] * 13 + [0] * 287, [1] * 3 + [0] * 297
    low, high = cluster_bootstrap_interval(hits_t, sends, hits_c, sends, resamples=2000, seed=0)
    assert math.isfinite(low) and high == math.inf
    # plenty of control hits: finite both ways
    hits_c = [1] * 40 + [0] * 260
    low, high = cluster_bootstrap_interval(hits_t, sends, hits_c, sends, resamples=2000, seed=0)
    assert math.isfinite(low) and math.isfinite(high)


def test_a_case_study_needs_messages_after_its_warm_up() -> None:
    with pytest.raises(ValueError, match="warmup"):
        CaseStudyParams(events=400)  # the default warm-up is 500
    assert CaseStudyParams(events=501).warmup == 500


def test_cluster_bootstrap_widens_when_customers_differ() -> None:
    """Same totals; all of a customer's emails respond alike: wider than independent emails."""
    sends = [4] * 500
    spread_t, spread_c = [1] * 100 + [0] * 400, [1] * 60 + [0] * 440
    lumped_t, lumped_c = [4] * 25 + [0] * 475, [4] * 15 + [0] * 485
    s = cluster_bootstrap_interval(spread_t, sends, spread_c, sends, resamples=2000, seed=0)
    c = cluster_bootstrap_interval(lumped_t, sends, lumped_c, sends, resamples=2000, seed=0)
    assert c[1] - c[0] > 1.4 * (s[1] - s[0])


def test_cluster_bootstrap_edge_cases() -> None:
    same = cluster_bootstrap_interval([1] * 10, [2] * 10, [1] * 10, [2] * 10, resamples=50)
    assert same == (0.0, 0.0)
    assert all(math.isnan(v) for v in cluster_bootstrap_interval([], [], [1], [1]))
    no_control_hits = cluster_bootstrap_interval([1, 0], [1, 1], [0, 0], [1, 1], resamples=20)
    assert all(math.isnan(v) for v in no_control_hits)


def test_split_arms_is_balanced_deterministic_and_order_free() -> None:
    ids = [f"cus_{i}" for i in range(101)]
    arms = split_arms(ids, seed=7)
    assert arms == split_arms(reversed(ids), seed=7)
    assert arms != split_arms(ids, seed=8)
    counts = pd.Series(arms).value_counts()
    assert set(counts.index) == {"control", "treatment"}
    assert abs(counts["control"] - counts["treatment"]) <= 1


def test_next_utc_hour() -> None:
    assert next_utc_hour(T0, 10) == T0 + 10 * HOUR_MS
    assert next_utc_hour(T0 + 10 * HOUR_MS, 10) == T0 + 10 * HOUR_MS
    assert next_utc_hour(T0 + 10 * HOUR_MS + 1, 10) == T0 + DAY_MS + 10 * HOUR_MS
    assert next_utc_hour(T0 + 23 * HOUR_MS, 0) == T0 + DAY_MS


def test_replay_offsets_keep_the_mean_rate_and_compress_time() -> None:
    # 2 messages in the first hour, 8 in the second: the second hour goes 4x faster
    delivered = [T0 + i * HOUR_MS // 2 for i in range(2)] + [
        T0 + HOUR_MS + i * HOUR_MS // 8 for i in range(8)
    ]
    offsets = replay_offsets_s(delivered, rate=5.0)
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets)
    span = delivered[-1] - delivered[0]
    assert offsets[-1] == pytest.approx(len(delivered) / 5.0)
    assert offsets[1] - offsets[0] == pytest.approx(4 * (offsets[3] - offsets[2]))
    assert offsets[2] == pytest.approx(HOUR_MS / span * 2.0)
    assert replay_offsets_s(delivered, rate=0) == [0.0] * 10
    assert replay_offsets_s([T0, T0 - 5, T0 + 10], rate=3.0)[1] == 0.0  # never backwards
    assert replay_offsets_s([], rate=1.0) == []


def test_peak_hours_are_the_busiest_utc_hours() -> None:
    ts = [T0 + 19 * HOUR_MS] * 5 + [T0 + DAY_MS + 20 * HOUR_MS] * 4 + [T0 + 3 * HOUR_MS] * 4
    ts += [T0 + 8 * HOUR_MS]
    assert peak_hours(ts, 2) == (3, 19)  # 20 and 3 tie at 4: the earlier hour wins
    assert peak_hours(ts, 3) == (3, 19, 20)
    assert peak_hours([], 2) == (0, 1)


def test_latency_by_period() -> None:
    events = pd.DataFrame(
        {
            "event_ts_ms": [T0 + 19 * HOUR_MS, T0 + 19 * HOUR_MS + 5, T0 + 2 * HOUR_MS],
            "ingested_ms": [1000, 2000, 3000],
            "stored_ms": [1100, 2300, 3050],
        }
    )
    table = latency_by_period(events, (19,), rate=100.0).set_index("period")
    assert table.loc["peak", "count"] == 2
    assert table.loc["off-peak", "count"] == 1
    assert table.loc["off-peak", "p50"] == 50.0
    assert table.loc["peak", "p50"] == 200.0
    # 2/3 of the events in 1/24 of the hours; 1/3 in 23/24
    assert table.loc["peak", "offered_rate"] == pytest.approx(100 * (2 / 3) * 24, abs=0.1)
    assert table.loc["off-peak", "offered_rate"] == pytest.approx(100 * (1 / 3) * 24 / 23, abs=0.1)
    assert latency_by_period(events, (19,))["offered_rate"].isna().all()


def _per_customer() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d"],
            "arm": ["control", "control", "treatment", "treatment"],
            "sent": [4, 4, 4, 4],
            "opens": [1, 2, 2, 4],
            "clicks": [1, 0, 1, 2],
            "conversions": [0, 0, 1, 0],
            "in_active_hour": [0, 1, 4, 3],
            "match": [1.0, 1.2, 3.0, 3.2],
        }
    )


def test_arm_and_lift_tables_by_hand() -> None:
    arms = arm_table(_per_customer()).set_index("arm")
    assert arms.loc["control", "sent"] == 8
    assert arms.loc["control", "ctr"] == pytest.approx(1 / 8)
    assert arms.loc["treatment", "open_rate"] == pytest.approx(6 / 8)
    assert arms.loc["treatment", "in_active_hour_share"] == pytest.approx(7 / 8)
    assert arms.loc["control", "mean_match"] == pytest.approx(2.2 / 8)
    lifts = lift_table(_per_customer(), resamples=100, seed=0).set_index("metric")
    assert lifts.loc["ctr", "lift"] == pytest.approx(2.0)
    assert lifts.loc["open_rate", "lift"] == pytest.approx(1.0)
    assert math.isnan(lifts.loc["conversion_rate", "lift"])
    assert lifts.loc["ctr", "seed_claim"] == SEED_CLAIMS["ctr"] == 0.25
    assert lifts.loc["conversion_rate", "seed_claim"] == SEED_CLAIMS["conversion_rate"] == 0.15
    assert math.isnan(lifts.loc["open_rate", "seed_claim"])
    k_low, k_high = katz_interval(3, 8, 1, 8)
    assert lifts.loc["ctr", "katz_ci_low"] == pytest.approx(k_low)
    assert lifts.loc["ctr", "katz_ci_high"] == pytest.approx(k_high)


def test_results_json_has_every_figure_and_no_nan(tmp_path: Path) -> None:
    per_customer = _per_customer()
    lifts = lift_table(per_customer, resamples=100, seed=0)
    result = CaseStudyResult(
        params=CaseStudyParams(events=10, warmup=0),
        behaviour_model=behaviour_model.__doc__ or "",
        pipeline={"events_stored": 3},
        peak_hours_utc=(19,),
        replay_seconds_per_day=math.nan,
        latency=pd.DataFrame({"period": ["peak"], "count": [2], "p50": [200.0]}),
        arms=arm_table(per_customer),
        lifts=lifts,
        sensitivity=pd.DataFrame({"hour_sensitivity": [0.0], "ctr_lift": [math.nan]}),
        per_customer=per_customer,
    )
    path = result.write_results(tmp_path / "sub" / "out.json")
    data = orjson.loads(path.read_bytes())
    assert "P(open)" in data["behaviour_model"]
    assert data["seed_claims"] == {"label": SEED_CLAIMS_LABEL, "lifts": SEED_CLAIMS}
    by_metric = {row["metric"]: row for row in data["ab_test"]["lifts"]}
    assert by_metric["ctr"]["lift"] == pytest.approx(2.0)
    assert by_metric["conversion_rate"]["lift"] is None
    assert data["sensitivity"][0]["ctr_lift"] is None
    assert "bootstrap" in data["ci_method"]
    assert data["latency"]["peak_hours_utc"] == [19]


def test_plan_and_answer_emails_on_replayed_traffic() -> None:
    catalog = load_catalog()
    end = datetime(2026, 3, 2, tzinfo=UTC)
    sim = simulate(SimulationConfig(3000, end=end, seed=5, days=7), catalog)
    done = replay([(m.key, m.value) for m in sim.messages], catalog=catalog, now_ms=T0)
    events = sorted(done.events_by_id.values(), key=lambda e: e["timestamp_ms"])
    signals = signals_from_events(events)
    profiles = {
        cid: profile_from_dict(p)
        for cid, p in done.profiles.items()
        if not p["is_anonymous"] and not p.get("merged_into")
    }
    truth = {c.customer_id: c for c in sim.customers if c.customer_id in profiles}
    arms = split_arms(truth, seed=1)
    planned = plan_emails(
        profiles,
        arms,
        catalog,
        signals,
        at_ms=T0,
        k=4,
        control_hour_utc=10,
        sends_per_customer=2,
    )
    assert len(planned) == 2 * len(truth)
    control = [e for e in planned if e.arm == "control"]
    treatment = [e for e in planned if e.arm == "treatment"]
    generic = tuple(r.product_id for r in popular_baseline(catalog, signals=signals, k=4))
    assert {e.product_ids for e in control} == {generic}
    assert {e.send_at_ms for e in control if e.week == 0} == {T0 + 10 * HOUR_MS}
    assert {e.send_at_ms for e in control if e.week == 1} == {T0 + 10 * HOUR_MS + WEEK_MS}
    assert len({e.product_ids for e in treatment}) > 1, "treatment is personalized"
    assert all(len(e.product_ids) == 4 and e.send_at_ms > T0 for e in treatment)
    first = next(e for e in treatment if e.week == 0)
    tz = profiles[first.customer_id].timezone or "UTC"
    assert hour_of_week_bin(first.send_at_ms, tz) == hour_of_week_bin(
        first.send_at_ms + WEEK_MS, tz
    )

    params = BehaviourParams()
    answered = answer_emails(planned, truth, catalog, params, seed=3)
    assert answered.equals(answer_emails(planned, truth, catalog, params, seed=3))
    assert (answered["sent"] == 2).all()
    assert (answered["opens"] >= answered["clicks"]).all()
    assert (answered["clicks"] >= answered["conversions"]).all()
    arms_table = arm_table(answered).set_index("arm")
    assert arms_table.loc["treatment", "mean_match"] > arms_table.loc["control", "mean_match"]

    grid = sensitivity_table(
        planned, truth, catalog, params, (0.0, 1.0), (0.0,), seed=3, resamples=50
    )
    assert list(grid["hour_sensitivity"]) == [0.0, 1.0]
    assert {"ctr_lift", "ctr_ci_low", "conversion_rate_ci_high"} <= set(grid.columns)
