"""Read-side views of the local warehouse for the workbench and notebooks.

Live throughput and latency, intent-stage segments, customer search and 360, identity graph and
data quality, as DataFrames and small records. Read-only: safe while the processor writes.
What the warehouse does not record (duplicates dropped, consumer lag, collector refusals) is
read from the processor's and the collector's Prometheus ``/metrics`` endpoints.
"""

from __future__ import annotations

import http.client
import math
import re
import time
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import orjson
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from pipeline import lineage
from pipeline.errors import ProfileNotFoundError
from pipeline.events import CleanEvent
from pipeline.identity import ANON_PREFIX
from pipeline.metrics import cpu_per_event
from pipeline.observability import EMBEDDED_BROKER
from pipeline.scoring import (
    DAY_MS,
    IntentStage,
    Profile,
    ScoreBreakdown,
    ScoringParams,
    affinity_shares,
    apply_event,
    intent_stage,
    interaction_score,
    new_profile,
    profile_from_dict,
)
from pipeline.stores.local import LocalWarehouse

STAGES: tuple[IntentStage, ...] = get_args(IntentStage)

START_HINT = (
    "No pipeline data yet. Start the pipeline with `pipeline up`, then send traffic from "
    "another terminal with `pipeline simulate --events 10000`."
)

MEMBER_COLUMNS = (
    "customer_id",
    "email",
    "name",
    "is_anonymous",
    "intent_stage",
    "score",
    "recency",
    "frequency",
    "monetary",
    "revenue_total",
    "order_count",
    "event_count",
    "top_category",
    "top_brand",
    "last_seen",
)


def now_ms() -> int:
    """Wall-clock time in UTC epoch milliseconds."""
    return time.time_ns() // 1_000_000


def open_warehouse(path: Path) -> LocalWarehouse | None:
    """A read-only handle on the warehouse, or None while nothing has created it yet."""
    if not Path(path).exists():
        return None
    return LocalWarehouse(path, read_only=True)


def _to_time(ms: pd.Series) -> pd.Series:
    return pd.to_datetime(ms, unit="ms", utc=True)


