"""Pure helpers that turn warehouse tables, replays and run summaries into DataFrames and figures.

Notebooks and scheduled reports call these, so every number they show is computed by tested
package code rather than by cells that nobody tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pipeline import lineage
from pipeline.events import CleanEvent
from pipeline.scoring import (
    Profile,
    ScoringParams,
    affinity_shares,
    apply_event,
    new_profile,
    profile_to_dict,
)
from pipeline.simulate import TrueCustomer

PERCENTILES = (50, 95, 99)
"""Latency percentiles reported everywhere (p50, p95, p99)."""

Z_95 = 1.959963984540054


def summary_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """A run summary (``runner.summarize``) as rows ``figure, measured, ground_truth``.

    ``x_truth`` pairs with ``x`` or ``x_<verb>`` (``duplicates_truth`` with
    ``duplicates_dropped``); nested figures (latency, reasons) get tables of their own.
    """
    rows = []
    for key, value in summary.items():
        if key.endswith("_truth") or isinstance(value, Mapping):
            continue
        truth = summary.get(f"{key}_truth", summary.get(f"{key.rsplit('_', 1)[0]}_truth"))
        rows.append({"figure": key, "measured": value, "ground_truth": truth})
    return pd.DataFrame(rows, columns=["figure", "measured", "ground_truth"], dtype=object)


def latency_ms(events: pd.DataFrame) -> pd.Series:
    """End-to-end latency per stored event: ``stored_ms - ingested_ms`` (broker to warehouse)."""
    return (events["stored_ms"] - events["ingested_ms"]).astype(float).rename("latency_ms")


def latency_percentiles(events: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """p50/p95/p99 latency (ms) and event count, overall or per value of column ``by``."""
    frame = events.assign(latency_ms=latency_ms(events))
    groups: Iterable[tuple[Any, pd.DataFrame]] = (
        frame.groupby(by, sort=True) if by is not None else [("all", frame)]
    )
    rows = []
    for key, part in groups:
        values = part["latency_ms"].to_numpy()
        row: dict[str, Any] = {by or "events": key, "count": len(values)}
        pcts = np.percentile(values, PERCENTILES) if len(values) else [math.nan] * 3
        row.update({f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, pcts, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def throughput_over_time(events: pd.DataFrame, bin_s: float = 1.0) -> pd.DataFrame:
    """Events that became readable per second, in bins of ``bin_s`` since the first ingest.

    Empty bins are 0. Sinks write at checkpoints, so bins narrower than the commit interval
    alternate between bursts and gaps.
    """
    if events.empty:
        return pd.DataFrame(
            {"second": pd.Series(dtype=float), "events_per_s": pd.Series(dtype=float)}
        )
    start = int(events["ingested_ms"].min())
    bins = ((events["stored_ms"] - start) // (bin_s * 1000)).astype(int).clip(lower=0)
    counts = bins.value_counts().sort_index().reindex(range(int(bins.max()) + 1), fill_value=0)
    return pd.DataFrame(
        {
            "second": counts.index.to_numpy(dtype=float) * bin_s,
            "events_per_s": counts.to_numpy(dtype=float) / bin_s,
        }
    )


def intent_stage_counts(profiles: pd.DataFrame) -> pd.DataFrame:
    """Live (not merged) profiles per intent stage: the segment sizes."""
    live = profiles[profiles["merged_into"].isna()]
    counts = live["intent_stage"].value_counts()
    return pd.DataFrame({"intent_stage": counts.index, "profiles": counts.to_numpy(dtype=int)})


def top_customer(profiles: pd.DataFrame) -> str:
    """The live known customer with the highest CIS (any live profile if none is known)."""
    live = profiles[profiles["merged_into"].isna()]
    known = live[live["is_anonymous"] == 0]
    pool = known if not known.empty else live
    if pool.empty:
        raise ValueError("no live profiles")
    return str(
        pool.sort_values(["cis", "customer_id"], ascending=[False, True]).iloc[0]["customer_id"]
    )


def category_affinity(profile: Mapping[str, Any]) -> pd.DataFrame:
    """One profile's category affinities as shares (largest first), via ``affinity_shares``."""
    shares = affinity_shares(dict(profile.get("category_affinity") or {}))
    return pd.DataFrame({"category": list(shares), "share": list(shares.values())})


