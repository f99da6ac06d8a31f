"""The fashion-retail case study, measured: personalized email against a bestseller blast.

1. **Pipeline.** ``days`` of simulated traffic go through the real pipeline (embedded broker,
   processor, warehouse). Production replays the simulated delivery times compressed so the
   mean offered load is ``rate`` msg/s: the busy hours of the simulated day arrive faster, as
   they would in production. Latency (``stored_ms - ingested_ms``) is read from the warehouse
   for events whose event time falls in the ``peak_hours`` busiest UTC hours, and for the rest.
   One simulated day lasts ``replay_seconds_per_day`` of wall-clock time: when that is not
   much longer than the latency itself, peaks and troughs blur into one average load.
2. **A/B test.** Known customers with a profile are split by a seeded shuffle. *Control* gets
   the generic bestseller email (:func:`~pipeline.recommend.popular_baseline`, ``k`` products,
   the same for everyone) at ``control_hour_utc``; *treatment* gets :func:`~pipeline.recommend.
   recommend` at :func:`~pipeline.sendtime.best_send_time` (prior: all profiles). Each customer
   gets ``sends_per_customer`` weekly emails; :mod:`pipeline.simulate.behaviour` draws opens,
   clicks and conversions from the hidden truth.
3. **Statistics.** Per arm: rates per email sent. Lift is ``rate_t / rate_c - 1``. Its 95%
   interval is a **customer-level (cluster) percentile bootstrap**: customers are resampled
   with replacement within each arm, so the repeated emails of one customer are not counted
   as independent. The Katz log risk-ratio interval (which assumes independent emails) is
   reported beside it.
4. **Sensitivity.** The same emails are re-answered for every ``hour_sensitivity`` x
   ``preference_sensitivity`` of the behaviour model (common random numbers per email).

The seed's claims (+25% CTR, +15% conversions) are reference values from the project's brief,
labelled as such; they are not results of this run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from pipeline import analysis
from pipeline.catalog import Catalog
from pipeline.metrics import StreamMetrics
from pipeline.recommend import (
    RecommendationSignals,
    RecommendParams,
    popular_baseline,
    recommend,
    signals_from_events,
)
from pipeline.runner import (
    Run,
    pipeline_run,
    process_until_idle,
    produce_messages,
    summarize,
)
from pipeline.scoring import DAY_MS, HOUR_MS, Profile, profile_from_dict
from pipeline.sendtime import SendTimeParams, best_send_time, population_prior
from pipeline.settings import Settings
from pipeline.simulate import (
    Simulation,
    SimulationConfig,
    TrueCustomer,
    behaviour,
    end_of,
    simulate,
)
from pipeline.simulate.behaviour import BehaviourParams, respond

Arm = Literal["control", "treatment"]
ARMS: tuple[Arm, Arm] = ("control", "treatment")
METRICS: dict[str, str] = {
    "open_rate": "opens",
    "ctr": "clicks",
    "conversion_rate": "conversions",
}
"""Each reported rate and the count it divides by the emails sent."""

SEED_CLAIMS: dict[str, float] = {"ctr": 0.25, "conversion_rate": 0.15}
"""The seed brief's claimed relative lifts (+25% CTR, +15% conversions): reference values only."""
SEED_CLAIMS_LABEL = "seed's claim (not measured here)"

WEEK_MS = 7 * DAY_MS


def relative_lift(hits_t: float, n_t: float, hits_c: float, n_c: float) -> float:
    """``(hits_t / n_t) / (hits_c / n_c) - 1``; NaN when a rate is undefined or control's is 0."""
    if n_t <= 0 or n_c <= 0 or hits_c <= 0:
        return math.nan
    return (hits_t / n_t) / (hits_c / n_c) - 1.0