_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def plain(text: object) -> str:
    """``text`` for Streamlit's Markdown (headers, captions) shown as written: profile traits
    and email subjects come from visitors, and a name such as ``![x](https://...)`` would
    make the marketer's browser load an image, or show a link, ``$...$`` would be LaTeX."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def totals(wh: LocalWarehouse) -> dict[str, int | None]:
    """Row counts, live customers and anonymous profiles, merged events and the newest write."""
    out: dict[str, int | None] = dict(wh.counts())
    live = "SELECT COUNT(*) FROM profiles WHERE merged_into IS NULL AND is_anonymous = ?"
    out["customers"] = int(wh.scalar(live, (0,)))
    out["anonymous_profiles"] = int(wh.scalar(live, (1,)))
    out["events_merged"] = int(
        wh.scalar("SELECT COUNT(*) FROM events WHERE merged_from IS NOT NULL")
    )
    last = wh.scalar(
        "SELECT MAX(m) FROM (SELECT MAX(stored_ms) AS m FROM events "
        "UNION ALL SELECT MAX(stored_ms) FROM dead_letters)"
    )
    out["last_stored_ms"] = None if last is None else int(last)
    return out


def has_data(wh: LocalWarehouse | None) -> bool:
    """True once the warehouse holds any event, profile or dead letter."""
    if wh is None:
        return False
    return any(
        wh.scalar(f"SELECT EXISTS (SELECT 1 FROM {table})")
        for table in ("events", "profiles", "dead_letters")
    )


def throughput(wh: LocalWarehouse, *, now_ms: int, minutes: float = 5.0) -> pd.DataFrame:
    """Messages per second over the last ``minutes``: ``in`` by broker arrival time (stored or
    dead-lettered), ``out`` by the time clean events became readable in the warehouse."""
    end_s = now_ms // 1000
    start_s = end_s - max(1, int(minutes * 60))
    since = start_s * 1000
    arrived = wh.query(
        "SELECT ingested_ms / 1000 AS second, COUNT(*) AS n FROM ("
        " SELECT ingested_ms FROM events WHERE ingested_ms >= ?"
        " UNION ALL SELECT ingested_ms FROM dead_letters WHERE ingested_ms >= ?"
        ") GROUP BY second",
        (since, since),
    )
    stored = wh.query(
        "SELECT stored_ms / 1000 AS second, COUNT(*) AS n FROM events WHERE stored_ms >= ? "
        "GROUP BY second",
        (since,),
    )
    seconds = pd.RangeIndex(start_s, end_s + 1)
    frame = pd.DataFrame(
        {
            "in_per_s": arrived.set_index("second")["n"].reindex(seconds, fill_value=0)
            if len(arrived)
            else 0,
            "out_per_s": stored.set_index("second")["n"].reindex(seconds, fill_value=0)
            if len(stored)
            else 0,
        },
        index=seconds,
    ).astype("int64")
    frame.insert(0, "time", _to_time(pd.Series(seconds * 1000, index=seconds)))
    return frame.reset_index(drop=True)


def rates(wh: LocalWarehouse, *, now_ms: int, window_s: int = 10) -> dict[str, float]:
    """Average messages per second in and out over the last ``window_s`` full seconds."""
    tp = throughput(wh, now_ms=now_ms, minutes=window_s / 60)
    full = tp.iloc[:-1].tail(window_s)
    n = max(1, len(full))
    return {
        "in_per_s": float(full["in_per_s"].sum()) / n,
        "out_per_s": float(full["out_per_s"].sum()) / n,
    }


LATENCY_ROWS_MAX = 100_000
"""Most event rows one latency figure reads: beyond, an even sample of the rows."""


def _latencies(wh: LocalWarehouse, since_ms: int) -> tuple[pd.DataFrame, int, int]:
    """Storage time and latency of the events stored since ``since_ms``, the sampling step
    and the number of events: a busy hour is millions of rows, which the Live page, refreshed
    every two seconds, must not load each time (1M rows on this 2-core machine while a test
    suite ran: 2.9 s to read in full, 0.34 s every tenth row)."""
    where, step, n = _stored_since(wh, since_ms)
    columns = "stored_ms, stored_ms - ingested_ms AS latency_ms"
    frame = wh.query(f"SELECT {columns} {where}", (since_ms,))
    return frame, step, n


def _stored_since(wh: LocalWarehouse, since_ms: int) -> tuple[str, int, int]:
    """``FROM ... WHERE ...`` of the events stored since ``since_ms``, sampled to at most
    :data:`LATENCY_ROWS_MAX` rows, the sampling step, and how many events there are."""
    where = "FROM events WHERE stored_ms >= ?"
    n = int(wh.scalar(f"SELECT COUNT(*) {where}", (since_ms,)))
    step = max(1, math.ceil(n / LATENCY_ROWS_MAX))
    # every step-th row: the index on stored_ms carries the rowid, so the filter skips rows
    # before their table lookup. (Not stored_ms % step: the rows of one sink write share a
    # stored_ms, and a backlog's few large writes were all kept or all dropped.)
    return (where if step == 1 else f"{where} AND rowid % {step} = 0"), step, n


def latency_summary(wh: LocalWarehouse, *, since_ms: int) -> dict[str, float]:
    """End-to-end latency (broker arrival to readable in the warehouse) percentiles, in ms."""
    frame, _, n = _latencies(wh, since_ms)
    lat = frame["latency_ms"]
    if lat.empty:
        return {"events": float(n), "p50": math.nan, "p95": math.nan, "p99": math.nan}
    q = lat.quantile([0.5, 0.95, 0.99])
    return {
        "events": float(n),
        "p50": float(q[0.5]),
        "p95": float(q[0.95]),
        "p99": float(q[0.99]),
    }


def step_latency(wh: LocalWarehouse, *, since_ms: int) -> pd.DataFrame:
    """Per lineage step, p50/p95/p99 ms since the step before, over events stored since then.

    Empty for a warehouse made before lineage was recorded (its events lack the columns).
    """
    have = set(wh.query("SELECT name FROM pragma_table_info('events')")["name"])
    columns = [c for c in lineage.COLUMNS if c in have]
    if "parsed_ms" not in have:
        return pd.DataFrame(columns=["step", "n", "p50_ms", "p95_ms", "p99_ms"])
    where, step, _ = _stored_since(wh, since_ms)  # (10k events/s: 600k rows a minute)
    rows = wh.query(f"SELECT {', '.join(columns)} {where}", (since_ms,))
    steps = lineage.step_latency(rows)
    steps["n"] *= step  # estimated when sampled
    return steps


def latency_over_time(
    wh: LocalWarehouse, *, now_ms: int, minutes: float = 5.0, bucket_s: int = 5
) -> pd.DataFrame:
    """p50/p95/p99 end-to-end latency (ms) per ``bucket_s`` bucket of storage time."""
    since = now_ms - int(minutes * 60_000)
    lat, step, _ = _latencies(wh, since)
    cols = ["time", "events", "p50", "p95", "p99"]
    if lat.empty:
        return pd.DataFrame(columns=cols)
    bucket_ms = bucket_s * 1000
    lat["bucket"] = lat["stored_ms"] // bucket_ms * bucket_ms
    grouped = lat.groupby("bucket")["latency_ms"]
    frame = pd.DataFrame(
        {
            "events": grouped.size() * step,  # estimated when sampled
            "p50": grouped.quantile(0.5),
            "p95": grouped.quantile(0.95),
            "p99": grouped.quantile(0.99),
        }
    ).reset_index()
    frame["time"] = _to_time(frame["bucket"])
    return frame[cols]


def dead_letters_by_reason(wh: LocalWarehouse, *, since_ms: int | None = None) -> pd.DataFrame:
    """Dead letters per failure reason (all time, or failed since ``since_ms``), largest first."""
    frame = wh.query(
        "SELECT reason, COUNT(*) AS dead_letters, MAX(failed_ms) AS last_failed_ms "
        "FROM dead_letters WHERE failed_ms >= ? GROUP BY reason "
        "ORDER BY dead_letters DESC, reason",
        (since_ms or 0,),
    )
    frame["last_failed"] = _to_time(frame["last_failed_ms"])
    return frame.drop(columns="last_failed_ms")


def dead_letter_samples(
    wh: LocalWarehouse, *, reason: str | None = None, limit: int = 50, raw_chars: int = 500
) -> pd.DataFrame:
    """The newest dead letters (optionally of one reason) with what failed and the raw payload."""
    where, params = ("WHERE reason = ?", [reason]) if reason else ("", [])
    frame = wh.query(
        "SELECT failed_ms, reason, detail, schema_path, event_name, message_id, message_key, "
        f"dead_letter_id, substr(raw_text, 1, ?) AS raw_text FROM dead_letters {where} "
        "ORDER BY failed_ms DESC, dead_letter_id LIMIT ?",
        [raw_chars, *params, limit],
    )
    frame.insert(0, "failed", _to_time(frame["failed_ms"]))
    return frame.drop(columns="failed_ms")


def schema_versions(wh: LocalWarehouse) -> pd.DataFrame:
    """Stored events per envelope type, event name and ``context.schemaVersion`` seen."""
    frame = wh.query(
        "SELECT event_type, event_name, "
        "COALESCE(json_extract(payload, '$.schema_version'), 1) AS schema_version, "
        "COUNT(*) AS events, MAX(stored_ms) AS last_stored_ms FROM events "
        "GROUP BY event_type, event_name, schema_version ORDER BY event_type, event_name, "
        "schema_version"
    )
    frame["last_stored"] = _to_time(frame["last_stored_ms"])
    return frame.drop(columns="last_stored_ms")


def metrics_url(host: str, port: int) -> str | None:
    """Where a ``/metrics`` endpoint bound to ``host:port`` is reached from this machine.

    A wildcard bind address is reached on loopback; port 0 (any free port) has no fixed
    address, hence None.
    """
    if port == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def read_metrics(url: str, *, timeout_s: float = 0.5, max_bytes: int = 4_000_000) -> str | None:
    """The body of a ``/metrics`` endpoint, or None when it does not answer with 200 in time."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return bytes(response.read(max_bytes)).decode("utf-8", errors="replace")
    except (OSError, ValueError, http.client.HTTPException):  # refused, timed out, HTTP error
        return None


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


