"""The notebook helpers: tables and figures computed from warehouse-shaped DataFrames."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
import pandas as pd
import plotly.graph_objects as go
import pytest

from pipeline import analysis
from pipeline.catalog import load_catalog
from pipeline.experiments import LoadPhase, phases_frame
from pipeline.scoring import ScoringParams
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.testing import make_event, replay


def events_frame(rows: list[tuple[str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["message_id", "ingested_ms", "stored_ms"])


def profiles_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": ["c1", "c2", "anon:d1", "anon:d2"],
            "is_anonymous": [0, 0, 1, 1],
            "merged_into": [None, None, None, "c1"],
            "cis": [40.0, 75.0, 90.0, 99.0],
            "intent_stage": ["cart", "browsing", "browsing", "browsing"],
        }
    )


def test_summary_table_pairs_measured_figures_with_their_truth() -> None:
    summary = {
        "events_valid": 10,
        "events_valid_truth": 10,
        "duplicates_dropped": 2,
        "duplicates_truth": 2,
        "produce_s": 0.5,
        "latency_ms": {"p50": 1.0},
    }
    table = analysis.summary_table(summary).set_index("figure")
    assert list(table.index) == ["events_valid", "duplicates_dropped", "produce_s"]
    assert table.loc["duplicates_dropped", "ground_truth"] == 2
    assert table.loc["events_valid", "measured"] == 10
    assert table.loc["produce_s", "ground_truth"] is None


def test_latency_percentiles_overall_and_per_group() -> None:
    events = events_frame([(f"m{i}", 1000, 1000 + i) for i in range(1, 101)])
    assert list(analysis.latency_ms(events)[:3]) == [1.0, 2.0, 3.0]
    overall = analysis.latency_percentiles(events).iloc[0]
    assert overall["count"] == 100
    assert overall["p50"] == pytest.approx(50.5)
    assert overall["p99"] == pytest.approx(99.0)
    grouped = analysis.latency_percentiles(events.assign(g=[i % 2 for i in range(100)]), by="g")
    assert list(grouped["g"]) == [0, 1]
    assert list(grouped["count"]) == [50, 50]


def test_throughput_over_time_counts_per_bin_and_fills_gaps() -> None:
    events = events_frame([("a", 0, 100), ("b", 0, 200), ("c", 50, 2500), ("d", 60, 2900)])
    per_s = analysis.throughput_over_time(events)
    assert list(per_s["second"]) == [0.0, 1.0, 2.0]
    assert list(per_s["events_per_s"]) == [2.0, 0.0, 2.0]
    halves = analysis.throughput_over_time(events, bin_s=0.5)
    assert halves["events_per_s"].sum() * 0.5 == 4
    assert analysis.throughput_over_time(events.iloc[:0]).empty


def test_intent_stage_counts_and_top_customer_ignore_merged_profiles() -> None:
    profiles = profiles_frame()
    counts = dict(analysis.intent_stage_counts(profiles).itertuples(index=False))
    assert counts == {"browsing": 2, "cart": 1}
    assert analysis.top_customer(profiles) == "c2"
    only_anonymous = profiles[profiles["is_anonymous"] == 1]
    assert analysis.top_customer(only_anonymous) == "anon:d1"
    with pytest.raises(ValueError, match="no live profiles"):
        analysis.top_customer(profiles.iloc[:0])


def test_category_affinity_is_shares_largest_first() -> None:
    frame = analysis.category_affinity({"category_affinity": {"shoes": 1.0, "coats": 3.0}})
    assert list(frame["category"]) == ["coats", "shoes"]
    assert list(frame["share"]) == [0.75, 0.25]
    assert analysis.category_affinity({}).empty


def test_true_top_categories_and_hit_rate_with_interval() -> None:
    truth = analysis.true_top_categories(
        pd.DataFrame(
            {
                "customer_id": ["c1", "c2", "c3"],
                "category_prefs": [{"coats": 0.7, "shoes": 0.3}, {"jeans": 1.0}, {}],
            }
        )
    )
    assert list(truth["true_category"][:2]) == ["coats", "jeans"]
    assert pd.isna(truth["true_category"][2])
    predicted = pd.DataFrame(
        {
            "customer_id": ["c1", "c2", "c4"],
            "top_category": ["coats", "shoes", "coats"],
            "event_count": [10, 10, 10],
        }
    )
    result = analysis.top1_hit_rate(predicted, truth)
    assert (result["customers"], result["hits"], result["hit_rate"]) == (2, 1, 0.5)
    assert 0 < result["ci_low"] < 0.5 < result["ci_high"] < 1
    few = analysis.top1_hit_rate(predicted, truth, min_events=11)
    assert few["customers"] == 0
    assert math.isnan(few["hit_rate"])


def test_wilson_interval_matches_the_textbook_value() -> None:
    low, high = analysis.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert analysis.wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in analysis.wilson_interval(0, 0))


def test_scoring_grid_overrides_only_what_it_names() -> None:
    base = ScoringParams()
    grid = analysis.scoring_grid(base, [7, 30.0], {"default": {}, "heavy": {"Order Completed": 20}})
    assert set(grid) == {(7.0, "default"), (7.0, "heavy"), (30.0, "default"), (30.0, "heavy")}
    heavy = grid[(7.0, "heavy")]
    assert heavy.affinity_half_life_days == 7.0
    assert heavy.event_weights["Order Completed"] == 20
    assert heavy.event_weights["Product Viewed"] == base.event_weights["Product Viewed"]
    assert grid[(30.0, "default")].event_weights == base.event_weights


def _stored_events(result_events: list[dict[str, object]]) -> pd.DataFrame:
    """Replay output shaped like the warehouse's events table (merged copies win)."""
    frame = pd.DataFrame(
        {
            "message_id": [e["message_id"] for e in result_events],
            "customer_id": [e["customer_id"] for e in result_events],
            "event_ts_ms": [e["timestamp_ms"] for e in result_events],
            "payload": [orjson.dumps(e).decode() for e in result_events],
        }
    )
    return frame.drop_duplicates("message_id", keep="last")


