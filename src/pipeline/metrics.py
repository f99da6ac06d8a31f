"""In-process counters and latency samples of a running processor, and its consumer lag.

Counters are plain ints updated from the processing thread and read from others (the GIL makes
single increments safe); the demo, tests and the Prometheus exporter read them.

Consumer lag comes from librdkafka's statistics (``statistics.interval.ms`` + ``stats_cb``, see
:func:`consumer_stats_config`), parsed by :func:`consumer_lag_from_stats`. Lag there is counted
from the consumer's *position*, not from librdkafka's own ``consumer_lag`` fields: those count
from the committed offset (``consumer_lag``) or from the stored offset (``consumer_lag_stored``),
and in this processor neither moves: under exactly-once the offsets are committed by the
transactional producer, so the consumer's ``committed_offset`` stays at what it fetched on
assignment (-1001 for a new group), and quixstreams never stores offsets
(``enable.auto.offset.store=false``). Both fields then read -1 while the processor runs.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson

from pipeline.errors import ProcessingTimeout
from pipeline.gc_pauses import GcPauses
from pipeline.lineage import durations

log = logging.getLogger(__name__)
_T = TypeVar("_T")

LATENCY_SAMPLES = 500_000
STEP_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000)
"""Upper bounds of the per-step latency histograms (lineage), in milliseconds."""
CONSUMER_LAG_STALE_S = 60.0
CPU_STEPS: tuple[str, ...] = ("parse", "detect", "enrich", "stitch", "fold", "store")
"""The processor's own steps whose CPU time is counted (``StreamMetrics.step_cpu_s``): parse and
validate, anomaly detection, catalog enrichment, dedupe and identity stitching (state reads
and writes included), scoring and segments (likewise), and the warehouse writes. What the
process spends beyond them goes to the stream framework, the Kafka client and serialization."""
"""A client whose statistics are older than this (closed consumer, departed replica) is ignored."""

TopicPartitionLag = dict[tuple[str, int], int]

# librdkafka's fetch states of a partition this client is not (or no longer) fetching
_NOT_FETCHING = frozenset({"none", "stopping", "stopped"})


def broker_requests_from_stats(stats: Mapping[str, Any]) -> dict[str, int]:
    """Requests one client has sent to the brokers since it started, by Kafka API (``Fetch``,
    ``Produce``, ``EndTxn``, ...), summed over its broker connections (librdkafka's per-broker
    ``req``; the coordinator's connection included). APIs never sent are left out.

    On the embedded broker each request costs about a millisecond of broker CPU, an idle
    long-poll fetch too, so requests per event tell why paced traffic costs it more per
    event than a backlog, which it serves in large batches.
    """
    brokers = stats.get("brokers")
    totals: Counter[str] = Counter()
    if not isinstance(brokers, Mapping):
        return {}
    for broker in brokers.values():
        requests = broker.get("req") if isinstance(broker, Mapping) else None
        if not isinstance(requests, Mapping):
            continue
        for api, count in requests.items():
            if isinstance(count, int) and count > 0:
                totals[str(api)] += count
    return dict(totals)


def consumer_lag_from_stats(stats: Mapping[str, Any]) -> TopicPartitionLag:
    """Messages behind the high watermark per (topic, partition) of one statistics object.

    Lag is ``hi_offset - position``, position being the newest of ``app_offset`` (offset of the
    last message handed to the application + 1), ``committed_offset`` and ``stored_offset``;
    it is up to date whether or not this consumer commits (see the module docstring). The high
    watermark rather than the last stable offset is the end, so a transaction that never ends
    (which blocks read_committed readers) shows as growing lag, not as none.

    A partition that has handed over nothing and has no committed offset counts from its fetch
    position (``next_offset``) while nothing is prefetched for it (``fetchq_cnt`` 0): one paused
    from its assignment on (state recovery that never ends, say) shows its whole backlog as lag
    instead of no lag at all.

    Left out: partition -1 (librdkafka's unassigned-messages queue), partitions this client
    does not fetch (``fetch_state`` none/stopping/stopped: not assigned, or revoked), and
    partitions whose lag is unknown (no high watermark yet, or nothing handed over, no committed
    offset and messages prefetched: where the application's position is, is not reported).
    """
    lags: TopicPartitionLag = {}
    topics = stats.get("topics")
    if not isinstance(topics, Mapping):
        return lags
    for topic, topic_stats in topics.items():
        partitions = topic_stats.get("partitions") if isinstance(topic_stats, Mapping) else None
        if not isinstance(partitions, Mapping):
            continue
        for p in partitions.values():
            if not isinstance(p, Mapping):
                continue
            partition = p.get("partition")
            if type(partition) is not int or partition < 0:
                continue
            if p.get("fetch_state", "none") in _NOT_FETCHING:
                continue
            hi = p.get("hi_offset")
            if type(hi) is not int or hi < 0:
                continue
            offsets = [p.get(k) for k in ("app_offset", "committed_offset", "stored_offset")]
            known = [o for o in offsets if type(o) is int and o >= 0]
            if not known:
                fetch_at, queued = p.get("next_offset"), p.get("fetchq_cnt")
                if type(fetch_at) is not int or fetch_at < 0 or queued != 0:
                    continue
                known = [fetch_at]
            lags[(str(topic), partition)] = max(0, hi - max(known))
    return lags


def cpu_per_event(
    step_cpu_s: Mapping[str, float], events: int, process_cpu_s: float | None = None
) -> dict[str, float]:
    """CPU microseconds per raw event of each step (:data:`CPU_STEPS`); given the whole
    process's CPU over the same events, also ``framework`` (the rest) and ``total``."""
    if not events:
        return {}
    per = {step: seconds / events * 1e6 for step, seconds in step_cpu_s.items()}
    if process_cpu_s is not None:
        rest = process_cpu_s - sum(step_cpu_s.values())
        per["framework"] = max(0.0, rest) / events * 1e6
        per["total"] = process_cpu_s / events * 1e6
    return per


CPU_SAMPLE_EVERY = 16
"""One message in this many has its steps' CPU read (:class:`SampledCpuClock`)."""


def _unsampled() -> float:
    return 0.0


class SampledCpuClock:
    """The thread's CPU clock for one message in ``every``, scaled by ``every``; 0 otherwise.

    Reading a thread's CPU clock is a system call (``CLOCK_THREAD_CPUTIME_ID`` has no vDSO
    path): 0.6 us alone, yet seven readings per event cost the processor 7-34% of its
    throughput here (six interleaved runs of 40,000 events). Read for one message in 16 and
    scaled, the per-step split is an estimate from thousands of samples over any backlog at a
    sixteenth of the cost. A step's duration is ``clock() - start`` with both readings taken
    from the same ``clock`` (the one :meth:`for_message` gave for that message).
    """

    def __init__(
        self, every: int = CPU_SAMPLE_EVERY, read: Callable[[], float] = time.thread_time
    ) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.every = every
        self._read = read
        self._countdown = 1  # the first message is sampled

    def for_message(self) -> Callable[[], float]:
        """The clock for the next message's steps."""
        self._countdown -= 1
        if self._countdown:
            return _unsampled
        self._countdown = self.every
        return self._scaled

    def _scaled(self) -> float:
        return self._read() * self.every


@dataclass
class StreamMetrics:
    """What the processor has done since it started."""

    raw_in: int = 0
    valid: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    duplicates_dropped: int = 0
    replays_dropped: int = 0
    identities_linked: int = 0
    identities_merged: int = 0
    events_merged: int = 0
    profile_updates: int = 0
    stitched_in: int = 0
    attributed_out: int = 0
    attributed_in: int = 0
    clean_out: int = 0
    segment_changes: int = 0
    suppressed: int = 0
    erasures: int = 0  # erasure requests carried out by stage 1 (one per device or user key)
    profiles_erased: int = 0  # profiles deleted by stage 2 and cleared from the warehouse
    rekeyed: int = 0  # raw messages sent round again under their device key
    # checkpoints the processing loop committed, and the wall seconds it spent in them (sinks
    # and producer flushed, transaction committed, state flushed): in an exactly-once loop
    # that is where it waits on the broker, and no message is processed meanwhile
    checkpoints: int = 0
    checkpoint_s: float = 0.0
    events_stored: int = 0
    profiles_stored: int = 0
    dead_letters_stored: int = 0
    alerts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, severity)
    # the newest samples only: a long-running processor must not grow with every event
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    latency_samples: int = 0  # ever appended to latencies_ms (fewer than events_stored)
    # per lineage step: histogram counts over STEP_BUCKETS_MS (+Inf last) and the sum in ms
    step_counts: dict[str, list[int]] = field(default_factory=dict)
    step_sum_ms: dict[str, float] = field(default_factory=dict)
    # CPU seconds of the thread that ran each step: where a processor core goes (the stream's
    # steps are sampled, one message in CPU_SAMPLE_EVERY: see SampledCpuClock; the warehouse
    # writes are read per batch)
    step_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CPU_STEPS, 0.0))
    first_in_s: float | None = None
    last_stored_s: float | None = None
    # this process's CPU time (all threads) at the first raw message and the last event stored:
    # the CPU a processor spent on a backlog, whatever else shares the machine
    first_in_cpu_s: float | None = None
    last_stored_cpu_s: float | None = None
    # per librdkafka client name: (monotonic time of its statistics, its lag); replaced, never
    # mutated, so a scrape on another thread always reads one whole report
    consumer_lag_reports: dict[str, tuple[float, TopicPartitionLag]] = field(default_factory=dict)
    # monotonic time of the newest statistics report; from creation on, so that a loop that
    # hangs before its first report (state recovery, first assignment) shows as hung too
    last_stats_s: float | None = field(default_factory=time.monotonic)
    # per librdkafka client name: its type ("consumer", "producer") and the requests it has
    # sent by Kafka API (broker_requests_from_stats); replaced, never mutated, like the lag
    request_reports: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)
    # the cyclic garbage collector's pauses while the processing loop runs (it stops for each)
    gc: GcPauses = field(default_factory=GcPauses, repr=False, compare=False)
    _reports_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _latency_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _store_cpu_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def on_consumer_stats(self, stats_json: str) -> None:
        """librdkafka ``stats_cb``: record the consumer lag of one statistics report.

        Runs on the thread that polls the consumer; it never raises, since an exception
        here would surface from ``poll()`` and stop the processor.
        """
        read = _read_stats(
            stats_json, lambda s: (consumer_lag_from_stats(s), broker_requests_from_stats(s))
        )
        if read is None:
            return
        client, (lag, requests) = read
        now = time.monotonic()
        with self._reports_lock:  # consumers of several replicas may report at once
            reports = {**self.consumer_lag_reports, client: (now, lag)}
            self.consumer_lag_reports = reports
            self.request_reports = {**self.request_reports, client: ("consumer", requests)}
            self.last_stats_s = now  # the loop polled: it is alive, whatever the lag

    def on_producer_stats(self, stats_json: str) -> None:
        """librdkafka ``stats_cb`` of a producer: record the requests it has sent. Never
        raises (it runs inside the producer's ``poll()``)."""
        read = _read_stats(stats_json, broker_requests_from_stats)
        if read is None:
            return
        client, requests = read
        with self._reports_lock:
            self.request_reports = {**self.request_reports, client: ("producer", requests)}

    def broker_requests(self) -> dict[tuple[str, str], int]:
        """Requests sent to the brokers per (client type, Kafka API), summed over this
        process's clients as of their newest statistics (cumulative, like a counter)."""
        totals: Counter[tuple[str, str]] = Counter()
        for client_type, requests in self.request_reports.values():
            for api, count in requests.items():
                totals[(client_type, api)] += count
        return dict(totals)

    def consumer_lag(self, now_s: float | None = None) -> TopicPartitionLag:
        """Lag per (topic, partition) from every client that reported recently."""
        now = time.monotonic() if now_s is None else now_s
        merged: TopicPartitionLag = {}
        for at_s, lag in self.consumer_lag_reports.values():
            if now <= at_s + CONSUMER_LAG_STALE_S:  # (not now - at_s: rounding at the bound)
                merged.update(lag)
        return merged

    def saw_raw(self) -> None:
        self.raw_in += 1
        if self.first_in_s is None:
            self.first_in_s = time.monotonic()
            self.first_in_cpu_s = time.process_time()

    def traced(self, events: Iterable[Mapping[str, Any]], stored_ms: int) -> None:
        """Count each stored event's step durations (lineage) into per-step histograms."""
        bounds = STEP_BUCKETS_MS
        for event in events:
            for step, ms in durations(event, stored_ms):
                counts = self.step_counts.get(step)
                if counts is None:
                    counts = self.step_counts[step] = [0] * (len(bounds) + 1)
                counts[bisect.bisect_left(bounds, ms)] += 1
                self.step_sum_ms[step] = self.step_sum_ms.get(step, 0.0) + ms

    def stored_cpu(self, seconds: float) -> None:
        """Count a warehouse write's CPU (sinks write from several threads)."""
        with self._store_cpu_lock:
            self.step_cpu_s["store"] += seconds

    def stored_events(
        self, ingested_ms: list[int], stored_ms: int, *, reattributed: int = 0
    ) -> None:
        """Record that events became readable; latency = stored time - broker ingest time.

        ``reattributed`` events were stored again (a device's history, sent on to its
        customer at a login): counted, but not as latency, which each event has once.
        """
        with self._latency_lock:  # sinks write from several threads; the scrape reads
            self.events_stored += len(ingested_ms) + reattributed
            self.latencies_ms.extend(stored_ms - i for i in ingested_ms)
            self.latency_samples += len(ingested_ms)
        self.last_stored_s = time.monotonic()
        self.last_stored_cpu_s = time.process_time()

    def latencies_since(self, seen: int) -> tuple[int, list[float]]:
        """The samples appended after the first ``seen`` (oldest first, at most the newest
        ``LATENCY_SAMPLES``) and how many there have been in all: a scrape folds each once."""
        with self._latency_lock:
            total = self.latency_samples
            count = min(max(total - seen, 0), len(self.latencies_ms))
            new = list(itertools.islice(reversed(self.latencies_ms), count))
        new.reverse()
        return total, new

    def latency_percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        p50, p95, p99 = np.percentile(np.asarray(self.latencies_ms), [50, 95, 99])
        return {
            "p50": round(float(p50), 1),
            "p95": round(float(p95), 1),
            "p99": round(float(p99), 1),
        }

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())

    def drained(self, expected_raw: int) -> bool:
        """True when ``expected_raw`` messages went through every stage and every sink."""
        return (
            self.raw_in - self.rekeyed >= expected_raw
            and self.stitched_in >= self.valid
            and self.attributed_in >= self.attributed_out
            and self.events_stored >= self.clean_out
            and self.profiles_stored >= self.profile_updates
            and self.dead_letters_stored >= self.dead_lettered_total
        )

    def progress(self) -> tuple[int, ...]:
        """A tuple that changes whenever any stage does anything."""
        return (
            self.raw_in,
            self.stitched_in,
            self.attributed_out,
            self.attributed_in,
            self.profile_updates,
            self.events_stored,
            self.profiles_stored,
            self.dead_letters_stored,
        )


