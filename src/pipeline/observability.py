"""Prometheus exposition of a processor's :class:`~pipeline.metrics.StreamMetrics`, and of the
collector's and the API's request metrics.

A custom collector reads the counters at scrape time, so the hot path keeps incrementing plain
ints and pays nothing for Prometheus. Series names are listed in :data:`METRIC_NAMES`; the
Grafana dashboard (``deploy/grafana``) and alerting rules (``deploy/prometheus``) use them.

The collector (:class:`CollectorMetrics`) and the API (:class:`ApiMetrics`) count with
prometheus_client's own metrics in a registry per app, so several apps in one process (tests,
``pipeline up``) never share or clash; each app serves its registry on ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.anomaly import AlertKind, Severity
from pipeline.errors import ConfigurationError
from pipeline.gc_pauses import GC_BUCKETS_S, GENERATIONS, GcPauses
from pipeline.metrics import STEP_BUCKETS_MS, StreamMetrics

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

ALERT_SERIES: tuple[tuple[str, str], ...] = tuple(
    (kind, severity) for kind in get_args(AlertKind) for severity in get_args(Severity)
)
"""The (kind, severity) label pairs of ``pipeline_alerts_total``, all exported from zero."""

LagProvider = Callable[[], Mapping[tuple[str, int], int]]
"""Returns consumer lag (messages) per (topic, partition); by default the lag that librdkafka's
statistics reported into the metrics (:func:`pipeline.metrics.consumer_stats_config`)."""

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("raw_in", "pipeline_raw_in", "Raw messages read from the raw topic."),
    (
        "rekeyed",
        "pipeline_rekeyed",
        "Raw messages written back under their device key (read twice: subtract from raw_in).",
    ),
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
    ("suppressed", "pipeline_suppressed", "Events of forgotten customers dropped."),
    ("erasures", "pipeline_erasures", "Erasure requests carried out on stage-1 state."),
    ("profiles_erased", "pipeline_profiles_erased", "Profiles erased from state and warehouse."),
    ("checkpoints", "pipeline_checkpoints", "Checkpoints committed by the processing loop."),
    (
        "checkpoint_s",
        "pipeline_checkpoint_seconds",
        "Wall-clock seconds the processing loop spent committing checkpoints (no message is"
        " processed meanwhile): over rate() of the count, the mean commit time.",
    ),
)

EMBEDDED_BROKER = "pipeline_embedded_broker"
"""Prefix of the embedded broker's process series: it keeps every message in memory (no
retention), so its resident memory grows with traffic until it is restarted."""
_PROCESS_SERIES = (
    "process_cpu_seconds_total",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
)

METRIC_NAMES: frozenset[str] = frozenset(
    {
        *(f"{name}_total" for _, name, _ in _COUNTERS),
        "pipeline_dead_lettered_total",
        "pipeline_alerts_total",
        "pipeline_end_to_end_latency_seconds_bucket",
        "pipeline_end_to_end_latency_seconds_sum",
        "pipeline_end_to_end_latency_seconds_count",
        "pipeline_step_latency_seconds_bucket",
        "pipeline_step_latency_seconds_sum",
        "pipeline_step_latency_seconds_count",
        "pipeline_step_cpu_seconds_total",
        "pipeline_gc_pause_seconds_bucket",
        "pipeline_gc_pause_seconds_sum",
        "pipeline_gc_pause_seconds_count",
        *_PROCESS_SERIES,  # prometheus_client's ProcessCollector (Linux)
        "pipeline_consumer_lag",
        "pipeline_broker_requests_total",
        "pipeline_seconds_since_last_store",
        "pipeline_seconds_since_consumer_poll",
        # the embedded broker's process, beside a processor that started one (`pipeline up`)
        *(f"{EMBEDDED_BROKER}_{name}" for name in _PROCESS_SERIES),
    }
)
"""Every series name a scrape can contain (histogram series included)."""


class StreamMetricsCollector(Collector):
    """Reads a :class:`StreamMetrics` at each scrape.

    The latency histogram folds in only the samples appended since the previous scrape
    (:meth:`StreamMetrics.latencies_since`, by their own count: re-attributed copies are
    stored without one), so a scrape costs O(new samples) and the histogram's own state is
    one count per bucket.
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
        alerts = CounterMetricFamily(
            "pipeline_alerts",
            "Anomaly alerts raised by the stream's detectors (see pipeline.anomaly).",
            labels=["kind", "severity"],
        )
        # every series from zero: increase() cannot see the first alert of a series born at 1
        raised = {**dict.fromkeys(ALERT_SERIES, 0), **dict(m.alerts)}
        for (kind, severity), count in sorted(raised.items()):
            alerts.add_metric([kind, severity], count)
        yield alerts
        yield self._latency()
        yield self._step_latency()
        yield self._gc_pauses()
        cpu = CounterMetricFamily(
            "pipeline_step_cpu_seconds",
            "CPU seconds the processor spent in each of its own steps (pipeline.metrics."
            "CPU_STEPS; the stream's steps estimated from one message in 16); the rest of "
            "process_cpu_seconds_total goes to the stream framework, the Kafka client and "
            "serialization (and, in `pipeline up`, the collector and API).",
            labels=["step"],
        )
        for step, seconds in list(m.step_cpu_s.items()):
            cpu.add_metric([step], seconds)
        yield cpu
        lag = GaugeMetricFamily(
            "pipeline_consumer_lag",
            "Messages behind the partition's high watermark.",
            labels=["topic", "partition"],
        )
        current = self._lag() if self._lag is not None else m.consumer_lag()
        for (topic, partition), value in sorted(current.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        requests = CounterMetricFamily(
            "pipeline_broker_requests",
            "Requests this process's Kafka clients sent to the brokers, by client type and Kafka"
            " API, as of their newest statistics report (every second): per event, what the"
            " processor costs the broker.",
            labels=["client", "request"],
        )
        for (client, api), count in sorted(m.broker_requests().items()):
            requests.add_metric([client, api], count)
        yield requests
        if m.last_stored_s is not None:
            yield GaugeMetricFamily(
                "pipeline_seconds_since_last_store",
                "Seconds since the last warehouse write of events.",
                value=max(0.0, self._clock() - m.last_stored_s),
            )
        if m.last_stats_s is not None:
            # librdkafka reports statistics only from poll(): a hung processing loop (a stuck
            # sink, a deadlock) stops them while the scrape thread still answers
            yield GaugeMetricFamily(
                "pipeline_seconds_since_consumer_poll",
                "Seconds since the processor's consumer last polled (its newest statistics "
                "report): grows without bound while the processing loop is hung.",
                value=max(0.0, self._clock() - m.last_stats_s),
            )

    def _latency(self) -> HistogramMetricFamily:
        m = self._metrics
        with self._lock:
            if m.latency_samples < self._folded:  # a new StreamMetrics run: start over
                self._counts = [0] * len(self._counts)
                self._sum_ms, self._folded = 0.0, 0
            total, new = m.latencies_since(self._folded)
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

    def _step_latency(self) -> HistogramMetricFamily:
        """Per lineage step (broker, validate + enrich, ...): time since the step before."""
        m = self._metrics
        family = HistogramMetricFamily(
            "pipeline_step_latency_seconds",
            "Per event and step of its path: seconds since the previous step finished "
            "(includes the wait for the previous stage's commit).",
            labels=["step"],
        )
        bounds = (*(b / 1000 for b in STEP_BUCKETS_MS), float("inf"))
        for step, counts in list(m.step_counts.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, list(counts), strict=True):
                running += count
                cumulative.append((_le(bound), float(running)))
            family.add_metric([step], cumulative, sum_value=m.step_sum_ms.get(step, 0.0) / 1000)
        return family

    def _gc_pauses(self) -> HistogramMetricFamily:
        return gc_pause_family(
            self._metrics.gc,
            "Pauses of Python's cyclic garbage collector in the processor while its loop runs, "
            "by generation (2: a full collection); no message is processed meanwhile.",
        )


def gc_pause_family(pauses: GcPauses, documentation: str) -> HistogramMetricFamily:
    """``pipeline_gc_pause_seconds``: the collector's pauses per generation (2 = a full
    collection), as counted in ``pauses``; every thread of the process stops for each."""
    family = HistogramMetricFamily(
        "pipeline_gc_pause_seconds", documentation, labels=["generation"]
    )
    bounds = (*GC_BUCKETS_S, float("inf"))
    for generation in GENERATIONS:
        cumulative = [
            (_le(bound), float(running))
            for bound, running in zip(
                bounds, itertools.accumulate(pauses.buckets[generation]), strict=True
            )
        ]
        family.add_metric([str(generation)], cumulative, sum_value=pauses.seconds[generation])
    return family


class GcPauseCollector(Collector):
    """Serves a :class:`GcPauses` from an HTTP app's registry (read at each scrape)."""

    def __init__(self, pauses: GcPauses, server: str) -> None:
        self.pauses = pauses
        self._documentation = (
            f"Pauses of Python's cyclic garbage collector in the {server}'s process since it "
            "started, by generation (2: a full collection); no request is served meanwhile. "
            "`pipeline up` runs processor, collector and API in one process: each serves the "
            "same pauses."
        )

    def collect(self) -> Iterator[Metric]:
        yield gc_pause_family(self.pauses, self._documentation)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def metrics_registry(
    metrics: StreamMetrics, *, lag: LagProvider | None = None, broker_pid: int | None = None
) -> CollectorRegistry:
    """A registry with the pipeline's collector and the process's own figures (CPU, memory:
    ``process_*``, read from /proc at each scrape; absent where there is no /proc), and with
    ``broker_pid`` those of the embedded broker's process (``pipeline_embedded_broker_*``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamMetricsCollector(metrics, lag=lag))
    ProcessCollector(registry=registry)
    if broker_pid is not None:
        ProcessCollector(namespace=EMBEDDED_BROKER, pid=lambda: broker_pid, registry=registry)
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
    broker_pid: int | None = None,
) -> RunningMetricsServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` in a daemon thread (port 0 = any);
    ``broker_pid``: the embedded broker's process, whose CPU and memory are served too."""
    registry = metrics_registry(metrics, lag=lag, broker_pid=broker_pid)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # the port is taken (another replica, another run)
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror}): set PIPELINE_METRICS_PORT "
            "to a free port, or 0 for any"
        ) from exc
    return RunningMetricsServer(server, thread, host)


