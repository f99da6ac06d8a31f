"""Prometheus exposition of a processor's :class:`~pipeline.metrics.StreamMetrics`.

A custom collector reads the counters at scrape time, so the hot path keeps incrementing plain
ints and pays nothing for Prometheus. Series names are listed in :data:`METRIC_NAMES`; the
Grafana dashboard (``deploy/grafana``) and alerting rules (``deploy/prometheus``) use them.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline.metrics import StreamMetrics

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

LagProvider = Callable[[], Mapping[tuple[str, int], int]]
"""Returns consumer lag (messages) per (topic, partition), e.g. from librdkafka statistics."""

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("raw_in", "pipeline_raw_in", "Raw messages read from the raw topic."),
    ("valid", "pipeline_valid", "Raw messages that parsed and validated."),
    ("duplicates_dropped", "pipeline_duplicates_dropped", "Events dropped as duplicates."),
    ("replays_dropped", "pipeline_replays_dropped", "Events dropped by the replay guard."),
    ("identities_linked", "pipeline_identities_linked", "Identity links recorded."),
    ("identities_merged", "pipeline_identities_merged", "Anonymous profiles merged."),
    ("profile_updates", "pipeline_profile_updates", "Profile updates emitted."),
    ("clean_out", "pipeline_clean_out", "Clean events emitted."),
    ("events_stored", "pipeline_events_stored", "Events written to the warehouse."),
    ("profiles_stored", "pipeline_profiles_stored", "Profile rows written to the warehouse."),
    ("dead_letters_stored", "pipeline_dead_letters_stored", "Dead letters written."),
    ("segment_changes", "pipeline_segment_changes", "Segment enter/exit changes."),
)

METRIC_NAMES: frozenset[str] = frozenset(
    {
        *(f"{name}_total" for _, name, _ in _COUNTERS),
        "pipeline_dead_lettered_total",
        "pipeline_end_to_end_latency_seconds_bucket",
        "pipeline_end_to_end_latency_seconds_sum",
        "pipeline_end_to_end_latency_seconds_count",
        "pipeline_consumer_lag",
        "pipeline_seconds_since_last_store",
    }
)
"""Every series name a scrape can contain (histogram series included)."""


class StreamMetricsCollector(Collector):
    """Reads a :class:`StreamMetrics` at each scrape.

    The latency histogram folds in only the samples stored since the previous scrape (the
    newest ``events_stored`` delta of the bounded sample deque), so a scrape costs O(new
    samples) and the histogram's own state is one count per bucket.
    """

    def __init__(
        self,
        metrics: StreamMetrics,
        *,
        lag: LagProvider | None = None,
        clock: Callable[[], float] | None = None,
        buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S,
    ) -> None:
        self._metrics = metrics
        self._lag = lag
        self._clock = clock or time.monotonic
        self._bounds_ms = [b * 1000 for b in buckets_s]
        self._buckets_s = buckets_s
        self._counts = [0] * (len(buckets_s) + 1)  # the last one is +Inf
        self._sum_ms = 0.0
        self._folded = 0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        for attr, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(m, attr))
        dead = CounterMetricFamily(
            "pipeline_dead_lettered",
            "Raw messages routed to the dead-letter topic.",
            labels=["reason"],
        )
        for reason, count in sorted(dict(m.dead_lettered).items()):
            dead.add_metric([reason], count)
        yield dead
        yield self._latency()
        lag = GaugeMetricFamily(
            "pipeline_consumer_lag",
            "Messages behind the partition's high watermark.",
            labels=["topic", "partition"],
        )
        if self._lag is not None:
            for (topic, partition), value in sorted(self._lag().items()):
                lag.add_metric([topic, str(partition)], value)
        yield lag
        if m.last_stored_s is not None:
            yield GaugeMetricFamily(
                "pipeline_seconds_since_last_store",
                "Seconds since the last warehouse write of events.",
                value=max(0.0, self._clock() - m.last_stored_s),
            )

    def _latency(self) -> HistogramMetricFamily:
        m = self._metrics
        with self._lock:
            total = m.events_stored  # one latency sample is appended per stored event
            if total < self._folded:  # a new StreamMetrics run: start over
                self._counts = [0] * len(self._counts)
                self._sum_ms, self._folded = 0.0, 0
            # newest first; list(islice(reversed(...))) runs in C, so it is atomic under the GIL
            new = list(itertools.islice(reversed(m.latencies_ms), total - self._folded))
            for ms in new:
                self._counts[bisect.bisect_left(self._bounds_ms, ms)] += 1
            self._sum_ms += sum(new)
            self._folded = total
            cumulative, running = [], 0
            for bound, count in zip((*self._buckets_s, float("inf")), self._counts, strict=True):
                running += count
                cumulative.append((_le(bound), float(running)))
            sum_s = self._sum_ms / 1000
        return HistogramMetricFamily(
            "pipeline_end_to_end_latency_seconds",
            "Broker ingest to readable in the warehouse, per event.",
            buckets=cumulative,
            sum_value=sum_s,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(
    metrics: StreamMetrics, *, lag: LagProvider | None = None
) -> CollectorRegistry:
    """A registry holding only the pipeline's collector (no process/platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamMetricsCollector(metrics, lag=lag))
    return registry


def exposition(registry: CollectorRegistry) -> str:
    """The Prometheus text format of ``registry``, as a scrape would see it."""
    return generate_latest(registry).decode("utf-8")


class RunningMetricsServer:
    """A started ``/metrics`` endpoint: call it to stop; ``url`` is where it listens."""

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_port)
        self.url = f"http://{host}:{self.port}/metrics"

    def __call__(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_metrics_server(
    metrics: StreamMetrics,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    lag: LagProvider | None = None,
) -> RunningMetricsServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` in a daemon thread (port 0 = any)."""
    server, thread = start_http_server(port, addr=host, registry=metrics_registry(metrics, lag=lag))
    return RunningMetricsServer(server, thread, host)