def _read_stats(stats_json: str, read: Callable[[Mapping[str, Any]], _T]) -> tuple[str, _T] | None:
    """The client's name and what ``read`` takes from one librdkafka statistics report, or
    None (logged) for a report that cannot be read: a ``stats_cb`` must never raise."""
    try:
        stats = orjson.loads(stats_json)
        return str(stats.get("name", "")), read(stats)
    except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
        log.warning("ignoring unreadable librdkafka statistics: %s", exc)
        return None


def consumer_stats_config(metrics: StreamMetrics, interval_ms: int = 1000) -> dict[str, Any]:
    """The consumer config entries that report lag into ``metrics`` every ``interval_ms``.

    Spread into a confluent-kafka consumer config, or quixstreams' ``consumer_extra_config``
    (its consumer wraps the ``stats_cb`` and still calls it).
    """
    if interval_ms <= 0:
        raise ValueError(f"statistics interval must be positive, got {interval_ms} ms")
    callback: Callable[[str], None] = metrics.on_consumer_stats
    return {"statistics.interval.ms": interval_ms, "stats_cb": callback}


def producer_stats_config(metrics: StreamMetrics, interval_ms: int = 1000) -> dict[str, Any]:
    """The producer config entries that report its broker requests into ``metrics``."""
    if interval_ms <= 0:
        raise ValueError(f"statistics interval must be positive, got {interval_ms} ms")
    callback: Callable[[str], None] = metrics.on_producer_stats
    return {"statistics.interval.ms": interval_ms, "stats_cb": callback}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_first_in(metrics: StreamMetrics, *, timeout_s: float = 120.0) -> None:
    """Wait until the processor has read its first raw message (its start-up is behind it).
    Raises ProcessingTimeout past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while metrics.first_in_s is None:
        if time.monotonic() >= deadline:
            raise ProcessingTimeout(f"the processor read no raw message within {timeout_s:.0f} s")
        time.sleep(0.001)


def wait_drained(
    metrics: StreamMetrics, expected_raw: int, *, still_s: float = 0.3, timeout_s: float = 600.0
) -> None:
    """Wait until the processor has consumed ``expected_raw`` raw messages and its counters
    (stored rows included) stopped moving for ``still_s``: everything sent so far is in the
    stores. Raises ProcessingTimeout past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int, ...] = ()
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = metrics.progress()
        if now != last:
            last, still_since = now, time.monotonic()
        elif metrics.drained(expected_raw) and time.monotonic() - still_since >= still_s:
            return
    raise ProcessingTimeout(
        f"the processor did not drain {expected_raw} raw messages within {timeout_s:.0f} s: "
        f"consumed {metrics.raw_in - metrics.rekeyed}"
    )