def rescore(events: pd.DataFrame, params: ScoringParams) -> dict[str, dict[str, Any]]:
    """Fold recorded clean events (the warehouse ``payload`` column) into fresh profiles.

    Uses the processor's own ``apply_event`` with other parameters; events are grouped by
    their stored ``customer_id`` (merged anonymous history included) in event-time order.
    """
    profiles: dict[str, Profile] = {}
    ordered = events.sort_values(["event_ts_ms", "message_id"], kind="stable")
    for customer_id, payload in zip(ordered["customer_id"], ordered["payload"], strict=True):
        wire = orjson.loads(payload)
        wire["customer_id"] = customer_id
        profile = profiles.get(customer_id)
        if profile is None:
            profile = new_profile(customer_id, is_anonymous=customer_id.startswith("anon:"))
            profiles[customer_id] = profile
        event = CleanEvent.from_dict(wire)
        apply_event(profile, event, params, processed_ms=event.ingested_ms)
    return {cid: profile_to_dict(p) for cid, p in profiles.items()}


def top_categories(profiles: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Each live profile's strongest category affinity, with its event count."""
    rows = []
    for cid, p in profiles.items():
        if p.get("merged_into"):
            continue
        shares = affinity_shares(dict(p.get("category_affinity") or {}))
        rows.append(
            {
                "customer_id": cid,
                "top_category": next(iter(shares), None),
                "event_count": int(p.get("event_count", 0)),
            }
        )
    return pd.DataFrame(rows, columns=["customer_id", "top_category", "event_count"])


def customers_frame(customers: Iterable[TrueCustomer]) -> pd.DataFrame:
    """The simulator's hidden truth per visitor: id, known or not, and category preferences."""
    rows = [
        {
            "customer_id": c.customer_id,
            "is_known": c.is_known,
            "category_prefs": dict(c.category_prefs),
        }
        for c in customers
    ]
    return pd.DataFrame(rows, columns=["customer_id", "is_known", "category_prefs"])


def true_top_categories(customers: pd.DataFrame) -> pd.DataFrame:
    """Each visitor's truly preferred category from a ``category_prefs`` column of dicts.

    Works on :func:`customers_frame` and on ``ground_truth/customers.jsonl`` read by pandas.
    """
    tops = [
        min(prefs, key=lambda c: (-prefs[c], c)) if prefs else None
        for prefs in customers["category_prefs"]
    ]
    return pd.DataFrame({"customer_id": customers["customer_id"].to_numpy(), "true_category": tops})


def wilson_interval(hits: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (nan, nan) when ``n`` is 0."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def top1_hit_rate(
    predicted: pd.DataFrame, truth: pd.DataFrame, *, min_events: int = 1
) -> dict[str, float]:
    """Share of customers (with at least ``min_events``) whose top affinity is their true favourite.

    Returns ``customers``, ``hits``, ``hit_rate`` and its 95% Wilson interval.
    """
    joined = predicted[predicted["event_count"] >= min_events].merge(truth, on="customer_id")
    joined = joined[joined["top_category"].notna()]
    n = len(joined)
    hits = int((joined["top_category"] == joined["true_category"]).sum())
    low, high = wilson_interval(hits, n)
    return {
        "customers": n,
        "hits": hits,
        "hit_rate": hits / n if n else math.nan,
        "ci_low": low,
        "ci_high": high,
    }


def scoring_grid(
    base: ScoringParams,
    affinity_half_lives: Sequence[float],
    weight_variants: Mapping[str, Mapping[str, float]],
) -> dict[tuple[float, str], ScoringParams]:
    """Every (affinity half-life, event-weight variant) combination applied on top of ``base``.

    A variant maps event names to new weights; the other weights keep their base values.
    """
    grid: dict[tuple[float, str], ScoringParams] = {}
    for half_life in affinity_half_lives:
        for name, overrides in weight_variants.items():
            weights = {**base.event_weights, **overrides}
            grid[(float(half_life), name)] = base.model_copy(
                update={"affinity_half_life_days": float(half_life), "event_weights": weights}
            )
    return grid


def hit_rate_table(
    profiles_by_setting: Mapping[tuple[float, str], Mapping[str, Mapping[str, Any]]],
    truth: pd.DataFrame,
    *,
    min_events: int = 1,
) -> pd.DataFrame:
    """Top-1 hit rate per scoring setting, one row per (half-life, weights) with its interval."""
    rows = [
        {
            "affinity_half_life_days": half_life,
            "weights": variant,
            **top1_hit_rate(top_categories(profiles), truth, min_events=min_events),
        }
        for (half_life, variant), profiles in profiles_by_setting.items()
    ]
    return pd.DataFrame(rows)


@dataclass(frozen=True, slots=True)
class HoldoutComparison:
    """A setting chosen as the best on one half of the customers, against a baseline setting
    on the other half, customer by customer (the same customers under both settings)."""

    chosen: tuple[float, str]
    baseline: tuple[float, str]
    selection_rate: float  # the chosen setting's hit rate where it was chosen (optimistic)
    customers: int  # in the evaluation half
    chosen_rate: float
    baseline_rate: float
    difference: float  # chosen - baseline, on the evaluation half
    ci_low: float  # paired bootstrap 95% interval of the difference
    ci_high: float
    p_value: float  # exact McNemar test (two-sided) of the discordant customers


def _hits(
    profiles: Mapping[str, Mapping[str, Any]], truth: pd.DataFrame, customers: pd.Index
) -> np.ndarray:
    top = top_categories(profiles).set_index("customer_id")["top_category"]
    joined = truth.set_index("customer_id")["true_category"].reindex(customers)
    return (top.reindex(customers) == joined).to_numpy(dtype=bool)  # no top category: a miss


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: of the ``only_a + only_b`` customers the two settings
    disagree on, how unlikely a split this uneven is when neither setting is better."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def holdout_comparison(
    profiles_by_setting: Mapping[tuple[float, str], Mapping[str, Mapping[str, Any]]],
    truth: pd.DataFrame,
    *,
    baseline: tuple[float, str],
    min_events: int = 1,
    seed: int = 0,
    resamples: int = 2_000,
) -> HoldoutComparison:
    """Pick the best setting by top-1 hit rate on a random half of the customers and compare it
    with ``baseline`` on the other half: the best of a grid measured where it was picked is
    biased upwards (with 15 settings whose true rates are equal, the top one still looks
    better), the other half is not. Customers: those with ``min_events`` events and a true
    favourite; one without a top category under a setting counts as a miss there.
    """
    if baseline not in profiles_by_setting:
        raise ValueError(f"baseline {baseline!r} is not one of the settings")
    counts = top_categories(next(iter(profiles_by_setting.values())))
    eligible = set(counts.loc[counts["event_count"] >= min_events, "customer_id"])
    known = truth[truth["true_category"].notna() & truth["customer_id"].isin(eligible)]
    customers = pd.Index(sorted(known["customer_id"]))
    if len(customers) < 2:
        raise ValueError("fewer than two customers to split")
    hits = {key: _hits(p, truth, customers) for key, p in profiles_by_setting.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(customers))
    selection, evaluation = order[: len(order) // 2], order[len(order) // 2 :]
    chosen = max(hits, key=lambda key: (hits[key][selection].mean(), key == baseline))
    a, b = hits[chosen][evaluation], hits[baseline][evaluation]
    paired = a.astype(float) - b.astype(float)
    draws = rng.integers(0, len(paired), size=(resamples, len(paired)))
    diffs = paired[draws].mean(axis=1)
    return HoldoutComparison(
        chosen=chosen,
        baseline=baseline,
        selection_rate=float(hits[chosen][selection].mean()),
        customers=len(evaluation),
        chosen_rate=float(a.mean()),
        baseline_rate=float(b.mean()),
        difference=float(paired.mean()),
        ci_low=float(np.percentile(diffs, 2.5)),
        ci_high=float(np.percentile(diffs, 97.5)),
        p_value=mcnemar_p(int((a & ~b).sum()), int((~a & b).sum())),
    )


def load_phase_stats(events: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """Throughput and latency percentiles per offered load.

    ``phases`` maps ``message_id`` to ``phase`` and ``offered_rate`` (msg/s); achieved
    throughput is clean events stored per second from the phase's first arrival at the broker
    to its last warehouse write (NaN without a span). From the first write instead, the
    events of that write counted without the time they took to arrive: k/(k-1) too high
    for k writes (+20% at 3 s and 0.5 s commits).
    """
    joined = events.merge(phases, on="message_id")
    rows = []
    for phase, part in joined.groupby("phase", sort=True):
        span_s = (part["stored_ms"].max() - part["ingested_ms"].min()) / 1000
        lat = latency_percentiles(part).iloc[0]
        rows.append(
            {
                "phase": phase,
                "offered_rate": float(part["offered_rate"].iloc[0]),
                "events": len(part),
                "achieved_eps": round(len(part) / span_s, 1) if span_s > 0 else math.nan,
                **{f"p{p}": float(lat[f"p{p}"]) for p in PERCENTILES},
            }
        )
    return pd.DataFrame(rows)


def step_latency_by_phase(events: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """Per offered load and lineage step, p50/p95 ms since the previous step (where time goes).

    ``events`` holds ``message_id`` and the lineage columns (:data:`pipeline.lineage.COLUMNS`);
    ``phases`` maps ``message_id`` to ``phase`` and ``offered_rate`` as for
    :func:`load_phase_stats`.
    """
    joined = events.merge(phases, on="message_id")
    parts = []
    for phase, part in joined.groupby("phase", sort=True):
        steps = lineage.step_latency(part, quantiles=(0.5, 0.95))
        steps.insert(0, "offered_rate", float(part["offered_rate"].iloc[0]))
        steps.insert(0, "phase", phase)
        parts.append(steps[steps["n"] > 0])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def step_latency_figure(steps: pd.DataFrame) -> go.Figure:
    """Stacked p50 per lineage step for each offered load (:func:`step_latency_by_phase`)."""
    fig = px.bar(
        steps.assign(load=steps["offered_rate"].map(lambda r: f"{r:,.0f} msg/s")),
        x="load",
        y="p50_ms",
        color="step",
        title="Where the time goes: p50 ms per step of the event path",
    )
    fig.update_layout(xaxis_title="offered load", yaxis_title="ms since the previous step")
    return fig


def throughput_figure(over_time: pd.DataFrame) -> go.Figure:
    """Bar chart of events stored per second over the run (:func:`throughput_over_time`)."""
    fig = px.bar(over_time, x="second", y="events_per_s", title="Throughput (events stored)")
    fig.update_layout(xaxis_title="seconds since first ingest", yaxis_title="events / s")
    return fig


def latency_figure(events: pd.DataFrame) -> go.Figure:
    """Histogram of end-to-end latency with p50/p95/p99 marked."""
    lat = latency_ms(events)
    fig = px.histogram(lat.to_frame(), x="latency_ms", nbins=60, title="End-to-end latency")
    if len(lat):
        for p, value in zip(PERCENTILES, np.percentile(lat, PERCENTILES), strict=True):
            fig.add_vline(x=float(value), line_dash="dash", annotation_text=f"p{p}")
    fig.update_layout(xaxis_title="stored_ms - ingested_ms (ms)", yaxis_title="events")
    return fig


def score_figure(profiles: pd.DataFrame) -> go.Figure:
    """Histogram of the Customer Interaction Score of live profiles, by intent stage."""
    live = profiles[profiles["merged_into"].isna()]
    fig = px.histogram(
        live, x="cis", color="intent_stage", nbins=40, title="Customer Interaction Score"
    )
    fig.update_layout(xaxis_title="CIS (0-100)", yaxis_title="profiles")
    return fig


def affinity_figure(affinity: pd.DataFrame, customer_id: str) -> go.Figure:
    """Bar chart of one customer's category affinity shares."""
    fig = px.bar(affinity, x="category", y="share", title=f"Category affinity of {customer_id}")
    fig.update_layout(yaxis_tickformat=".0%")
    return fig


def hit_rate_figure(table: pd.DataFrame) -> go.Figure:
    """Top-1 hit rate against affinity half-life, one line per weight variant, with 95% CIs."""
    frame = table.assign(
        err_plus=table["ci_high"] - table["hit_rate"],
        err_minus=table["hit_rate"] - table["ci_low"],
    )
    fig = px.line(
        frame,
        x="affinity_half_life_days",
        y="hit_rate",
        color="weights",
        markers=True,
        error_y="err_plus",
        error_y_minus="err_minus",
        log_x=True,
        title="Top-1 category hit rate vs hidden preferences",
    )
    fig.update_layout(xaxis_title="affinity half-life (days)", yaxis_tickformat=".0%")
    return fig


def load_figure(stats: pd.DataFrame) -> go.Figure:
    """Achieved throughput and latency percentiles against offered load, side by side."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Throughput", "End-to-end latency percentiles")
    )
    fig.add_trace(
        go.Scatter(x=stats["offered_rate"], y=stats["achieved_eps"], name="achieved events/s"),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=stats["offered_rate"],
            y=stats["offered_rate"],
            name="offered",
            line={"dash": "dot"},
        ),
        row=1,
        col=1,
    )
    for p in PERCENTILES:
        fig.add_trace(
            go.Scatter(
                x=stats["offered_rate"], y=stats[f"p{p}"], name=f"p{p} ms", mode="lines+markers"
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="offered load (msg/s)")
    fig.update_yaxes(title_text="events / s", row=1, col=1)
    fig.update_yaxes(title_text="ms", row=1, col=2)
    fig.update_layout(title="Pipeline under offered load")
    return fig
