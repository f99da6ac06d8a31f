"""The scale-out benchmark behind ``pipeline bench --scaleout``: 1 vs N processor replicas.

On one fresh embedded broker the same simulated backlog is produced once; then, for each replica
count, that many ``pipeline process`` children consume it from the start in a consumer group of
their own, with intermediate topics and a warehouse of their own; they join the group together
(one rebalance, not one per late starter). Throughput is the backlog's raw messages over the
time from the first message read to the last event stored (every replica's clock is the same
``time.monotonic``), as in ``pipeline bench``'s full-path figure. A run ends when every valid
event the simulator knows of is stored and the group's counters are drained and still.

A run that stalls (nothing moves for a minute before it is done) or whose replica dies is
recorded with its error, naming what each stage misses and which partitions lag, and the other
replica counts are still measured; the report counts such runs in ``failed_runs``.

Then the per-customer results of every completed run are compared with the first one's. What is
compared is what the pipeline promises whatever the arrival order, since Kafka orders records
only within a partition: a customer's devices reach the profile stage through different
partitions, and a device's records switch partition when its key changes from anonymousId to
userId at login, so even two runs of one replica interleave them differently. Compared exactly:
the set of events per customer; the set of live profiles (not merged into another); per profile
the counts, the version (one per applied record: a lost or doubly applied event changes it),
event-time bookkeeping (first/last seen, last order/cart/view), devices, provenance of merged
devices and identify traits (newest wins by event time). Compared to 1e-9: the decayed sums and
the score, which are order-independent sums (see :mod:`pipeline.scoring`) whose floating-point
rounding is not. Left out, each for the reason in :data:`ORDER_DEPENDENT`: wall-clock stamps and
the fields that by design depend on arrival order; how many customers differ in those is
reported too.
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.errors import ConfigurationError, PipelineError
from pipeline.metrics import cpu_seconds
from pipeline.replicas import ReplicaError, aggregate, spawn_replicas, stop_replicas
from pipeline.settings import Settings, TopicNames
from pipeline.stores.local import LocalWarehouse

log = logging.getLogger(__name__)

PROFILE_FIELDS_EXACT = (
    "is_anonymous",
    "merged_into",
    "event_count",
    "version",
    "counts",
    "order_count",
    "first_seen_ms",
    "last_seen_ms",
    "as_of_ms",
    "last_order_ms",
    "last_cart_ms",
    "last_view_ms",
    "devices",
    "anonymous_ids",
    "traits",
    "traits_ms",
)
PROFILE_FIELDS_CLOSE = ("engagement", "monetary", "revenue_total", "cis")
REL_TOL = 1e-9
ORDER_DEPENDENT: dict[str, str] = {
    "updated_ms": "wall-clock time of processing",
    "stored_ms": "wall-clock time of storing",
    "sessions": "a session older than the 10 newest, arriving late, is counted again",
    "recent_sessions": "the newest session ids, in arrival order",
    "last_session_id": "the last record to arrive",
    "recent_views": "late views only fill free room, in arrival order",
    "purchased": "late orders only fill free room, in arrival order",
    "cart": "a change older than a line's 20 newest, arriving late, is approximated",
    "cart_log": "the changes of a line as they arrived, summed when past 20",
    "intent_stage": "reads the cart",
    "category_affinity": "clamped at 0 after every record (see pipeline.scoring)",
    "brand_affinity": "clamped at 0 after every record (see pipeline.scoring)",
    "timezone": "the last record's context timezone wins",
    "hour_of_week": "a record without a timezone is binned in the profile's current one",
    "segments": "rules may read the cart, intent and affinities",
    "segments_ms": "the trigger scan's clock, which ticks on a wall-clock schedule",
}
DIFFERENCES_SHOWN = 20


def customer_results(warehouse: LocalWarehouse) -> dict[str, dict[str, Any]]:
    """Per customer with a live profile or stored events: the profile fields and events that
    must not depend on arrival order (see the module docstring), and the other fields apart."""
    results: dict[str, dict[str, Any]] = {}
    live = warehouse.query("SELECT customer_id, profile FROM profiles WHERE merged_into IS NULL")
    for customer, raw in live.itertuples(index=False):
        profile = orjson.loads(raw)
        results[str(customer)] = {
            "profile": {k: profile.get(k) for k in PROFILE_FIELDS_EXACT + PROFILE_FIELDS_CLOSE},
            "order_dependent": {k: profile.get(k) for k in ORDER_DEPENDENT if k in profile},
            "events": [],
        }
    events = warehouse.query("SELECT customer_id, message_id FROM events ORDER BY 1, 2")
    for customer, message_id in events.itertuples(index=False):
        entry = results.setdefault(
            str(customer), {"profile": None, "order_dependent": None, "events": []}
        )
        entry["events"].append(str(message_id))
    return results


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL)
    return bool(a == b)


def differences(
    baseline: Mapping[str, Mapping[str, Any]], other: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[str]]:
    """Customer id -> what differs between two runs' :func:`customer_results` (empty: none)."""
    found: dict[str, list[str]] = {}
    for customer in sorted(set(baseline) | set(other)):
        a, b = baseline.get(customer), other.get(customer)
        if a is None or b is None:
            found[customer] = ["missing in the first run" if a is None else "missing"]
            continue
        diff: list[str] = []
        if a["events"] != b["events"]:
            diff.append(f"events ({len(a['events'])} vs {len(b['events'])})")
        pa, pb = a["profile"], b["profile"]
        if (pa is None) != (pb is None):
            diff.append("live profile")
        elif pa is not None and pb is not None:
            diff.extend(f for f in PROFILE_FIELDS_EXACT if pa[f] != pb[f])
            diff.extend(f for f in PROFILE_FIELDS_CLOSE if not _close(pa[f], pb[f]))
        if diff:
            found[customer] = diff
    return found


