"""Read-side views of the local warehouse for the workbench and notebooks.

Live throughput and latency, intent-stage segments, customer search and 360, identity graph and
data quality, as DataFrames and small records. Read-only: safe while the processor writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import orjson
import pandas as pd

from pipeline.events import CleanEvent
from pipeline.identity import ANON_PREFIX
from pipeline.scoring import (
    DAY_MS,
    IntentStage,
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


def _latencies(wh: LocalWarehouse, since_ms: int) -> pd.DataFrame:
    return wh.query(
        "SELECT stored_ms, stored_ms - ingested_ms AS latency_ms FROM events WHERE stored_ms >= ?",
        (since_ms,),
    )


def latency_summary(wh: LocalWarehouse, *, since_ms: int) -> dict[str, float]:
    """End-to-end latency (broker arrival to readable in the warehouse) percentiles, in ms."""
    lat = _latencies(wh, since_ms)["latency_ms"]
    if lat.empty:
        return {"events": 0.0, "p50": math.nan, "p95": math.nan, "p99": math.nan}
    q = lat.quantile([0.5, 0.95, 0.99])
    return {
        "events": float(len(lat)),
        "p50": float(q[0.5]),
        "p95": float(q[0.95]),
        "p99": float(q[0.99]),
    }


def latency_over_time(
    wh: LocalWarehouse, *, now_ms: int, minutes: float = 5.0, bucket_s: int = 5
) -> pd.DataFrame:
    """p50/p95/p99 end-to-end latency (ms) per ``bucket_s`` bucket of storage time."""
    since = now_ms - int(minutes * 60_000)
    lat = _latencies(wh, since)
    cols = ["time", "events", "p50", "p95", "p99"]
    if lat.empty:
        return pd.DataFrame(columns=cols)
    bucket_ms = bucket_s * 1000
    lat["bucket"] = lat["stored_ms"] // bucket_ms * bucket_ms
    grouped = lat.groupby("bucket")["latency_ms"]
    frame = pd.DataFrame(
        {
            "events": grouped.size(),
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


def _top(affinity: dict[str, float]) -> str | None:
    shares = affinity_shares(affinity)
    return next(iter(shares), None)


def _name(traits: dict[str, Any]) -> str | None:
    parts = [traits.get("firstName"), traits.get("lastName")]
    name = " ".join(str(p) for p in parts if p)
    return name or (str(traits["name"]) if traits.get("name") else None)


def member_row(stored: dict[str, Any], params: ScoringParams, at_ms: int) -> dict[str, Any]:
    """One customer's segment row: score and intent stage re-evaluated at ``at_ms``."""
    profile = profile_from_dict(stored)
    score = interaction_score(profile, at_ms, params)
    traits = profile.traits
    return {
        "customer_id": profile.customer_id,
        "email": traits.get("email"),
        "name": _name(traits),
        "is_anonymous": profile.is_anonymous,
        "intent_stage": intent_stage(profile, at_ms, params),
        "score": score.score,
        "recency": score.recency,
        "frequency": score.frequency,
        "monetary": score.monetary,
        "revenue_total": profile.revenue_total,
        "order_count": profile.order_count,
        "event_count": profile.event_count,
        "top_category": _top(profile.category_affinity),
        "top_brand": _top(profile.brand_affinity),
        "last_seen_ms": profile.last_seen_ms,
    }


def segment_members(
    wh: LocalWarehouse, params: ScoringParams, *, at_ms: int, include_anonymous: bool = False
) -> pd.DataFrame:
    """Every live profile (not merged away) with score and intent stage at ``at_ms``.

    Stored profiles carry the stage as of their newest event; re-evaluating at ``at_ms`` lets
    customers drift to ``lapsed`` without new events. Sorted by score, highest first.
    """
    sql = "SELECT profile FROM profiles WHERE merged_into IS NULL"
    if not include_anonymous:
        sql += " AND is_anonymous = 0"
    stored = wh.query(sql)["profile"]
    rows = [member_row(orjson.loads(p), params, at_ms) for p in stored]
    frame = pd.DataFrame.from_records(rows, columns=[*MEMBER_COLUMNS[:-1], "last_seen_ms"])
    frame["last_seen"] = _to_time(frame["last_seen_ms"])
    frame = frame.drop(columns="last_seen_ms")
    frame["intent_stage"] = pd.Categorical(frame["intent_stage"], categories=list(STAGES))
    return frame.sort_values(["score", "customer_id"], ascending=[False, True]).reset_index(
        drop=True
    )


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


def members_csv(members: pd.DataFrame) -> bytes:
    """The members table as UTF-8 CSV for export (times in ISO-8601 UTC)."""
    return members.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ").encode("utf-8")


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
    with :func:`pipeline.scoring.apply_event` and the stage is read at every day end. Customers
    are taken in id order until ``max_events`` events, to bound the work.
    """
    known = "" if include_anonymous else "AND customer_id NOT LIKE :anon"
    per_customer = wh.query(
        f"SELECT customer_id, COUNT(*) AS n FROM events WHERE 1 = 1 {known} "
        "GROUP BY customer_id ORDER BY customer_id",
        {"anon": ANON_PREFIX + "%"},
    )
    covered = per_customer[per_customer["n"].cumsum() <= max_events]["customer_id"].tolist()
    boundaries = [end_ms - k * DAY_MS for k in range(days - 1, -1, -1)]
    counts = {(b, s): 0 for b in boundaries for s in STAGES}
    if covered:
        events = wh.query(
            f"SELECT customer_id, payload FROM events WHERE customer_id <= :last {known} "
            "ORDER BY customer_id, event_ts_ms, message_id",
            {"last": covered[-1], "anon": ANON_PREFIX + "%"},
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


def search_customers(wh: LocalWarehouse, text: str, *, limit: int = 25) -> pd.DataFrame:
    """Profiles matching ``text`` by customer id prefix, e-mail substring or anonymous id prefix
    (a merged device leads to its customer); with no text, the highest-scoring customers."""
    cols = (
        "p.customer_id, json_extract(p.profile, '$.traits.email') AS email, p.is_anonymous, "
        "p.intent_stage, p.cis, p.event_count, p.last_seen_ms"
    )
    needle = text.strip()
    if not needle:
        frame = wh.query(
            f"SELECT {cols}, 'top score' AS matched_by FROM profiles p "
            "WHERE p.merged_into IS NULL AND p.is_anonymous = 0 ORDER BY p.cis DESC LIMIT ?",
            (limit,),
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
        frame = frame.drop_duplicates("customer_id").drop(columns="rank").head(limit)
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
    stored = wh.get_profile(customer_id)
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