_PROCESSOR_COUNTERS = {
    "pipeline_raw_in_total": "raw_in",
    "pipeline_duplicates_dropped_total": "duplicates_dropped",
    "pipeline_replays_dropped_total": "replays_dropped",
}


@dataclass(frozen=True, slots=True)
class ProcessorScrape:
    """What a processor's ``/metrics`` said (counters since it started, lag as of now)."""

    raw_in: int
    duplicates_dropped: int
    replays_dropped: int
    dead_lettered: dict[str, int]
    consumer_lag: dict[tuple[str, int], int]
    step_cpu_s: dict[str, float] = field(default_factory=dict)
    process_cpu_s: float | None = None  # the whole process's CPU (None: not exported)
    # the embedded broker's resident memory (None: a real cluster, or not exported)
    broker_memory_bytes: int | None = None
    # requests the processor's clients sent the brokers, per (client type, Kafka API)
    broker_requests: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def consumer_lag_total(self) -> int:
        return sum(self.consumer_lag.values())

    def cpu_table(self) -> pd.DataFrame:
        """CPU microseconds per raw event since the processor started: each of its steps, and
        ``framework`` (stream framework, Kafka client, serialization) for the rest."""
        per = cpu_per_event(self.step_cpu_s, self.raw_in, self.process_cpu_s)
        rows = [(part, us) for part, us in per.items() if part != "total"]
        return pd.DataFrame(rows, columns=["step", "us_per_event"])

    def requests_table(self) -> pd.DataFrame:
        """Requests to the brokers per 1,000 raw events since the processor started, by client
        and Kafka API, the most frequent first (empty before the first event)."""
        columns = ["client", "request", "per_1k_events"]
        if not self.raw_in:
            return pd.DataFrame([], columns=columns)
        rows = sorted(
            (
                (c, api, round(n * 1000 / self.raw_in, 1))
                for (c, api), n in self.broker_requests.items()
            ),
            key=lambda row: -row[2],
        )
        return pd.DataFrame(rows, columns=columns)

    def lag_table(self) -> pd.DataFrame:
        """Lag per topic and partition, in topic then partition order."""
        rows = [
            {"topic": t, "partition": p, "lag": lag}
            for (t, p), lag in sorted(self.consumer_lag.items())
        ]
        return pd.DataFrame(rows, columns=["topic", "partition", "lag"])

    def dead_letter_table(self) -> pd.DataFrame:
        """Messages dead-lettered per reason, largest first."""
        rows = sorted(self.dead_lettered.items(), key=lambda kv: (-kv[1], kv[0]))
        return pd.DataFrame(rows, columns=["reason", "dead_lettered"])


EMBEDDED_BROKER_MEMORY = f"{EMBEDDED_BROKER}_process_resident_memory_bytes"


def parse_processor_scrape(text: str) -> ProcessorScrape:
    """Parse a processor's Prometheus exposition (series of :mod:`pipeline.observability`).

    Raises ValueError when ``text`` is not the Prometheus text format.
    """
    counters = dict.fromkeys(_PROCESSOR_COUNTERS.values(), 0)
    dead: dict[str, int] = {}
    lag: dict[tuple[str, int], int] = {}
    cpu: dict[str, float] = {}
    process_cpu: float | None = None
    broker_memory: int | None = None
    requests: dict[tuple[str, str], int] = {}
    for name, labels, value in _samples(text):
        if name == "pipeline_step_cpu_seconds_total":
            cpu[labels.get("step", "")] = value
        elif name == "pipeline_broker_requests_total":
            requests[(labels.get("client", ""), labels.get("request", ""))] = int(value)
        elif name == "process_cpu_seconds_total":
            process_cpu = value
        elif name == EMBEDDED_BROKER_MEMORY:
            broker_memory = int(value)
        elif name == "pipeline_dead_lettered_total":
            dead[labels.get("reason", "")] = int(value)
        elif name == "pipeline_consumer_lag":
            lag[(labels.get("topic", ""), int(labels.get("partition", "-1")))] = int(value)
        elif name in _PROCESSOR_COUNTERS:
            counters[_PROCESSOR_COUNTERS[name]] = int(value)
    return ProcessorScrape(
        dead_lettered=dead,
        consumer_lag=lag,
        step_cpu_s=cpu,
        process_cpu_s=process_cpu,
        broker_memory_bytes=broker_memory,
        broker_requests=requests,
        **counters,
    )