def test_rescore_with_the_same_parameters_reproduces_the_processor() -> None:
    catalog = load_catalog(Settings().catalog_path)
    end = datetime(2026, 11, 1, tzinfo=UTC)
    sim = simulate(SimulationConfig(events=600, seed=3, end=end, days=7), catalog)
    result = replay(
        [(m.key, m.value) for m in sim.messages],
        catalog=catalog,
        now_ms=int(end.timestamp() * 1000),
    )
    rescored = analysis.rescore(_stored_events(result.events), ScoringParams())
    live = {cid: p for cid, p in result.profiles.items() if p["merged_into"] is None}
    assert set(rescored) == set(live)
    for cid, profile in live.items():
        assert rescored[cid]["event_count"] == profile["event_count"]
        assert rescored[cid]["cis"] == pytest.approx(profile["cis"], rel=1e-9)

    def tops(profiles: dict[str, dict[str, object]]) -> dict[str, object]:
        frame = analysis.top_categories(profiles).fillna("-")
        return dict(zip(frame["customer_id"], frame["top_category"], strict=True))

    assert tops(rescored) == tops(live)


def test_rescore_with_other_parameters_changes_affinities() -> None:
    events = [
        make_event("Product Viewed", ts=0, category="coats", customer_id="c1").to_dict(),
        make_event("Product Viewed", ts=0, category="coats", customer_id="c1").to_dict(),
        make_event(
            "Product Viewed", ts=10 * 86_400_000, category="shoes", customer_id="c1"
        ).to_dict(),
    ]
    stored = _stored_events(events)
    long_memory = analysis.rescore(stored, ScoringParams(affinity_half_life_days=365))
    short_memory = analysis.rescore(stored, ScoringParams(affinity_half_life_days=1))
    assert analysis.top_categories(long_memory)["top_category"][0] == "coats"
    assert analysis.top_categories(short_memory)["top_category"][0] == "shoes"


def test_hit_rate_table_has_one_row_per_setting() -> None:
    truth = pd.DataFrame({"customer_id": ["c1"], "true_category": ["coats"]})
    profiles = {
        (7.0, "default"): {"c1": {"category_affinity": {"coats": 1.0}, "event_count": 3}},
        (30.0, "default"): {"c1": {"category_affinity": {"shoes": 1.0}, "event_count": 3}},
    }
    table = analysis.hit_rate_table(profiles, truth)
    assert list(table["affinity_half_life_days"]) == [7.0, 30.0]
    assert list(table["hit_rate"]) == [1.0, 0.0]
    assert isinstance(analysis.hit_rate_figure(table), go.Figure)