def katz_interval(
    hits_t: int, n_t: int, hits_c: int, n_c: int, z: float = analysis.Z_95
) -> tuple[float, float]:
    """Katz log risk-ratio interval of the lift: ``exp(log RR ± z * se) - 1``.

    ``se = sqrt(1/hits_t - 1/n_t + 1/hits_c - 1/n_c)``; NaN when an arm has no hits.
    """
    if min(hits_t, hits_c) <= 0 or min(n_t, n_c) <= 0:
        return math.nan, math.nan
    log_rr = math.log((hits_t / n_t) / (hits_c / n_c))
    se = math.sqrt(1 / hits_t - 1 / n_t + 1 / hits_c - 1 / n_c)
    return math.exp(log_rr - z * se) - 1.0, math.exp(log_rr + z * se) - 1.0


def _resampled_rates(
    hits: np.ndarray, sends: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The arm's pooled rate in each of ``resamples`` customer resamples (with replacement)."""
    idx = rng.integers(0, len(hits), size=(resamples, len(hits)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rates: np.ndarray = hits[idx].sum(axis=1) / sends[idx].sum(axis=1)
    return rates


def cluster_bootstrap_interval(
    hits_t: npt.ArrayLike,
    sends_t: npt.ArrayLike,
    hits_c: npt.ArrayLike,
    sends_c: npt.ArrayLike,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the lift, resampling customers (one entry each) within each arm.

    A resample whose control rate is 0 has an unbounded lift (+inf when the treatment has
    hits): it stays in, so that with rare conversions the upper bound is +inf instead of a
    percentile of the resamples that happened to have control hits (3 control conversions
    gave "+50% to +1,500%" where 4.5% of resamples had none). Resamples with no hits in
    either arm say nothing and are left out. NaN when none is left, or when the control arm
    has no hits at all (no lift to estimate, as :func:`relative_lift` says).
    """
    h_t, n_t = np.asarray(hits_t, float), np.asarray(sends_t, float)
    h_c, n_c = np.asarray(hits_c, float), np.asarray(sends_c, float)
    if not len(h_t) or not len(h_c) or resamples < 1 or not h_c.sum():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    rate_t = _resampled_rates(h_t, n_t, resamples, rng)
    rate_c = _resampled_rates(h_c, n_c, resamples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        lifts = rate_t / rate_c - 1.0  # x/0 = +inf, 0/0 = NaN
    lifts = lifts[~np.isnan(lifts)]
    if not len(lifts):
        return math.nan, math.nan
    tail = (1.0 - level) / 2
    low, high = np.quantile(lifts, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def split_arms(customer_ids: Iterable[str], seed: int) -> dict[str, Arm]:
    """A deterministic, balanced split: sort, shuffle with ``seed``, alternate the arms."""
    ids = sorted(set(customer_ids))
    random.Random(seed).shuffle(ids)
    return {cid: ARMS[i % 2] for i, cid in enumerate(ids)}


def next_utc_hour(at_ms: int, hour: int) -> int:
    """The first instant at or after ``at_ms`` that is ``hour``:00 UTC."""
    day_start = at_ms - at_ms % DAY_MS
    candidate = day_start + hour * HOUR_MS
    return candidate if candidate >= at_ms else candidate + DAY_MS


def replay_offsets_s(delivered_ms: Sequence[int], rate: float) -> list[float]:
    """Seconds after the start at which to send each message so the mean load is ``rate``.

    Simulated delivery times are compressed by one factor, so busy hours arrive faster;
    offsets never go backwards. Without a rate (0) everything is due at once.
    """
    if not delivered_ms:
        return []
    if rate <= 0 or len(delivered_ms) == 1:
        return [0.0] * len(delivered_ms)
    first = delivered_ms[0]
    span_ms = max(max(delivered_ms) - first, 1)
    seconds = len(delivered_ms) / rate
    offsets: list[float] = []
    latest = 0.0
    for ms in delivered_ms:
        latest = max(latest, (ms - first) / span_ms * seconds)
        offsets.append(latest)
    return offsets


def peak_hours(event_ts_ms: Iterable[int], n: int) -> tuple[int, ...]:
    """The ``n`` UTC hours of the day with the most events (ties to the earlier hour), sorted."""
    counts = [0] * 24
    for ts in event_ts_ms:
        counts[(int(ts) // HOUR_MS) % 24] += 1
    ranked = sorted(range(24), key=lambda h: (-counts[h], h))
    return tuple(sorted(ranked[: max(0, min(n, 24))]))


def latency_by_period(
    events: pd.DataFrame, peak: Sequence[int], *, rate: float = 0.0
) -> pd.DataFrame:
    """Latency percentiles of events whose event time is in a ``peak`` UTC hour vs the rest.

    ``events`` needs ``event_ts_ms``, ``ingested_ms`` and ``stored_ms``. ``offered_rate`` is the
    mean load each period got from a replay at mean ``rate`` (its share of events over its share
    of the day's hours), NaN without a rate.
    """
    hours = (events["event_ts_ms"] // HOUR_MS) % 24
    period = np.where(hours.isin(list(peak)), "peak", "off-peak")
    table = analysis.latency_percentiles(events.assign(period=period), by="period")
    total = len(events)
    spans = {"peak": len(peak), "off-peak": 24 - len(peak)}
    table["offered_rate"] = [
        round(rate * (count / total) / (spans[p] / 24), 1) if rate and spans[p] else math.nan
        for p, count in zip(table["period"], table["count"], strict=True)
    ]
    return table


@dataclass(frozen=True, slots=True)
class PlannedEmail:
    """One email of the test: who gets which products when."""

    customer_id: str
    arm: Arm
    week: int
    send_at_ms: int
    product_ids: tuple[str, ...]


def plan_emails(
    profiles: Mapping[str, Profile],
    arms: Mapping[str, Arm],
    catalog: Catalog,
    signals: RecommendationSignals,
    *,
    at_ms: int,
    k: int,
    control_hour_utc: int,
    sends_per_customer: int,
    recommend_params: RecommendParams | None = None,
    sendtime_params: SendTimeParams | None = None,
) -> list[PlannedEmail]:
    """Control: the bestsellers at ``control_hour_utc``; treatment: ``recommend`` at the best
    send time. Week ``w`` repeats the first email ``w`` weeks later (the treatment's at the
    same local hour, the control's at the same UTC hour)."""
    prior = population_prior(profiles.values(), sendtime_params)
    generic = tuple(
        r.product_id
        for r in popular_baseline(catalog, signals=signals, k=k, params=recommend_params)
    )
    control_at = next_utc_hour(at_ms, control_hour_utc)
    control = [control_at + w * WEEK_MS for w in range(sends_per_customer)]  # a fixed UTC hour
    planned: list[PlannedEmail] = []
    for cid in sorted(arms):
        arm = arms[cid]
        if arm == "control":
            sends, products = control, generic
        else:
            profile = profiles[cid]
            recs = recommend(
                profile, catalog, k=k, signals=signals, params=recommend_params, at_ms=at_ms
            )
            products = tuple(r.product_id for r in recs)
            best = best_send_time(profile, prior, at_ms=at_ms, params=sendtime_params)
            # the chosen local hour every week, across daylight-saving changes too
            sends = [best.weeks_later_ms(w) for w in range(sends_per_customer)]
        planned.extend(PlannedEmail(cid, arm, w, at, products) for w, at in enumerate(sends))
    return planned


def answer_emails(
    planned: Sequence[PlannedEmail],
    customers: Mapping[str, TrueCustomer],
    catalog: Catalog,
    params: BehaviourParams,
    *,
    seed: int,
) -> pd.DataFrame:
    """Per customer: arm, emails sent, opens, clicks, conversions, and two diagnostics.

    Each email's random numbers come from ``Random(f"{seed}:{customer}:{week}")``, so other
    behaviour parameters re-answer the same emails with the same draws.
    """
    rows: dict[str, dict[str, Any]] = {}
    exact = params.model_copy(update={"preference_sensitivity": 1.0})  # a_i = q_i
    for email in planned:
        truth = customers[email.customer_id]
        rng = random.Random(f"{seed}:{email.customer_id}:{email.week}")
        r = respond(truth, email.send_at_ms, email.product_ids, catalog, params, rng)
        row = rows.setdefault(
            email.customer_id,
            {
                "customer_id": email.customer_id,
                "arm": email.arm,
                "sent": 0,
                "opens": 0,
                "clicks": 0,
                "conversions": 0,
                "in_active_hour": 0,
                "match": 0.0,
            },
        )
        row["sent"] += 1
        row["opens"] += r.opened
        row["clicks"] += r.clicked
        row["conversions"] += r.converted
        row["in_active_hour"] += behaviour.hours_to_active(truth, email.send_at_ms) == 0
        q = behaviour.attractiveness(truth, email.product_ids, catalog, exact)
        row["match"] += sum(q) / len(q) if q else 0.0
    columns = ["customer_id", "arm", "sent", "opens", "clicks", "conversions"]
    return pd.DataFrame(list(rows.values()), columns=[*columns, "in_active_hour", "match"])


def arm_table(per_customer: pd.DataFrame) -> pd.DataFrame:
    """Per arm: customers, sent, opens, clicks, conversions, the rates and the diagnostics
    (share of emails landing in an active hour, mean match ``q`` of the products shown)."""
    rows = []
    for arm in ARMS:
        part = per_customer[per_customer["arm"] == arm]
        sent = int(part["sent"].sum())
        row: dict[str, Any] = {"arm": arm, "customers": len(part), "sent": sent}
        for rate, count in METRICS.items():
            row[count] = int(part[count].sum())
            row[rate] = row[count] / sent if sent else math.nan
        row["in_active_hour_share"] = (
            float(part["in_active_hour"].sum()) / sent if sent else math.nan
        )
        row["mean_match"] = float(part["match"].sum()) / sent if sent else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def lift_table(per_customer: pd.DataFrame, *, resamples: int, seed: int) -> pd.DataFrame:
    """Per metric: both rates, the lift, its bootstrap interval (primary) and Katz's."""
    by_arm = {arm: per_customer[per_customer["arm"] == arm] for arm in ARMS}
    control, treatment = by_arm["control"], by_arm["treatment"]
    rows = []
    for rate, count in METRICS.items():
        h_t, n_t = int(treatment[count].sum()), int(treatment["sent"].sum())
        h_c, n_c = int(control[count].sum()), int(control["sent"].sum())
        low, high = cluster_bootstrap_interval(
            treatment[count].to_numpy(),
            treatment["sent"].to_numpy(),
            control[count].to_numpy(),
            control["sent"].to_numpy(),
            resamples=resamples,
            seed=seed,
        )
        k_low, k_high = katz_interval(h_t, n_t, h_c, n_c)
        rows.append(
            {
                "metric": rate,
                "control": h_c / n_c if n_c else math.nan,
                "treatment": h_t / n_t if n_t else math.nan,
                "lift": relative_lift(h_t, n_t, h_c, n_c),
                "ci_low": low,
                "ci_high": high,
                "katz_ci_low": k_low,
                "katz_ci_high": k_high,
                "seed_claim": SEED_CLAIMS.get(rate, math.nan),
            }
        )
    return pd.DataFrame(rows)


def sensitivity_table(
    planned: Sequence[PlannedEmail],
    customers: Mapping[str, TrueCustomer],
    catalog: Catalog,
    base: BehaviourParams,
    hour_sensitivities: Sequence[float],
    preference_sensitivities: Sequence[float],
    *,
    seed: int,
    resamples: int,
) -> pd.DataFrame:
    """CTR and conversion lift (with bootstrap intervals) for every cell of the grid."""
    rows = []
    for hs in hour_sensitivities:
        for ps in preference_sensitivities:
            params = base.model_copy(
                update={"hour_sensitivity": float(hs), "preference_sensitivity": float(ps)}
            )
            per_customer = answer_emails(planned, customers, catalog, params, seed=seed)
            lifts = {
                rec["metric"]: rec
                for rec in lift_table(per_customer, resamples=resamples, seed=seed).to_dict(
                    "records"
                )
            }
            row: dict[str, Any] = {
                "hour_sensitivity": float(hs),
                "preference_sensitivity": float(ps),
            }
            for metric in ("ctr", "conversion_rate"):
                for col in ("lift", "ci_low", "ci_high"):
                    row[f"{metric}_{col}"] = float(lifts[metric][col])
            rows.append(row)
    return pd.DataFrame(rows)


class CaseStudyParams(BaseModel):
    """Everything one case-study run depends on (the notebook's parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    events: int = Field(30_000, ge=1, description="raw messages to simulate")
    days: int = Field(14, ge=1)
    seed: int = 42
    end: date | None = Field(
        None, description="the simulated period ends at 00:00 UTC of this day; None: today"
    )
    customers: int | None = Field(None, ge=1, description="known customers; None: simulator's")
    k: int = Field(6, ge=1, description="products per email, both arms")
    control_hour_utc: int = Field(10, ge=0, le=23)
    sends_per_customer: int = Field(4, ge=1, description="weekly emails per customer")
    rate: float = Field(1000.0, ge=0, description="mean offered load, msg/s; 0: unpaced")
    warmup: int = Field(500, ge=0, description="first messages sent unpaced, not in latency")
    peak_hours: int = Field(4, ge=1, le=23, description="busiest UTC hours counted as peak")
    bootstrap_resamples: int = Field(2000, ge=1)
    behaviour: BehaviourParams = BehaviourParams()
    hour_sensitivities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    preference_sensitivities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    @model_validator(mode="after")
    def _paced_messages_left(self) -> CaseStudyParams:
        """Latency is measured on the messages after the warm-up: some must be left (an
        all-warm-up run failed only after the whole pipeline had run)."""
        if self.warmup >= self.events:
            raise ValueError(f"warmup ({self.warmup}) must be below events ({self.events})")
        return self


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = orjson.loads(
        frame.to_json(orient="records", double_precision=15)
    )
    return records


@dataclass(frozen=True)
class CaseStudyResult:
    """Every figure of one run; :meth:`write_results` writes them all to JSON."""

    params: CaseStudyParams
    behaviour_model: str
    pipeline: dict[str, Any]
    peak_hours_utc: tuple[int, ...]
    replay_seconds_per_day: float
    latency: pd.DataFrame
    arms: pd.DataFrame
    lifts: pd.DataFrame
    sensitivity: pd.DataFrame
    per_customer: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN becomes null)."""
        figures: dict[str, Any] = _nan_to_none(
            {
                "parameters": self.params.model_dump(mode="json"),
                "behaviour_model": self.behaviour_model,
                "ci_method": (
                    "95% customer-level (cluster) percentile bootstrap of the lift, "
                    f"{self.params.bootstrap_resamples} resamples; katz_ci_*: Katz log "
                    "risk-ratio interval assuming independent emails"
                ),
                "seed_claims": {"label": SEED_CLAIMS_LABEL, "lifts": dict(SEED_CLAIMS)},
                "pipeline": self.pipeline,
                "latency": {
                    "peak_hours_utc": list(self.peak_hours_utc),
                    "replay_seconds_per_day": self.replay_seconds_per_day,
                    "by_period": _records(self.latency),
                },
                "ab_test": {"arms": _records(self.arms), "lifts": _records(self.lifts)},
                "sensitivity": _records(self.sensitivity),
            }
        )
        return figures

    def write_results(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON to ``path`` (folders created); returns it."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return out


def run_replay(
    run: Run, sim: Simulation, *, rate: float, warmup: int, progress: bool, timeout_s: float
) -> tuple[dict[str, Any], frozenset[str]]:
    """Process ``sim`` with its first ``warmup`` messages unpaced and waited for (the consumer
    group's first assignment), the rest replayed at mean ``rate``; returns the run summary and
    the warm-up message ids."""
    messages = sim.messages
    head, tail = messages[:warmup], messages[warmup:]
    offsets = replay_offsets_s([m.delivered_ms for m in tail], rate)
    took: list[float] = []
    start = run.metrics.raw_in

    def feed() -> None:
        t0 = time.monotonic()
        produce_messages(run.settings, run.address, head)
        deadline = time.monotonic() + timeout_s
        while run.metrics.raw_in < start + len(head) and time.monotonic() < deadline:
            time.sleep(0.05)
        produce_messages(run.settings, run.address, tail, offsets_s=offsets)
        took.append(time.monotonic() - t0)

    bar = tqdm(
        total=len(messages), desc="processed", unit="msg", disable=not progress, mininterval=0.5
    )

    def tick(m: StreamMetrics) -> None:
        bar.update(m.raw_in - start - bar.n)

    try:
        process_until_idle(
            run, expected_raw=start + len(messages), feed=feed, on_tick=tick, timeout_s=timeout_s
        )
    finally:
        bar.close()
    summary = summarize(run, sim, produce_s=took[0] if took else math.nan)
    return summary, frozenset(m.message_id for m in head if m.message_id)


def run_case_study(
    settings: Settings,
    params: CaseStudyParams,
    *,
    progress: bool = True,
    timeout_s: float = 900.0,
) -> CaseStudyResult:
    """Simulate, run the pipeline, run the A/B test and the sensitivity grid (module doc)."""
    with pipeline_run(settings) as run:
        catalog = run.catalog
        config = SimulationConfig(
            events=params.events,
            seed=params.seed,
            days=params.days,
            customers=params.customers,
            end=end_of(params.end),
        )
        sim = simulate(config, catalog)
        summary, warm_ids = run_replay(
            run,
            sim,
            rate=params.rate,
            warmup=params.warmup,
            progress=progress,
            timeout_s=timeout_s,
        )
        events = run.warehouse.query(
            "SELECT message_id, event_ts_ms, ingested_ms, stored_ms, payload FROM events "
            "ORDER BY event_ts_ms, message_id"
        )
        stored_profiles = run.warehouse.query(
            "SELECT customer_id, profile FROM profiles "
            "WHERE merged_into IS NULL AND is_anonymous = 0"
        )

    peak = peak_hours(events["event_ts_ms"], params.peak_hours)
    measured = events[~events["message_id"].isin(warm_ids)]
    latency = latency_by_period(measured, peak, rate=params.rate)

    signals = signals_from_events(orjson.loads(p) for p in events["payload"])
    profiles = {
        cid: profile_from_dict(orjson.loads(p))
        for cid, p in zip(stored_profiles["customer_id"], stored_profiles["profile"], strict=True)
    }
    truth = {c.customer_id: c for c in sim.customers if c.is_known and c.customer_id in profiles}
    arms = split_arms(truth, params.seed)
    planned = plan_emails(
        profiles,
        arms,
        catalog,
        signals,
        at_ms=int(config.end.timestamp() * 1000),
        k=params.k,
        control_hour_utc=params.control_hour_utc,
        sends_per_customer=params.sends_per_customer,
    )
    per_customer = answer_emails(planned, truth, catalog, params.behaviour, seed=params.seed)
    return CaseStudyResult(
        params=params,
        behaviour_model=behaviour.__doc__ or "",
        pipeline=summary,
        peak_hours_utc=peak,
        replay_seconds_per_day=(
            max(0, len(sim.messages) - params.warmup) / params.rate / params.days
            if params.rate
            else math.nan
        ),
        latency=latency,
        arms=arm_table(per_customer),
        lifts=lift_table(per_customer, resamples=params.bootstrap_resamples, seed=params.seed),
        sensitivity=sensitivity_table(
            planned,
            truth,
            catalog,
            params.behaviour,
            params.hour_sensitivities,
            params.preference_sensitivities,
            seed=params.seed,
            resamples=params.bootstrap_resamples,
        ),
        per_customer=per_customer,
    )


def _pct(values: pd.Series) -> list[str]:
    return [f"{v:+.0%}" if math.isfinite(v) else "n/a" for v in values]


def lift_figure(lifts: pd.DataFrame) -> go.Figure:
    """Measured lift per metric with its 95% interval, and the seed's claims as open markers."""
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=lifts["metric"],
            y=lifts["lift"],
            name="measured lift (95% CI)",
            text=_pct(lifts["lift"]),
            error_y={
                "type": "data",
                "symmetric": False,
                # an unbounded upper end (too few control hits) draws no whisker
                "array": (lifts["ci_high"] - lifts["lift"]).replace(np.inf, np.nan),
                "arrayminus": lifts["lift"] - lifts["ci_low"],
            },
        )
    )
    claimed = lifts[lifts["seed_claim"].notna()]
    fig.add_trace(
        go.Scatter(
            x=claimed["metric"],
            y=claimed["seed_claim"],
            mode="markers",
            name=SEED_CLAIMS_LABEL,
            marker={"symbol": "diamond-open", "size": 14, "color": "black"},
        )
    )
    fig.add_hline(y=0, line_dash="dot")
    fig.update_layout(
        title="Treatment vs control: relative lift", yaxis_tickformat="+.0%", yaxis_title="lift"
    )
    return fig


def arms_figure(
    arms: pd.DataFrame, per_customer: pd.DataFrame, *, resamples: int, seed: int
) -> go.Figure:
    """Open rate, CTR and conversion rate per arm with customer-bootstrap 95% intervals."""
    fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=list(METRICS))
    rng = np.random.default_rng(seed)
    for col, (rate, count) in enumerate(METRICS.items(), start=1):
        lows, highs = [], []
        for arm in arms["arm"]:
            part = per_customer[per_customer["arm"] == arm]
            if part.empty:
                lows.append(math.nan)
                highs.append(math.nan)
                continue
            boot = _resampled_rates(
                part[count].to_numpy(float), part["sent"].to_numpy(float), resamples, rng
            )
            lo, hi = np.nanpercentile(boot, [2.5, 97.5])
            lows.append(float(lo))
            highs.append(float(hi))
        fig.add_trace(
            go.Bar(
                x=arms["arm"],
                y=arms[rate],
                name=rate,
                showlegend=False,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.array(highs) - arms[rate].to_numpy(),
                    "arrayminus": arms[rate].to_numpy() - np.array(lows),
                },
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(tickformat=".1%")
    fig.update_layout(title="Rates per email sent, by arm (95% CI)")
    return fig


def sensitivity_figure(sensitivity: pd.DataFrame) -> go.Figure:
    """Heatmaps of CTR and conversion lift over hour x preference sensitivity."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("CTR lift", "conversion lift"))
    for col, metric in enumerate(("ctr", "conversion_rate"), start=1):
        grid = sensitivity.pivot(
            index="hour_sensitivity", columns="preference_sensitivity", values=f"{metric}_lift"
        )
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[str(c) for c in grid.columns],
                y=[str(i) for i in grid.index],
                text=[_pct(pd.Series(row)) for row in grid.to_numpy()],
                texttemplate="%{text}",
                coloraxis="coloraxis",
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="preference sensitivity")
    fig.update_yaxes(title_text="hour sensitivity", col=1)
    fig.update_layout(
        title="Lift under other behaviour models",
        coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"tickformat": "+.0%"}},
    )
    return fig


def latency_period_figure(latency: pd.DataFrame) -> go.Figure:
    """p50/p95/p99 latency in the simulated peak hours vs the rest."""
    long = latency.melt(
        id_vars=["period"],
        value_vars=[f"p{p}" for p in analysis.PERCENTILES],
        var_name="percentile",
        value_name="ms",
    )
    fig = px.bar(
        long,
        x="percentile",
        y="ms",
        color="period",
        barmode="group",
        title="End-to-end latency: simulated peak hours vs off-peak",
    )
    fig.update_layout(yaxis_title="stored_ms - ingested_ms (ms)")
    return fig