@dataclass(frozen=True, slots=True)
class CollectorScrape:
    """What a collector's ``/metrics`` said: events in and out, refusals by status and code."""

    events_accepted: int
    events_produced: int
    rejected: dict[tuple[int, str], int]

    def rejection_table(self) -> pd.DataFrame:
        """Refused requests per HTTP status and error code, largest first."""
        rows = [
            {"status": status, "code": code, "requests": n}
            for (status, code), n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return pd.DataFrame(rows, columns=["status", "code", "requests"])


def parse_collector_scrape(text: str) -> CollectorScrape:
    """Parse a collector's Prometheus exposition. Raises ValueError if it is not one."""
    accepted = produced = 0
    rejected: dict[tuple[int, str], int] = {}
    for name, labels, value in _samples(text):
        if name == "pipeline_collector_events_accepted_total":
            accepted = int(value)
        elif name == "pipeline_collector_events_produced_total":
            produced = int(value)
        elif name == "pipeline_collector_requests_rejected_total":
            rejected[(int(labels.get("status", "0")), labels.get("code", ""))] = int(value)
    return CollectorScrape(accepted, produced, rejected)


def _top(affinity: dict[str, float]) -> str | None:
    shares = affinity_shares(affinity)
    return next(iter(shares), None)


def _name(traits: dict[str, Any]) -> str | None:
    parts = [traits.get("firstName"), traits.get("lastName")]
    name = " ".join(str(p) for p in parts if p)
    return name or (str(traits["name"]) if traits.get("name") else None)


@dataclass(frozen=True, slots=True)
class _Member:
    """A live profile's segment row less what changes with time, and the fields its score and
    intent stage at a given time are computed from (``interaction_score`` and
    ``intent_stage`` read no others: tests compare with the full profile)."""

    customer_id: str
    email: Any
    name: str | None
    is_anonymous: bool
    revenue_total: float
    order_count: int
    event_count: int
    top_category: str | None
    top_brand: str | None
    last_seen_ms: int | None
    as_of_ms: int | None
    engagement: float
    monetary: float
    last_order_ms: int | None
    last_cart_ms: int | None
    cart: dict[str, int]

    @classmethod
    def of(cls, profile: Profile) -> _Member:
        traits = profile.traits
        return cls(
            customer_id=profile.customer_id,
            email=traits.get("email"),
            name=_name(traits),
            is_anonymous=profile.is_anonymous,
            revenue_total=profile.revenue_total,
            order_count=profile.order_count,
            event_count=profile.event_count,
            top_category=_top(profile.category_affinity),
            top_brand=_top(profile.brand_affinity),
            last_seen_ms=profile.last_seen_ms,
            as_of_ms=profile.as_of_ms,
            engagement=profile.engagement,
            monetary=profile.monetary,
            last_order_ms=profile.last_order_ms,
            last_cart_ms=profile.last_cart_ms,
            cart=profile.cart,
        )

    def row(self, params: ScoringParams, at_ms: int) -> dict[str, Any]:
        """The segment row at ``at_ms``: score and stage from a profile of the scoring fields
        alone (about 4 us, where parsing the stored profile again takes 40-60)."""
        profile = Profile(
            customer_id=self.customer_id,
            is_anonymous=self.is_anonymous,
            last_seen_ms=self.last_seen_ms,
            as_of_ms=self.as_of_ms,
            engagement=self.engagement,
            monetary=self.monetary,
            last_order_ms=self.last_order_ms,
            last_cart_ms=self.last_cart_ms,
            cart=self.cart,
        )
        score = interaction_score(profile, at_ms, params)
        return {
            "customer_id": self.customer_id,
            "email": self.email,
            "name": self.name,
            "is_anonymous": self.is_anonymous,
            "intent_stage": intent_stage(profile, at_ms, params),
            "score": score.score,
            "recency": score.recency,
            "frequency": score.frequency,
            "monetary": score.monetary,
            "revenue_total": self.revenue_total,
            "order_count": self.order_count,
            "event_count": self.event_count,
            "top_category": self.top_category,
            "top_brand": self.top_brand,
            "last_seen_ms": self.last_seen_ms,
        }


def member_row(stored: dict[str, Any], params: ScoringParams, at_ms: int) -> dict[str, Any]:
    """One customer's segment row: score and intent stage re-evaluated at ``at_ms``."""
    return _Member.of(profile_from_dict(stored)).row(params, at_ms)


class MemberIndex:
    """Every live profile's segment row, ready to be scored at any time without parsing each
    stored profile again: the first :meth:`refresh` reads them all, later ones only the
    profiles stored since (``stored_ms``, indexed) and drop those deleted (``forget``) or
    merged away. At a million customers a re-score takes seconds, where reading every
    profile took a minute. Not thread-safe: callers serialize refresh and use.
    """

    OVERLAP_MS = 10_000
    """Profiles stored this long before the newest one seen are read again: a write stamped
    earlier may commit after a refresh (several writers share the store)."""

    def __init__(self) -> None:
        self._members: dict[str, _Member] = {}
        self._rows: set[str] = set()  # every profile row seen, merged ones too
        self._newest_ms: int | None = None

    def refresh(self, wh: LocalWarehouse) -> int:
        """Read what changed in ``wh`` since the last refresh; returns how many profiles."""
        sql = "SELECT customer_id, merged_into, stored_ms, profile FROM profiles"
        args: tuple[int, ...] = ()
        if self._newest_ms is not None:
            sql += " WHERE stored_ms >= ?"
            args = (self._newest_ms - self.OVERLAP_MS,)
        read = 0
        for customer_id, merged_into, stored_ms, raw in wh.rows(sql, args):
            read += 1
            self._rows.add(customer_id)
            if merged_into is None:
                self._members[customer_id] = _Member.of(profile_from_dict(orjson.loads(raw)))
            else:
                self._members.pop(customer_id, None)
            if self._newest_ms is None or stored_ms > self._newest_ms:
                self._newest_ms = stored_ms
        if int(wh.scalar("SELECT COUNT(*) FROM profiles")) != len(self._rows):
            kept = {row[0] for row in wh.rows("SELECT customer_id FROM profiles")}
            for gone in self._rows - kept:
                self._members.pop(gone, None)
            self._rows &= kept
        return read

    def members(
        self, params: ScoringParams, *, at_ms: int, include_anonymous: bool = False
    ) -> pd.DataFrame:
        """The segment rows at ``at_ms``, sorted by score (see :func:`segment_members`)."""
        rows = [
            member.row(params, at_ms)
            for member in self._members.values()
            if include_anonymous or not member.is_anonymous
        ]
        frame = pd.DataFrame.from_records(rows, columns=[*MEMBER_COLUMNS[:-1], "last_seen_ms"])
        frame["last_seen"] = _to_time(frame["last_seen_ms"])
        frame = frame.drop(columns="last_seen_ms")
        frame["intent_stage"] = pd.Categorical(frame["intent_stage"], categories=list(STAGES))
        return frame.sort_values(["score", "customer_id"], ascending=[False, True]).reset_index(
            drop=True
        )


def segment_members(
    wh: LocalWarehouse, params: ScoringParams, *, at_ms: int, include_anonymous: bool = False
) -> pd.DataFrame:
    """Every live profile (not merged away) with score and intent stage at ``at_ms``.

    Stored profiles carry the stage as of their newest event; re-evaluating at ``at_ms`` lets
    customers drift to ``lapsed`` without new events. Sorted by score, highest first. (The
    workbench keeps a :class:`MemberIndex` instead, to read only what changed.)
    """
    index = MemberIndex()
    index.refresh(wh)
    return index.members(params, at_ms=at_ms, include_anonymous=include_anonymous)


def segment_sizes(members: pd.DataFrame) -> pd.DataFrame:
    """Customers, share and mean score per intent stage (every stage listed, even when empty)."""
    grouped = members.groupby("intent_stage", observed=False)["score"]
    frame = pd.DataFrame({"customers": grouped.size(), "mean_score": grouped.mean()})
    frame = frame.reindex(list(STAGES))
    frame["customers"] = frame["customers"].fillna(0).astype("int64")
    total = int(frame["customers"].sum())
    frame["share"] = frame["customers"] / total if total else 0.0
    frame.index.name = "intent_stage"
    return frame.reset_index()[["intent_stage", "customers", "share", "mean_score"]]


def filter_members(
    members: pd.DataFrame,
    *,
    stages: Sequence[str] | None = None,
    min_score: float = 0.0,
    max_score: float = 100.0,
    text: str = "",
    categories: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Members in ``stages`` with ``min_score <= score <= max_score``, a top category among
    ``categories``, and ``text`` in their id, e-mail or name (case-insensitive)."""
    keep = members["score"].between(min_score, max_score)
    if stages:
        keep &= members["intent_stage"].isin(list(stages))
    if categories:
        keep &= members["top_category"].isin(list(categories))
    needle = text.strip().lower()
    if needle:
        hay = (
            members["customer_id"].fillna("")
            + " "
            + members["email"].fillna("")
            + " "
            + members["name"].fillna("")
        ).str.lower()
        keep &= hay.str.contains(needle, regex=False)
    return members[keep].reset_index(drop=True)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (``=HYPERLINK(...)`` planted in a
    name by any visitor) gets a leading quote: shown as text, never evaluated (OWASP's CSV
    injection advice); other values pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def members_csv(members: pd.DataFrame) -> bytes:
    """The members table as UTF-8 CSV for export (times in ISO-8601 UTC); text cells that
    would start a spreadsheet formula are made inert (see :func:`_inert`)."""
    safe = members.copy()
    for column in safe.columns:
        if pd.api.types.is_object_dtype(safe[column]) or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(_inert)
    return safe.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ").encode("utf-8")


@dataclass(frozen=True, slots=True)
class StageHistory:
    """Daily intent-stage sizes rebuilt from stored events, and how many customers it covers."""

    frame: pd.DataFrame
    customers: int
    customers_total: int


def stage_history(
    wh: LocalWarehouse,
    params: ScoringParams,
    *,
    end_ms: int,
    days: int = 14,
    include_anonymous: bool = False,
    max_events: int = 200_000,
) -> StageHistory:
    """Customers per intent stage at the end of each of the last ``days`` days.

    Profiles keep only their current state, so each customer's stored events are folded again
    with :func:`pipeline.scoring.apply_event` and the stage is read at every day end. To bound
    the work, customers are taken in a fixed pseudo-random order (a hash of the id) until
    ``max_events`` events: ids often follow sign-up order, and a prefix of them would show
    the oldest customers' stages only.
    """
    # a prefix compared as text: LIKE is case-insensitive in SQLite ('Anon:Smith' is a customer)
    known = "" if include_anonymous else "AND substr(customer_id, 1, :n) != :anon"
    per_customer = wh.query(
        f"SELECT customer_id, COUNT(*) AS n FROM events WHERE 1 = 1 {known} GROUP BY customer_id",
        {"anon": ANON_PREFIX, "n": len(ANON_PREFIX)},
    )
    rank = per_customer["customer_id"].map(lambda c: zlib.crc32(str(c).encode()))
    per_customer = per_customer.iloc[rank.argsort(kind="stable")]
    covered = sorted(per_customer[per_customer["n"].cumsum() <= max_events]["customer_id"])
    boundaries = [end_ms - k * DAY_MS for k in range(days - 1, -1, -1)]
    counts = {(b, s): 0 for b in boundaries for s in STAGES}
    for first in range(0, len(covered), 500):  # (SQLite binds at most 999 values a query)
        chunk = covered[first : first + 500]
        events = wh.query(
            f"SELECT customer_id, payload FROM events WHERE customer_id IN "
            f"({','.join('?' * len(chunk))}) ORDER BY customer_id, event_ts_ms, message_id",
            chunk,
        )
        for customer_id, group in events.groupby("customer_id", sort=False):
            cid = str(customer_id)
            profile = new_profile(cid, is_anonymous=cid.startswith(ANON_PREFIX))
            parsed = [CleanEvent.from_dict(orjson.loads(p)) for p in group["payload"]]
            i = 0
            for boundary in boundaries:
                while i < len(parsed) and parsed[i].timestamp_ms <= boundary:
                    apply_event(profile, parsed[i], params, processed_ms=boundary)
                    i += 1
                if profile.last_seen_ms is not None:
                    counts[(boundary, intent_stage(profile, boundary, params))] += 1
    frame = pd.DataFrame(
        [(b, s, n) for (b, s), n in counts.items()],
        columns=["day_end_ms", "intent_stage", "customers"],
    )
    frame.insert(0, "day_end", _to_time(frame["day_end_ms"]))
    return StageHistory(
        frame=frame.drop(columns="day_end_ms"),
        customers=len(covered),
        customers_total=len(per_customer),
    )


def page_link(page: str, **query: str) -> str:
    """A workbench deep link, every value URL-encoded (ids are client-chosen: ``a+b@x``
    would arrive as ``a b@x`` and ``acct#42`` as ``acct``)."""
    return f"/{page}?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())


def search_customers(
    wh: LocalWarehouse,
    text: str,
    *,
    limit: int = 25,
    params: ScoringParams | None = None,
    at_ms: int | None = None,
) -> pd.DataFrame:
    """Profiles matching ``text`` by customer id prefix, e-mail substring or anonymous id prefix
    (a merged device leads to its customer); with no text, the highest-scoring customers.

    With ``params`` and ``at_ms`` the score and intent stage are those at ``at_ms``, as the
    pages beside the list show them (stored ones date from each customer's newest event).
    """
    cols = (
        "p.customer_id, json_extract(p.profile, '$.traits.email') AS email, p.is_anonymous, "
        "p.intent_stage, p.cis, p.event_count, p.last_seen_ms, p.profile"
    )
    needle = text.strip()
    if not needle:
        frame = wh.query(
            f"SELECT {cols}, 'top score' AS matched_by FROM profiles p "
            "WHERE p.merged_into IS NULL AND p.is_anonymous = 0 ORDER BY p.cis DESC LIMIT ?",
            (limit * 4 if params is not None else limit,),  # scores decay: rank a wider set
        )
    else:
        prefix = _like_escape(needle) + "%"
        inner = "%" + _like_escape(needle.lower()) + "%"
        frame = wh.query(
            f"SELECT {cols}, 'customer id' AS matched_by, 0 AS rank FROM profiles p "
            "WHERE p.merged_into IS NULL AND (p.customer_id LIKE :prefix ESCAPE '\\' "
            "OR p.customer_id LIKE :anon ESCAPE '\\') "
            f"UNION ALL SELECT {cols}, 'e-mail', 1 FROM profiles p WHERE p.merged_into IS NULL "
            "AND lower(json_extract(p.profile, '$.traits.email')) LIKE :inner ESCAPE '\\' "
            f"UNION ALL SELECT {cols}, 'anonymous id ' || l.anonymous_id, 2 FROM identity_links l "
            "JOIN profiles p ON p.customer_id = l.customer_id "
            "WHERE l.anonymous_id LIKE :prefix ESCAPE '\\' "
            "ORDER BY rank, cis DESC LIMIT :limit",
            {"prefix": prefix, "anon": ANON_PREFIX + prefix, "inner": inner, "limit": limit * 3},
        )
        frame = frame.drop_duplicates("customer_id").drop(columns="rank")
    if params is not None and at_ms is not None and not frame.empty:
        now = [member_row(orjson.loads(raw), params, at_ms) for raw in frame["profile"]]
        frame["cis"] = [row["score"] for row in now]
        frame["intent_stage"] = [row["intent_stage"] for row in now]
        if not needle:
            frame = frame.sort_values("cis", ascending=False, kind="stable")
    frame = frame.drop(columns="profile").head(limit)
    frame["is_anonymous"] = frame["is_anonymous"].astype(bool)
    frame["last_seen"] = _to_time(frame["last_seen_ms"])
    return frame.drop(columns="last_seen_ms").reset_index(drop=True)


@dataclass(frozen=True, slots=True)
class Customer360:
    """Everything the workbench shows about one customer."""

    customer_id: str
    requested_id: str
    profile: dict[str, Any]
    score: ScoreBreakdown
    intent_stage: IntentStage
    at_ms: int
    category_affinity: pd.DataFrame
    brand_affinity: pd.DataFrame
    event_counts: pd.DataFrame
    timeline: pd.DataFrame
    identities: pd.DataFrame


def _affinity_frame(affinity: dict[str, float], label: str) -> pd.DataFrame:
    shares = affinity_shares(affinity)
    return pd.DataFrame(
        [(k, v, affinity[k]) for k, v in shares.items()], columns=[label, "share", "weight"]
    )


def customer_timeline(wh: LocalWarehouse, customer_id: str, *, limit: int = 200) -> pd.DataFrame:
    """The customer's newest stored events (event time first), with end-to-end latency."""
    frame = wh.query(
        "SELECT event_ts_ms, event_name, product_id, category, brand, revenue, device_type, "
        "anonymous_id, session_id, merged_from, message_id, stored_ms - ingested_ms AS latency_ms "
        "FROM events WHERE customer_id = ? ORDER BY event_ts_ms DESC, message_id LIMIT ?",
        (customer_id, limit),
    )
    frame.insert(0, "time", _to_time(frame["event_ts_ms"]))
    return frame.drop(columns="event_ts_ms")


def customer_identities(
    wh: LocalWarehouse, customer_id: str, profile: dict[str, Any]
) -> pd.DataFrame:
    """Devices (anonymous ids) tied to the customer, with the provenance of each link.

    Combines the identity links table (latest link per device), the merge records kept in the
    profile (earliest link, via which message) and the devices seen in the customer's events.
    """
    links = wh.query(
        "SELECT anonymous_id, linked_ms, via_message_id, merged_events, previous_customer_id "
        "FROM identity_links WHERE customer_id = ?",
        (customer_id,),
    ).set_index("anonymous_id")
    seen = wh.query(
        "SELECT anonymous_id, group_concat(DISTINCT device_type) AS device_types, "
        "COUNT(*) AS events, SUM(merged_from IS NOT NULL) AS merged_history_events, "
        "MIN(event_ts_ms) AS first_seen_ms, MAX(event_ts_ms) AS last_seen_ms "
        "FROM events WHERE customer_id = ? AND anonymous_id IS NOT NULL GROUP BY anonymous_id",
        (customer_id,),
    ).set_index("anonymous_id")
    link_of: dict[str, dict[str, Any]] = links.to_dict("index")  # type: ignore[assignment]
    seen_of: dict[str, dict[str, Any]] = seen.to_dict("index")  # type: ignore[assignment]
    merges: dict[str, dict[str, Any]] = profile.get("anonymous_ids") or {}
    rows = []
    for anon in sorted(set(link_of) | set(seen_of) | set(merges)):
        link, merge, events = link_of.get(anon), merges.get(anon), seen_of.get(anon)
        sources = [
            name
            for name, found in (
                ("identity link", link),
                ("profile merge", merge),
                ("events", events),
            )
            if found is not None
        ]
        first = link or {}
        rows.append(
            {
                "anonymous_id": anon,
                "device_types": (events or {}).get("device_types"),
                "events": int((events or {}).get("events") or 0),
                "merged_history_events": int((events or {}).get("merged_history_events") or 0),
                "linked_ms": first.get("linked_ms", (merge or {}).get("linked_ms")),
                "via_message_id": first.get("via_message_id", (merge or {}).get("via")),
                "previous_customer_id": first.get("previous_customer_id"),
                "first_seen_ms": (events or {}).get("first_seen_ms"),
                "last_seen_ms": (events or {}).get("last_seen_ms"),
                "provenance": " + ".join(sources),
            }
        )
    frame = pd.DataFrame.from_records(
        rows,
        columns=[
            "anonymous_id",
            "device_types",
            "events",
            "merged_history_events",
            "linked_ms",
            "via_message_id",
            "previous_customer_id",
            "first_seen_ms",
            "last_seen_ms",
            "provenance",
        ],
    )
    for col in ("linked", "first_seen", "last_seen"):
        frame[col] = _to_time(frame.pop(f"{col}_ms").astype("float64"))
    return frame


def customer_360(
    wh: LocalWarehouse,
    customer_id: str,
    params: ScoringParams,
    *,
    at_ms: int,
    timeline_limit: int = 200,
) -> Customer360:
    """Profile, score breakdown and stage at ``at_ms``, affinities, timeline and identities.

    An anonymous id that was merged leads to its customer; raises ProfileNotFoundError when
    nothing matches.
    """
    requested = customer_id
    if not customer_id.startswith(ANON_PREFIX):
        linked = wh.scalar(
            "SELECT customer_id FROM identity_links WHERE anonymous_id = ?", (customer_id,)
        )
        exists = wh.scalar("SELECT 1 FROM profiles WHERE customer_id = ?", (customer_id,))
        if linked is not None and exists is None:
            customer_id = str(linked)
    try:
        stored = wh.get_profile(customer_id)
    except ProfileNotFoundError:
        if customer_id.startswith(ANON_PREFIX):
            raise
        try:  # the raw anonymous id of a visitor who never signed in
            stored = wh.get_profile(ANON_PREFIX + customer_id)
        except ProfileNotFoundError:
            raise ProfileNotFoundError(f"no profile for customer {requested!r}") from None
    profile = profile_from_dict(stored)
    resolved = profile.customer_id
    by_count = sorted(profile.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    counts = pd.DataFrame(by_count, columns=["event_name", "events"])
    return Customer360(
        customer_id=resolved,
        requested_id=requested,
        profile=stored,
        score=interaction_score(profile, at_ms, params),
        intent_stage=intent_stage(profile, at_ms, params),
        at_ms=at_ms,
        category_affinity=_affinity_frame(profile.category_affinity, "category"),
        brand_affinity=_affinity_frame(profile.brand_affinity, "brand"),
        event_counts=counts,
        timeline=customer_timeline(wh, resolved, limit=timeline_limit),
        identities=customer_identities(wh, resolved, stored),
    )


def score_contributions(score: ScoreBreakdown, params: ScoringParams) -> pd.DataFrame:
    """Points each component adds to the score (weight x component x 100; they sum to it)."""
    parts = (
        ("recency", params.weight_recency, score.recency),
        ("frequency", params.weight_frequency, score.frequency),
        ("monetary", params.weight_monetary, score.monetary),
    )
    return pd.DataFrame(
        [(name, value, weight, 100.0 * weight * value) for name, weight, value in parts],
        columns=["component", "value", "weight", "points"],
    )


def identity_graph(view: Customer360) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (id, label, kind, x, y) and edges (source, target, label) of the identity graph:
    the customer in the centre, its devices around it, each device's device types outside."""
    nodes: list[dict[str, Any]] = [
        {"id": view.customer_id, "label": view.customer_id, "kind": "customer", "x": 0.0, "y": 0.0}
    ]
    edges: list[dict[str, Any]] = []
    ids = view.identities
    n = max(1, len(ids))
    for i, row in enumerate(ids.to_dict("records")):
        angle = 2 * math.pi * i / n
        anon = str(row["anonymous_id"])
        nodes.append(
            {
                "id": anon,
                "label": anon[:8] + "…" if len(anon) > 9 else anon,
                "kind": "device",
                "x": math.cos(angle),
                "y": math.sin(angle),
            }
        )
        linked = row["linked"]
        when = f" at {linked:%Y-%m-%d %H:%M}" if isinstance(linked, pd.Timestamp) else ""
        edges.append(
            {
                "source": view.customer_id,
                "target": anon,
                "label": f"{row['provenance']}{when}; via {row['via_message_id']}",
            }
        )
        for j, dtype in enumerate(str(row["device_types"] or "").split(",")):
            if not dtype:
                continue
            node_id = f"{anon}/{dtype}"
            offset = (j - 0.5) * 0.3
            nodes.append(
                {
                    "id": node_id,
                    "label": dtype,
                    "kind": "device type",
                    "x": 1.6 * math.cos(angle + offset),
                    "y": 1.6 * math.sin(angle + offset),
                }
            )
            edges.append({"source": anon, "target": node_id, "label": f"{row['events']} events"})
    return (
        pd.DataFrame(nodes, columns=["id", "label", "kind", "x", "y"]),
        pd.DataFrame(edges, columns=["source", "target", "label"]),
    )


OPEN_ALERT_WINDOW_MS = 30 * 60_000
ALERT_COLUMNS = (
    "severity",
    "kind",
    "subject",
    "observed",
    "expected",
    "at",
    "alerts",
    "at_ms",
)
_RECENT_ROWS = 1000


def _has_table(wh: LocalWarehouse, name: str) -> bool:
    """False for a warehouse written before ``name`` existed (read-only handles add nothing)."""
    exists = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)"
    return bool(wh.scalar(exists, (name,)))


def data_time_ms(wh: LocalWarehouse) -> int | None:
    """The newest broker time the warehouse has seen: its data's "now" (None when empty).

    The newest alert, and the newest of the last rows written to events and dead letters
    (newest rowids: cheap on a large table, and partitions written out of order are covered).
    """
    parts = [
        f"SELECT MAX(ingested_ms) AS t FROM (SELECT ingested_ms FROM {table} "
        f"ORDER BY rowid DESC LIMIT {_RECENT_ROWS})"
        for table in ("events", "dead_letters")
    ]
    if _has_table(wh, "alerts"):
        parts.append("SELECT MAX(at_ms) AS t FROM alerts")
    newest = wh.scalar(f"SELECT MAX(t) FROM ({' UNION ALL '.join(parts)})")
    return None if newest is None else int(newest)


def open_alerts(
    wh: LocalWarehouse, *, window_ms: int = OPEN_ALERT_WINDOW_MS, as_of_ms: int | None = None
) -> pd.DataFrame:
    """The open anomaly alerts: per (kind, subject), the newest one raised within ``window_ms``
    before ``as_of_ms``, critical first, then newest first; ``alerts`` counts that window's.

    ``as_of_ms`` defaults to :func:`data_time_ms`, not the wall clock: the detectors run on
    broker time, so a simulated or replayed period (which lies in the past) shows the alerts
    of its own last ``window_ms``, and a live pipeline's data time is about now. Detectors
    repeat an alert while its condition lasts (bots, clock skew) or per judged bucket (volume,
    dead letters), so an alert is "open" while raised again within the window.
    """
    empty = pd.DataFrame(columns=list(ALERT_COLUMNS))
    if not _has_table(wh, "alerts"):
        return empty
    as_of = data_time_ms(wh) if as_of_ms is None else as_of_ms
    if as_of is None:
        return empty
    frame = wh.query(
        "SELECT severity, kind, subject, observed, expected, at_ms, alerts FROM ("
        " SELECT *, ROW_NUMBER() OVER (PARTITION BY kind, subject"
        "  ORDER BY at_ms DESC, severity, alert_id) AS newest,"
        "  COUNT(*) OVER (PARTITION BY kind, subject) AS alerts"
        " FROM alerts WHERE at_ms > ? AND at_ms <= ?"
        ") WHERE newest = 1 "
        "ORDER BY severity = 'critical' DESC, at_ms DESC, kind, subject",
        (as_of - window_ms, as_of),
    )
    if frame.empty:
        return empty
    frame["at"] = _to_time(frame["at_ms"])
    return frame[list(ALERT_COLUMNS)]