def test_load_phase_stats_per_offered_load() -> None:
    phases = phases_frame(
        [
            LoadPhase(0, 100.0, 2, frozenset({"a", "b"}), 0.02),
            LoadPhase(1, 200.0, 2, frozenset({"c", "d"}), 0.01),
        ]
    )
    assert len(phases) == 4
    events = events_frame(
        [("a", 0, 500), ("b", 100, 1500), ("c", 2000, 2100), ("d", 2000, 2100), ("x", 0, 1)]
    )
    stats = analysis.load_phase_stats(events, phases).set_index("phase")
    assert list(stats["offered_rate"]) == [100.0, 200.0]
    assert list(stats["events"]) == [2, 2]
    # from the first arrival to the last write: the first write's events took time to arrive
    assert stats.loc[0, "achieved_eps"] == pytest.approx(2 / 1.5, abs=0.05)
    assert stats.loc[1, "achieved_eps"] == pytest.approx(2 / 0.1)
    assert stats.loc[1, "p50"] == pytest.approx(100.0)
    assert isinstance(analysis.load_figure(stats.reset_index()), go.Figure)


def test_figures_are_plotly_figures_with_data() -> None:
    events = events_frame([("a", 0, 500), ("b", 100, 1500)])
    profiles = profiles_frame()
    affinity = analysis.category_affinity({"category_affinity": {"coats": 1.0}})
    for fig in (
        analysis.throughput_figure(analysis.throughput_over_time(events)),
        analysis.latency_figure(events),
        analysis.score_figure(profiles),
        analysis.affinity_figure(affinity, "c1"),
    ):
        assert isinstance(fig, go.Figure)
        assert fig.data


def test_step_latency_by_phase_splits_the_path_per_offered_load() -> None:
    from pipeline.analysis import step_latency_by_phase, step_latency_figure

    rows, phases = [], []
    for phase, rate, hop in ((0, 500.0, 100), (1, 2000.0, 300)):
        for i in range(5):
            mid = f"m{phase}-{i}"
            rows.append(
                {
                    "message_id": mid,
                    "collected_ms": None,
                    "ingested_ms": 1_000,
                    "parsed_ms": 1_010 + i,
                    "stitched_ms": 1_010 + i,
                    "scored_ms": 1_010 + i + hop,
                    "stored_ms": 1_015 + i + hop,
                }
            )
            phases.append({"message_id": mid, "phase": phase, "offered_rate": rate})
    steps = step_latency_by_phase(pd.DataFrame(rows), pd.DataFrame(phases))
    p50 = steps.set_index(["offered_rate", "step"])["p50_ms"]
    assert p50[(500.0, "score + segments")] == 100
    assert p50[(2000.0, "score + segments")] == 300
    assert p50[(500.0, "validate + enrich")] == 12
    assert p50[(2000.0, "store")] == 5
    assert "collect" not in set(steps["step"])  # never recorded: no row, not a zero
    assert len(step_latency_figure(steps).data) == steps["step"].nunique()


def _lab(
    rates: dict[tuple[float, str], float], customers: int = 600, seed: int = 5
) -> tuple[dict[tuple[float, str], dict[str, dict[str, object]]], pd.DataFrame]:
    """Settings whose top category is each customer's true one ("A") with the given rates."""
    import random

    rnd = random.Random(seed)
    ids = [f"c{i}" for i in range(customers)]
    profiles = {
        key: {
            cid: {"category_affinity": {"A" if rnd.random() < rate else "B": 1.0}, "event_count": 9}
            for cid in ids
        }
        for key, rate in rates.items()
    }
    return profiles, pd.DataFrame({"customer_id": ids, "true_category": ["A"] * customers})


def test_mcnemar_counts_only_the_customers_the_settings_disagree_on() -> None:
    assert analysis.mcnemar_p(0, 0) == 1.0
    assert analysis.mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert analysis.mcnemar_p(3, 7) == analysis.mcnemar_p(7, 3) == pytest.approx(0.34375)


def test_the_best_of_equal_settings_shows_no_gain_where_it_was_not_chosen() -> None:
    rates = {(float(h), "default"): 0.5 for h in range(15)}
    profiles, truth = _lab(rates)
    result = analysis.holdout_comparison(profiles, truth, baseline=(0.0, "default"))
    # picked as the best of 15 look-alikes, it looks better where it was picked...
    assert result.selection_rate > 0.54
    # ...and not on the other half
    assert result.ci_low < 0 < result.ci_high and result.p_value > 0.05
    assert result.customers == 300


def test_a_truly_better_setting_is_chosen_and_its_gain_measured() -> None:
    profiles, truth = _lab({(30.0, "default"): 0.5, (7.0, "views_light"): 0.8})
    result = analysis.holdout_comparison(profiles, truth, baseline=(30.0, "default"))
    assert result.chosen == (7.0, "views_light")
    assert 0.2 < result.difference < 0.4 and result.ci_low > 0.15 and result.p_value < 1e-6
    with pytest.raises(ValueError, match="baseline"):
        analysis.holdout_comparison(profiles, truth, baseline=(1.0, "none"))