ACK_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
REQUEST_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class CollectorMetrics:
    """What the collector accepted, refused and produced; a registry of its own per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gc = GcPauses()  # counted while the app runs (pipeline.gc_pauses.tuned_and_counted)
        self.registry.register(GcPauseCollector(self.gc, "collector"))
        self.events_accepted = Counter(
            "pipeline_collector_events_accepted",
            "Events of requests answered 200 (a forgotten customer's events included).",
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "pipeline_collector_requests_rejected",
            "Requests refused, by HTTP status and error code of the response body.",
            ["status", "code"],
            registry=self.registry,
        )
        self.events_produced = Counter(
            "pipeline_collector_events_produced",
            "Events the broker acknowledged on the raw topic.",
            registry=self.registry,
        )
        self.produce_ack_seconds = Histogram(
            "pipeline_collector_produce_ack_seconds",
            "From producing a request's events to the broker acknowledging all of them "
            "(acknowledged requests only; failures count in requests_rejected).",
            buckets=ACK_BUCKETS_S,
            registry=self.registry,
        )

    def rejected(self, status: int, code: str) -> None:
        self.requests_rejected.labels(str(status), code).inc()


class ApiMetrics:
    """Requests the API answered, by route template, method and status; a registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gc = GcPauses()  # counted while the app runs (pipeline.gc_pauses.tuned_and_counted)
        self.registry.register(GcPauseCollector(self.gc, "API"))
        self.requests = Counter(
            "pipeline_api_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pipeline_api_request_duration_seconds",
            "Time from receiving a request to the end of its response, by route template.",
            ["route", "method"],
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)


UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route matched, so unknown paths add no series."""
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
"""The method label of anything else: a made-up method must not add series either."""


class RequestMetricsMiddleware:
    """ASGI middleware counting each HTTP request in :class:`ApiMetrics` once it is answered.

    The route label is the matched route's template (``/api/customers/{customer_id}``), never
    the raw path. An exception escaping the app counts as a 500, as the server answers it.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            # the router records the route it matched in the (shared) scope
            template = getattr(scope.get("route"), "path", None)
            method = str(scope.get("method", ""))
            self._metrics.observe(
                template if isinstance(template, str) else UNMATCHED_ROUTE,
                method if method in HTTP_METHODS else OTHER_METHOD,
                status,
                time.perf_counter() - started,
            )


def metrics_response(registry: CollectorRegistry) -> Response:
    """A ``/metrics`` response: ``registry`` in the Prometheus text format (0.0.4, what
    ``generate_latest`` writes and every Prometheus reads)."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