def _order_dependent_differences(
    baseline: Mapping[str, Mapping[str, Any]], other: Mapping[str, Mapping[str, Any]]
) -> dict[str, int]:
    """Per left-out field, how many customers differ in it (for the report, not the verdict)."""
    counts = {f: 0 for f in ORDER_DEPENDENT}
    for customer, a in baseline.items():
        b = other.get(customer)
        if b is None or a["order_dependent"] is None or b["order_dependent"] is None:
            continue
        for f in ORDER_DEPENDENT:
            if a["order_dependent"].get(f) != b["order_dependent"].get(f):
                counts[f] += 1
    return {f: n for f, n in counts.items() if n}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _stored_events(path: Path, opened: list[LocalWarehouse]) -> int:
    """Events in the warehouse at ``path`` (0 before a replica created it); opened once."""
    try:
        if not opened:
            if not path.exists():
                return 0
            opened.append(LocalWarehouse(path, read_only=True))
        return int(opened[0].scalar("SELECT COUNT(*) FROM events"))
    except (PipelineError, sqlite3.Error):
        return 0  # the file exists, its tables not yet


class ScaleoutStalled(PipelineError):
    """A replica run stopped making progress before every expected event was stored."""


def measure_replicas(
    settings: Settings,
    count: int,
    address: str,
    *,
    expected_raw: int,
    expected_stored: int,
    idle_s: float = 1.5,
    stall_s: float = 60.0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run ``count`` replicas over the backlog at ``address`` until drained (see module doc).

    ``settings.home`` must be this run's own directory; it is emptied first. A run whose
    counters and store stay still for ``stall_s`` before it is done raises
    :class:`ScaleoutStalled`, naming what each stage is missing and the partitions that lag.
    """
    home = settings.home
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    logs: dict[int, IO[bytes]] = {}

    def output(index: int) -> IO[bytes]:
        logs[index] = (home / f"replica-{index}.log").open("wb")
        return logs[index]

    go = home / "go"
    children = spawn_replicas(settings, count, address, output=output, start_after=go)
    opened: list[LocalWarehouse] = []
    started = time.monotonic()
    try:
        last: tuple[int, ...] = ()
        still_since = time.monotonic()
        while True:
            time.sleep(0.2)
            for r in children:
                if r.process.poll() is not None:
                    raise ReplicaError(
                        f"replica {r.instance_id} exited with code {r.process.returncode} "
                        f"during the {count}-replica run:\n{_tail(home / f'replica-{r.index}.log')}"
                    )
            if time.monotonic() - started > timeout_s:
                raise PipelineError(
                    f"{count} replicas did not store the {expected_stored} expected events "
                    f"within {timeout_s:.0f}s"
                )
            statuses = [r.status() for r in children]
            if any(s is None or s["state"] in ("starting", "ready") for s in statuses):
                # all join the group together: one rebalance, not one per late replica
                if all(s is not None and s["state"] == "ready" for s in statuses):
                    go.touch()
                continue
            group = aggregate([s for s in statuses if s is not None])
            stored = _stored_events(settings.warehouse_path, opened)
            now = (*group.progress(), stored)
            if now != last:
                last, still_since = now, time.monotonic()
            elif stored >= expected_stored and group.drained(expected_raw):
                if time.monotonic() - still_since >= idle_s:
                    break
            elif time.monotonic() - still_since >= stall_s:
                raise ScaleoutStalled(
                    f"{count} replicas made no progress for {stall_s:.0f}s: "
                    + stall_diagnosis(statuses, expected_raw, stored, expected_stored)
                )
    finally:
        codes = stop_replicas(children)
        for f in logs.values():
            f.close()
        for wh in opened:
            wh.close()
    finals = [r.status() or {} for r in children]
    group = aggregate(finals)
    if group.first_in_s is None or group.last_stored_s is None:
        raise PipelineError(f"the {count}-replica run stored nothing")
    seconds = group.last_stored_s - group.first_in_s
    cpu_s = sum(
        s["last_stored_cpu_s"] - s["first_in_cpu_s"]
        for s in finals
        if s.get("first_in_cpu_s") is not None and s.get("last_stored_cpu_s") is not None
    )
    with LocalWarehouse(settings.warehouse_path, read_only=True) as wh:
        results = customer_results(wh)
        stored = int(wh.scalar("SELECT COUNT(*) FROM events"))
    return {
        "replicas": count,
        "events": expected_raw,
        "seconds": round(seconds, 3),
        "events_per_s": round(expected_raw / seconds, 1),
        # every replica's CPU seconds (all its threads) from its first message to its last store
        "cpu_s": round(cpu_s, 6),
        "events_per_cpu_s": round(expected_raw / cpu_s, 1) if cpu_s > 0 else None,
        "raw_read": group.raw_in,
        "events_stored": stored,
        "per_replica": [
            {
                "instance_id": r.instance_id,
                "pid": r.pid,
                "raw_read": s.get("raw_in", 0),
                "events_stored": s.get("events_stored", 0),
                "profiles_stored": s.get("profiles_stored", 0),
                "exit_code": codes.get(r.instance_id),
            }
            for r, s in zip(children, finals, strict=True)
        ],
        "_results": results,
    }


def stall_diagnosis(
    statuses: Sequence[Mapping[str, Any] | None],
    expected_raw: int,
    stored: int,
    expected_stored: int,
) -> str:
    """What a still group is missing, stage by stage, and which partitions lag on which replica.

    No lagging partition while a stage misses records means they were skipped, not waiting.
    """
    group = aggregate([s for s in statuses if s is not None])
    missing = [
        ("raw messages read", group.raw_in - group.rekeyed, expected_raw),
        ("attributed records read by stage 2", group.attributed_in, group.attributed_out),
        ("events stored", stored, expected_stored),
        ("profiles stored", group.profiles_stored, group.profile_updates),
    ]
    parts = [f"{what} {have:,} of {want:,}" for what, have, want in missing if have < want]
    lags = [
        f"{partition} {n:,} ({s.get('instance_id')})"
        for s in statuses
        if s is not None
        for partition, n in (s.get("lag") or {}).items()
    ]
    parts.append("lagging: " + ", ".join(lags) if lags else "no partition lags (skipped?)")
    return "; ".join(parts)


def _own_topics(topics: TopicNames, prefix: str) -> TopicNames:
    """Every topic but the raw one renamed: a run reading another run's intermediate topics
    from the start would do its work twice (its own consumer group reads them from offset 0)."""
    names = topics.model_dump()
    return TopicNames(**{k: v if k == "raw" else f"{prefix}.{v}" for k, v in names.items()})


def _event_counts(results: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    return {c: len(r["events"]) for c, r in results.items() if r["events"]}


def scaleout(
    settings: Settings,
    events: int,
    replicas: Sequence[int] = (1, 2),
    *,
    seed: int = 42,
    rounds: int = 1,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Measure throughput per replica count over one backlog and compare per-customer results.

    Works in ``settings.home / "bench" / "scaleout"`` on a fresh embedded broker whose topics
    have ``settings.partitions`` partitions, raised to the largest replica count (a replica
    beyond the partitions would sit idle). ``rounds`` > 1 repeats the whole sequence (1, 2,
    1, 2, ...): a replica count's figure is then the median of its runs, and every run is
    compared with the first.
    """
    from pipeline.runner import pipeline_run, produce_messages, simulate_for

    if not replicas or rounds < 1:
        raise ConfigurationError("scaleout needs at least one replica count and one round")
    work = settings.home / "bench" / "scaleout"
    partitions = max(settings.partitions, *replicas)
    base = settings.model_copy(update={"home": work, "broker": None, "partitions": partitions})
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with pipeline_run(base) as run:
        sim = simulate_for(base, events, seed, run.catalog)
        produce_s = produce_messages(base, run.address, sim.messages)
        truth = sim.ground_truth.expected_event_counts
        for i, count in enumerate([*replicas] * rounds, start=1):
            name = f"run{i}-{count}-replicas"
            run_settings = base.model_copy(
                update={
                    "home": work / name,
                    "consumer_group": f"{base.consumer_group}-scaleout-{name}",
                    "topics": _own_topics(base.topics, f"scaleout-{name}"),
                }
            )
            broker_before = _broker_cpu_s(run)
            try:
                measured = measure_replicas(
                    run_settings,
                    count,
                    run.address,
                    expected_raw=len(sim.messages),
                    expected_stored=sum(truth.values()),
                    timeout_s=timeout_s,
                )
            except ConfigurationError:
                raise
            except PipelineError as exc:  # recorded: the other counts still measure something
                log.error("%s failed: %s", name, exc)
                runs.append({"replicas": count, "events": len(sim.messages), "error": str(exc)})
                continue
            broker_after = _broker_cpu_s(run)
            if broker_before is not None and broker_after is not None:
                # replicas' start-up and shut-down included: an upper bound for the backlog
                measured["broker_cpu_s"] = round(broker_after - broker_before, 3)
            runs.append(measured)
    failed = [r for r in runs if "error" in r]
    done = [r for r in runs if "error" not in r]
    if not done:
        raise PipelineError(f"every replica run failed; the first: {failed[0]['error']}")
    results = [r.pop("_results") for r in done]
    for r, res in zip(done, results, strict=True):
        r["matches_truth"] = _event_counts(res) == dict(truth)
    first = done[0]
    per_count: dict[str, list[float]] = {}
    for r in done:
        per_count.setdefault(str(r["replicas"]), []).append(r["events_per_s"])
    eps = {n: round(statistics.median(values), 1) for n, values in per_count.items()}
    per_cpu: dict[str, list[float]] = {}
    for r in done:
        if r["events_per_cpu_s"] is not None:
            per_cpu.setdefault(str(r["replicas"]), []).append(r["events_per_cpu_s"])
    report: dict[str, Any] = {
        "events": len(sim.messages),
        "events_stored_truth": sum(truth.values()),
        "seed": seed,
        "partitions": base.partitions,
        "processing_guarantee": base.processing_guarantee,
        "produce_s": round(produce_s, 3),
        "rounds": rounds,
        "runs": runs,
        "failed_runs": len(failed),
        "events_per_s": eps,
        "speedup": {n: round(v / eps[str(first["replicas"])], 3) for n, v in eps.items()},
        "events_per_cpu_s": {n: round(statistics.median(v), 1) for n, v in per_cpu.items()},
        "customers_compared": len(results[0]),
        "compared_fields": ["events", *PROFILE_FIELDS_EXACT, *PROFILE_FIELDS_CLOSE],
        "left_out_fields": ORDER_DEPENDENT,
    }
    if "1" in eps and "2" in eps:
        report["ratio_2_to_1"] = round(eps["2"] / eps["1"], 3)
    differing: dict[str, list[str]] = {}
    comparisons = []
    for r, res in zip(done[1:], results[1:], strict=True):
        diff = differences(results[0], res)
        differing.update(diff)
        comparisons.append(
            {
                "replicas": [first["replicas"], r["replicas"]],
                "identical": not diff,
                "differing_customers": len(diff),
                "order_dependent_differences": _order_dependent_differences(results[0], res),
            }
        )
    report["comparisons"] = comparisons
    report["identical"] = not differing
    report["differing_customers"] = _shown(differing)
    report["duration_s"] = round(time.monotonic() - started, 1)
    return report


def _broker_cpu_s(run: Any) -> float | None:
    """CPU seconds the embedded broker has used so far (None for an external broker)."""
    if run.broker.embedded is None:
        return None
    return cpu_seconds(run.broker.embedded.process.pid)


def _shown(differing: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    return {c: list(d) for c, d in list(differing.items())[:DIFFERENCES_SHOWN]}


def scaleout_summary(report: Mapping[str, Any]) -> str:
    """One line: events/s and events per replica CPU-second per replica count, and the verdict."""
    per_cpu = report.get("events_per_cpu_s", {})
    counts = " · ".join(
        f"{n}: {eps:,.0f} ev/s ({per_cpu.get(n, 0):,.0f} per CPU-s)"
        for n, eps in report["events_per_s"].items()
    )
    speedup = ", ".join(f"{n}/1 = {v}" for n, v in report["speedup"].items() if n != "1")
    failed = [r for r in report["runs"] if "error" in r]
    failures = "".join(f"; {r['replicas']} replicas FAILED: {r['error']}" for r in failed)
    return (
        f"replicas {counts}; {speedup or 'one count'}; per-customer results identical: "
        f"{report['identical']}{failures}"
    )


def write_scaleout(report: Mapping[str, Any], home: Path) -> Path:
    """Write a ``--scaleout-only`` report to ``home/bench/<timestamp>-scaleout.json``."""
    out = home / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-scaleout.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return path
