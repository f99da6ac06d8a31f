"""The reproducible benchmark behind ``pipeline bench``: floor, full path, latency, collector, API.

One run on a fresh embedded broker measures (a) a bare quixstreams stateful per-key counter over
the simulated raw messages, and the processor's Kafka shape with no logic in it (the topology
floor), (b) the full processor over the same messages, (c) end-to-end latency
(warehouse ``stored_ms - ingested_ms``) at fixed fractions of (b), (d) collector throughput and
(e) recommendations API latency; results go to a JSON file and a plotly chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import orjson
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from prometheus_client.parser import text_string_to_metric_families
from quixstreams import Application
from quixstreams.kafka.configuration import ConnectionConfig

from pipeline import lineage
from pipeline.broker import client_config, free_port
from pipeline.children import terminate
from pipeline.errors import PipelineError
from pipeline.gc_pauses import GC_BUCKETS_S, GENERATIONS, tuned_for_streaming
from pipeline.loadgen import LoadGenerator, wire_messages
from pipeline.metrics import (
    StreamMetrics,
    cpu_per_event,
    cpu_seconds,
    wait_drained,
    wait_first_in,
)
from pipeline.settings import Settings
from pipeline.simulate import RawMessage
from pipeline.stream.topology import new_application, processor_topic_config

BENCH_WRITE_KEY = "wk_bench"
BENCH_API_KEY = "ak_bench_0123456789"
FLOOR_GROUP = "bench-floor"
TOPOLOGY_FLOOR_GROUP = "bench-topology-floor"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run; ``quick()`` gives the tiny one the tests use."""

    events: int = 50_000
    seed: int = 42
    load_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    phase_events: int = 20_000
    warmup_events: int = 2_000
    collector_seconds: float = 10.0
    collector_batch: int = 20
    collector_connections: int = 8
    api_requests: int = 2_000
    api_k: int = 10
    quick: bool = False

    @classmethod
    def quick_config(cls, *, seed: int = 42, events: int | None = None) -> BenchConfig:
        return cls(
            events=events or 2_000,
            seed=seed,
            phase_events=400,
            warmup_events=200,
            collector_seconds=1.0,
            collector_connections=2,
            api_requests=100,
            quick=True,
        )


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """n, p50/p90/p95/p99 and max of latency samples in milliseconds (inclusive quantiles)."""
    ordered = sorted(samples_ms)
    if len(ordered) < 2:
        raise PipelineError(f"need at least 2 latency samples, got {len(ordered)}")
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "n": len(ordered),
        "p50_ms": round(q[49], 3),
        "p90_ms": round(q[89], 3),
        "p95_ms": round(q[94], 3),
        "p99_ms": round(q[98], 3),
        "max_ms": round(ordered[-1], 3),
    }


def timed(call: Callable[[], object], repeats: int, warmup: int = 50) -> list[float]:
    """Milliseconds each of ``repeats`` calls took, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


_FRAME = " │|╭╮╰╯─"


@contextmanager
def _http_server(
    command: Sequence[str], port: int, env: Mapping[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``pipeline`` HTTP server child, healthy on ``port`` until the block ends.

    Its stderr goes to a file so that a server that dies at start-up is reported with its own
    last words instead of a bare "did not start".
    """
    with tempfile.TemporaryFile() as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *command],
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}", server, stderr)
            yield server
        finally:
            terminate(server, timeout_s=30)


def _wait_http(
    url: str, process: subprocess.Popen[bytes], stderr: IO[bytes], timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        exited = process.poll()
        if time.monotonic() > deadline or exited is not None:
            stderr.seek(0)
            lines = stderr.read().decode(errors="replace").splitlines()
            said = [text for line in lines if (text := line.strip(_FRAME))]  # rich's boxes
            how = "did not answer in time" if exited is None else f"exited with {exited}"
            last = f": {said[-1]}" if said else ""
            raise PipelineError(f"the server for {url} {how}{last}")
        time.sleep(0.05)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**env, **extra}


def server_gc(url: str) -> tuple[list[float], list[list[float]]]:
    """An HTTP server's garbage-collector pauses so far, from its ``/metrics``
    (``pipeline_gc_pause_seconds``): seconds per generation and, per generation, the
    cumulative bucket counts over :data:`~pipeline.gc_pauses.GC_BUCKETS_S` and +Inf."""
    seconds = [0.0] * len(GENERATIONS)
    buckets = [[0.0] * (len(GC_BUCKETS_S) + 1) for _ in GENERATIONS]
    bounds = [*GC_BUCKETS_S, float("inf")]
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name != "pipeline_gc_pause_seconds":
            continue
        for sample in family.samples:
            generation = int(sample.labels["generation"])
            if sample.name.endswith("_sum"):
                seconds[generation] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets[generation][bounds.index(float(sample.labels["le"]))] = sample.value
    return seconds, buckets


def gc_window(
    before: tuple[list[float], list[list[float]]],
    after: tuple[list[float], list[list[float]]],
    seconds: float,
) -> dict[str, Any]:
    """What a server's collector did between two :func:`server_gc` readings ``seconds`` apart:
    the share of the time in pauses, collections per generation, and the smallest histogram
    bound the longest pause stayed under (a histogram keeps no maximum)."""
    spent = sum(after[0]) - sum(before[0])
    counts = [int(a[-1] - b[-1]) for a, b in zip(after[1], before[1], strict=True)]
    longest_under: float | None = None
    if sum(counts):
        within = [
            sum(a[i] - b[i] for a, b in zip(after[1], before[1], strict=True))
            for i in range(len(GC_BUCKETS_S) + 1)
        ]
        first = next(i for i, n in enumerate(within) if n == sum(counts))
        longest_under = GC_BUCKETS_S[first] * 1000 if first < len(GC_BUCKETS_S) else None
    return {
        "gc_share": round(spent / seconds, 4) if seconds > 0 else None,
        "gc_collections": counts,
        "gc_longest_under_ms": longest_under,
    }


def _bench_batch(n: int) -> bytes:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    events = [
        {
            "type": "track",
            "event": "Product Viewed",
            "messageId": str(uuid.uuid4()),
            "anonymousId": str(uuid.uuid4()),
            "timestamp": now,
            "context": {
                "sessionId": "s_bench",
                "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) "
                "Gecko/20100101 Firefox/127.0",
                "library": {"name": "bench", "version": "1"},
            },
            "properties": {"product_id": "P00001", "price": 72.99, "category": "dresses"},
        }
        for _ in range(n)
    ]
    return orjson.dumps({"batch": events, "sentAt": now})


async def _post_load(
    url: str, batch: int, connections: int, seconds: float
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    events = 0
    deadline = time.monotonic() + seconds
    bodies = [_bench_batch(batch) for _ in range(64)]

    async def worker(http: httpx.AsyncClient, i: int) -> None:
        nonlocal events
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await http.post("/v1/batch", content=bodies[i % len(bodies)])
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise PipelineError(f"collector answered {response.status_code}: {response.text}")
            events += batch
            i += connections

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, auth=(BENCH_WRITE_KEY, ""), limits=limits) as http:
        await asyncio.gather(*(worker(http, i) for i in range(connections)))
    return events, latencies


def collector_throughput(
    address: str,
    *,
    batch: int = 20,
    connections: int = 8,
    seconds: float = 10.0,
    home: Path | None = None,
    gc_young_threshold: int = Settings.model_fields["gc_young_threshold"].default,
) -> dict[str, Any]:
    """Run ``pipeline collect`` (its own process) against the broker at ``address`` and post
    batches from ``connections`` concurrent connections for ``seconds``, after a warm-up.

    Returns events/s accepted (200 = broker acknowledged), ack latency, collector CPU use and
    its garbage collector's pauses over the timed load (:func:`gc_window`).
    """
    port = free_port()
    env = _clean_env(
        PIPELINE_GC_YOUNG_THRESHOLD=str(gc_young_threshold),
        PIPELINE_BROKER=address,
        PIPELINE_COLLECTOR__PORT=str(port),
        PIPELINE_COLLECTOR__WRITE_KEYS=json.dumps({"bench": BENCH_WRITE_KEY}),
        PIPELINE_COLLECTOR__RATE_LIMIT_EVENTS_PER_S="1e9",
        PIPELINE_COLLECTOR__RATE_LIMIT_BURST="1000000000",
    )
    if home is not None:
        env["PIPELINE_HOME"] = str(home)
    url = f"http://127.0.0.1:{port}"
    with _http_server(["collect"], port, env, cwd=home) as server:
        asyncio.run(_post_load(url, batch, connections, min(1.0, seconds)))
        cpu_before, gc_before = cpu_seconds(server.pid), server_gc(url)
        started = time.monotonic()
        events, latencies = asyncio.run(_post_load(url, batch, connections, seconds))
        elapsed = time.monotonic() - started
        cpu_s = cpu_seconds(server.pid) - cpu_before
        gc = gc_window(gc_before, server_gc(url), elapsed)
    ack = percentiles(latencies)
    return {
        "batch": batch,
        "connections": connections,
        "seconds": round(elapsed, 2),
        "events": events,
        "requests": len(latencies),
        "events_per_s": round(events / elapsed, 1),
        "ack_ms_p50": ack["p50_ms"],
        "ack_ms_p99": ack["p99_ms"],
        "collector_cpu_share": round(cpu_s / elapsed, 2),
        "events_per_collector_cpu_s": round(events / cpu_s, 1) if cpu_s > 0 else None,
        **gc,
    }


def api_http_latencies(
    home: Path,
    customers: Sequence[str],
    *,
    k: int,
    requests: int,
    gc_young_threshold: int = Settings.model_fields["gc_young_threshold"].default,
) -> tuple[list[float], dict[str, Any]]:
    """Milliseconds per ``GET /api/customers/{id}/recommendations`` of `pipeline api` serving
    ``home``, in its own process so that client and server do not share one GIL; and the
    server's garbage-collector pauses over the timed requests (:func:`gc_window`)."""
    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_HOME": str(home),
        "PIPELINE_API__API_KEYS": json.dumps({"bench": BENCH_API_KEY}),
        "PIPELINE_GC_YOUNG_THRESHOLD": str(gc_young_threshold),
    }
    base = f"http://127.0.0.1:{port}"
    with (
        _http_server(["api", "--host", "127.0.0.1", "--port", str(port)], port, env),
        httpx.Client(base_url=base, headers={"X-API-Key": BENCH_API_KEY}) as client,
    ):
        picks = iter(list(customers) * (requests // max(1, len(customers)) + 2))

        def call() -> None:
            response = client.get(f"/api/customers/{next(picks)}/recommendations", params={"k": k})
            response.raise_for_status()

        timed(call, 0, warmup=min(50, requests))
        gc_before, started = server_gc(base), time.monotonic()
        latencies = timed(call, requests, warmup=0)
        return latencies, gc_window(gc_before, server_gc(base), time.monotonic() - started)


class _Stopwatch:
    """Wall and CPU time of this process from the first counted message to the ``expected``-th."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.marks: list[tuple[float, float]] = []
        self.done = threading.Event()

    def tick(self) -> None:
        self.seen += 1
        if self.seen == 1 or self.seen == self.expected:
            self.marks.append((time.monotonic(), time.process_time()))
        if self.seen == self.expected:
            self.done.set()

    def run(
        self, app: Application, what: str, timeout_s: float, gc_young_threshold: int
    ) -> dict[str, Any]:
        """Run ``app`` until the count is reached (or ``timeout_s``); the figures. The
        garbage collector is tuned as for the processor, so that the ratios compare like
        with like."""
        finished = threading.Event()

        def stop_when_done() -> None:
            self.done.wait(timeout_s)
            if not finished.is_set():
                app.stop()

        stopper = threading.Thread(target=stop_when_done, name="bench-floor-stop", daemon=True)
        stopper.start()
        try:
            with tuned_for_streaming(gc_young_threshold):
                app.run()
        finally:
            finished.set()
            self.done.set()
            stopper.join()
        if len(self.marks) < 2:
            raise PipelineError(f"{what} saw {self.seen} of {self.expected} messages")
        (wall0, cpu0), (wall1, cpu1) = self.marks
        seconds, cpu_s = wall1 - wall0, cpu1 - cpu0
        return {
            "events": self.expected,
            "seconds": round(seconds, 6),
            "events_per_s": round(self.expected / seconds, 1),
            "cpu_s": round(cpu_s, 6),
            "events_per_cpu_s": round(self.expected / cpu_s, 1) if cpu_s > 0 else None,
        }


def _keyed(_value: Any, key: Any, _timestamp: int, _headers: Any) -> bool:
    # keyless messages have no per-key state; the processor dead-letters them anyway
    return key is not None


def floor_throughput(
    settings: Settings, address: str, expected: int, *, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Events/s of a bare quixstreams stateful per-key counter over the raw topic's backlog.

    Same broker, topic, partitions and processing guarantee as the processor; timed from the
    first message counted to the ``expected``-th, so group assignment is not included.
    """
    state_dir = settings.home / "floor-state"
    # the broker is new, so state from an earlier run's changelogs would be stale
    shutil.rmtree(state_dir, ignore_errors=True)
    app = Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(client_config(settings, address)),
        consumer_group=FLOOR_GROUP,
        auto_offset_reset="earliest",
        commit_interval=settings.commit_interval_s,
        processing_guarantee=settings.processing_guarantee,
        state_dir=state_dir,
        consumer_extra_config={"session.timeout.ms": 3000, "heartbeat.interval.ms": 500},
        consumer_poll_timeout=0.2,
        loglevel=settings.log_level,
    )
    topic = app.topic(
        settings.topics.raw,
        value_deserializer="bytes",
        key_deserializer="bytes",
        config=processor_topic_config(settings),
    )
    watch = _Stopwatch(expected)

    def count(value: bytes, state: Any) -> int:
        n: int = state.get("n", 0) + 1
        state.set("n", n)
        watch.tick()
        return n

    app.dataframe(topic).filter(_keyed, metadata=True).apply(count, stateful=True)
    return watch.run(app, "floor counter", timeout_s, settings.gc_young_threshold)


def topology_floor_throughput(
    settings: Settings, address: str, expected: int, *, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Events/s of the processor's Kafka shape with no logic in it, over the same backlog.

    The processor's application settings (client, commit, exactly-once, state), and per message
    what the processor does to Kafka and its state stores: stage 1 reads a state key and sets
    one (dedupe), then re-keys the message through a topic of its own; stage 2 reads and writes
    a small per-key value and produces two records (the clean event and the profile). The gap
    between this and the full path is the cost of the processor's own work (parsing,
    validation, scoring, segments, sinks, bigger records), not of the Kafka round trips.
    """
    state_dir = settings.home / "topology-floor-state"
    shutil.rmtree(state_dir, ignore_errors=True)
    app = new_application(
        settings, address, StreamMetrics(), consumer_group=TOPOLOGY_FLOOR_GROUP, state_dir=state_dir
    )
    config = processor_topic_config(settings)
    raw = app.topic(
        settings.topics.raw, value_deserializer="bytes", key_deserializer="str", config=config
    )

    def out(name: str) -> Any:
        return app.topic(
            f"{TOPOLOGY_FLOOR_GROUP}.{name}",
            key_serializer="str",
            key_deserializer="str",
            value_serializer="json",
            value_deserializer="json",
            config=config,
        )

    hop, clean, profiles = out("attributed"), out("clean"), out("profiles")
    watch = _Stopwatch(expected)

    def stage_1(value: bytes, key: str, timestamp: int, _headers: Any, state: Any) -> Any:
        seen = f"seen:{timestamp}:{len(value)}"
        if state.get(seen) is None:
            state.set(seen, 1)
        return {"customer_id": key, "size": len(value), "ts": timestamp}

    def stage_2(record: dict[str, Any], state: Any) -> list[dict[str, Any]]:
        profile = state.get("profile") or {"n": 0, "bytes": 0}
        profile["n"] += 1
        profile["bytes"] += record["size"]
        state.set("profile", profile)
        watch.tick()
        return [{**record, "kind": "event"}, {**profile, "kind": "profile"}]

    (
        app.dataframe(raw)
        .filter(_keyed, metadata=True)
        .apply(stage_1, stateful=True, metadata=True)
        .to_topic(hop, key=lambda record: record["customer_id"])
    )
    (
        app.dataframe(hop)
        .apply(stage_2, stateful=True, expand=True)
        .to_topic(lambda record, *_: clean if record["kind"] == "event" else profiles)
    )
    return watch.run(app, "topology floor", timeout_s, settings.gc_young_threshold)


@dataclass(frozen=True)
class Phase:
    """One paced latency phase: its offered load and the wall-clock window it was produced in."""

    load_fraction: float
    offered_eps: float
    events: int
    produce_s: float
    start_ms: int
    end_ms: int
    # CPU seconds per 1,000 events from the phase's start until it drained: at a paced load
    # the broker serves many small requests, so it costs far more per event than in a backlog
    processor_cpu_s_per_1k: float | None = None
    broker_cpu_s_per_1k: float | None = None
    # share of the phase's wall time (start until drained) the processing loop spent in
    # checkpoint commits, and their mean duration: time in which no message is processed
    checkpoint_share: float | None = None
    checkpoint_ms: float | None = None
    # the processor's requests to the broker per 1,000 events, by "client type:Kafka API"
    # (librdkafka statistics, reported every second, so the window is a second coarse)
    requests_per_1k: dict[str, float] | None = None
    # the garbage collector's pauses in the processor's process over the same window: their
    # share of the wall time and the longest (the loop stops for each)
    gc_share: float | None = None
    gc_longest_ms: float | None = None


def _gc(m: StreamMetrics, since_s: float, seconds: float) -> dict[str, Any]:
    """The collector's pauses since its total was ``since_s``, over ``seconds`` of wall time,
    and the longest since the previous call."""
    spent = m.gc.total()[1] - since_s
    return {
        "gc_share": round(spent / seconds, 4) if seconds > 0 else None,
        "gc_longest_ms": round(m.gc.take_longest_s() * 1000, 1),
    }


def _requests(m: StreamMetrics, since: dict[tuple[str, str], int], events: int) -> dict[str, float]:
    """The processor's broker requests since ``since`` per 1,000 of ``events``, by
    ``client type:API``, the most frequent first; APIs it did not send are left out."""
    now = m.broker_requests()
    per = {
        f"{client}:{api}": round((count - since.get((client, api), 0)) * 1000 / events, 1)
        for (client, api), count in now.items()
        if count > since.get((client, api), 0)
    }
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def _checkpoints(m: StreamMetrics, since: tuple[int, float], seconds: float) -> dict[str, Any]:
    """The loop's checkpoint commits since ``since`` (count, seconds), over ``seconds``."""
    count, spent = m.checkpoints - since[0], m.checkpoint_s - since[1]
    return {
        "checkpoint_share": round(spent / seconds, 3) if seconds > 0 else None,
        "checkpoint_ms": round(spent / count * 1000, 1) if count else None,
    }


def _latency_of(warehouse: Any, phase: Phase) -> dict[str, Any]:
    rows = warehouse.query(
        f"SELECT stored_ms - ingested_ms AS ms, {', '.join(lineage.COLUMNS)} FROM events "
        "WHERE ingested_ms BETWEEN ? AND ?",
        (phase.start_ms - 1, phase.end_ms + 1),
    )
    samples = [float(v) for v in rows["ms"]]
    pct = percentiles(samples)
    # where the time went: per lineage step, since the step before (hops include commit waits)
    steps = lineage.step_latency(rows).dropna().round(1).to_dict(orient="records")
    achieved = phase.events / phase.produce_s if phase.produce_s else None
    return {
        **asdict(phase),
        "achieved_eps": round(achieved, 1) if achieved is not None else None,
        # a sender starved of CPU falls behind its schedule and catches up in bursts: its
        # waits are not in the latency (records are stamped when sent), so say so
        "kept_pace": achieved is not None and achieved >= 0.98 * phase.offered_eps,
        "events_stored": pct["n"],
        "p50_ms": pct["p50_ms"],
        "p95_ms": pct["p95_ms"],
        "p99_ms": pct["p99_ms"],
        "max_ms": pct["max_ms"],
        "steps": steps,
    }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def run_bench(settings: Settings, config: BenchConfig) -> dict[str, Any]:
    """Run every measurement once in ``settings.home / "bench" / "work"``; return the report.

    The broker is always a fresh embedded one, whatever ``settings.broker`` says, so that the
    floor and the processor read exactly the messages this run produced.
    """
    from pipeline.runner import (
        pipeline_run,
        process_until_idle,
        produce_messages,
        simulate_for,
    )

    work = settings.home / "bench" / "work"
    bench_settings = settings.model_copy(update={"home": work, "broker": None})
    started_at = datetime.now(UTC)
    n_phases = len(config.load_fractions)
    total = config.events + config.warmup_events + n_phases * config.phase_events
    report: dict[str, Any] = {
        "schema": 1,
        "started_at": started_at.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_before": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            **asdict(config),
            "partitions": bench_settings.partitions,
            "processing_guarantee": bench_settings.processing_guarantee,
            "commit_interval_s": bench_settings.commit_interval_s,
            "consumer_isolation": bench_settings.consumer_isolation,
            "producer_linger_ms": bench_settings.producer_linger_ms,
        },
    }
    with pipeline_run(bench_settings) as run:
        # the backlog is the simulation of `events` messages that `pipeline demo` and the
        # scale-out run process too (same population), the paced traffic another one
        backlog = simulate_for(bench_settings, config.events, config.seed, run.catalog).messages
        paced = total - config.events
        msgs = simulate_for(bench_settings, paced, config.seed + 1, run.catalog).messages
        warmup = msgs[: config.warmup_events]
        phase_slices = [
            msgs[config.warmup_events + i * config.phase_events :][: config.phase_events]
            for i in range(n_phases)
        ]
        # the paced sender starts (imports, connects: seconds of CPU) before anything is
        # measured: an empty offer returns once it is ready
        load = LoadGenerator(run.address, work, topic=bench_settings.topics.raw)
        load.offer([], None)
        produce_messages(bench_settings, run.address, backlog)
        keyed = sum(1 for msg in backlog if msg.key is not None)
        report["floor"] = floor_throughput(bench_settings, run.address, keyed)
        report["topology_floor"] = topology_floor_throughput(bench_settings, run.address, keyed)

        phases: list[Phase] = []
        measured: dict[str, float] = {}
        backlog_requests: dict[str, float] = {}  # per 1,000 events, by client type:API
        step_cpu: dict[str, float] = {}  # per step, over the backlog

        def offer(messages: Sequence[RawMessage], rate: float) -> float:
            """Paced load from a child process, as remote senders would offer it (see loadgen)."""
            return load.offer(wire_messages(messages), rate)

        broker_pid = run.broker.embedded.process.pid if run.broker.embedded else None

        def _broker_cpu() -> float | None:
            return cpu_seconds(broker_pid) if broker_pid is not None else None

        def feed() -> None:
            m = run.metrics
            # the broker's CPU from the processor's first message on, the window of its own CPU
            # (its start-up before that, group join and topic checks, is not the backlog's)
            wait_first_in(m)
            broker_cpu_before = _broker_cpu()
            gc_before = m.gc.total()[1]  # the collector's pauses over the same window
            m.gc.take_longest_s()
            wait_drained(m, len(backlog))
            if m.first_in_s is None or m.last_stored_s is None:
                raise PipelineError("the processor stored nothing from the backlog")
            seconds = m.last_stored_s - m.first_in_s
            raw = m.raw_in - m.rekeyed  # a re-keyed message is read twice
            measured.update(seconds=seconds, eps=raw / seconds, raw=raw)
            # the backlog's own, before the warm-up and the phases add theirs
            measured.update(
                dead_lettered=m.dead_lettered_total, duplicates_dropped=m.duplicates_dropped
            )
            backlog_requests.update(_requests(m, {}, raw) if raw else {})
            if m.first_in_cpu_s is not None and m.last_stored_cpu_s is not None:
                measured["cpu_s"] = m.last_stored_cpu_s - m.first_in_cpu_s
            step_cpu.update(m.step_cpu_s)
            measured.update(_checkpoints(m, (0, 0.0), seconds))
            measured.update(_gc(m, gc_before, seconds))
            broker_cpu_after = _broker_cpu()
            if broker_cpu_after is not None and broker_cpu_before is not None:
                measured["broker_cpu_s"] = broker_cpu_after - broker_cpu_before
            expected = len(backlog)
            # a warm-up at the lowest load: caches, connections and batches are in steady state
            offer(warmup, config.load_fractions[0] * measured["eps"])
            expected += len(warmup)
            wait_drained(m, expected)
            for fraction, messages in zip(config.load_fractions, phase_slices, strict=True):
                rate = fraction * measured["eps"]
                cpu_before, broker_before = time.process_time(), _broker_cpu()
                requests_before = m.broker_requests()
                commits_before, started = (m.checkpoints, m.checkpoint_s), time.monotonic()
                gc_before = m.gc.total()[1]
                m.gc.take_longest_s()  # a new window
                start_ms = _now_ms()
                produce_s = offer(messages, rate)
                end_ms = _now_ms()
                expected += len(messages)
                wait_drained(m, expected)
                per_1k = 1000 / len(messages)
                broker_after = _broker_cpu()
                phases.append(
                    Phase(
                        fraction,
                        round(rate, 1),
                        len(messages),
                        round(produce_s, 3),
                        start_ms,
                        end_ms,
                        round((time.process_time() - cpu_before) * per_1k, 3),
                        None
                        if broker_after is None or broker_before is None
                        else round((broker_after - broker_before) * per_1k, 3),
                        **_checkpoints(m, commits_before, time.monotonic() - started),
                        **_gc(m, gc_before, time.monotonic() - started),
                        requests_per_1k=_requests(m, requests_before, len(messages)),
                    )
                )

        try:
            process_until_idle(run, expected_raw=total, feed=feed, idle_s=0.3)
        finally:
            load.close()
        cpu_s = measured.get("cpu_s", 0.0)
        floor_per_cpu = report["floor"]["events_per_cpu_s"]
        topology_per_cpu = report["topology_floor"]["events_per_cpu_s"]
        report["processor"] = {
            "events": int(measured["raw"]),
            "seconds": round(measured["seconds"], 6),
            "events_per_s": round(measured["eps"], 1),
            "ratio_to_floor": round(measured["eps"] / report["floor"]["events_per_s"], 3),
            # per processor core: this process's CPU seconds (every thread) over the backlog,
            # so the broker and the load generator sharing the machine do not count
            "cpu_s": round(cpu_s, 6),
            "events_per_cpu_s": round(measured["raw"] / cpu_s, 1) if cpu_s else None,
            "ratio_to_floor_per_cpu_s": (
                round(measured["raw"] / cpu_s / floor_per_cpu, 3)
                if cpu_s and floor_per_cpu
                else None
            ),
            # the same Kafka work with no logic: what the processor's own work costs
            "ratio_to_topology_floor_per_cpu_s": (
                round(measured["raw"] / cpu_s / topology_per_cpu, 3)
                if cpu_s and topology_per_cpu
                else None
            ),
            "broker_cpu_s": round(measured.get("broker_cpu_s", 0.0), 3) if broker_pid else None,
            "cpu_us_per_event": {
                part: round(us, 1)
                for part, us in cpu_per_event(step_cpu, int(measured["raw"]), cpu_s or None).items()
            },
            "dead_lettered": int(measured["dead_lettered"]),
            "duplicates_dropped": int(measured["duplicates_dropped"]),
            # the loop's checkpoint commits over the backlog (from its first message on)
            "checkpoint_share": measured.get("checkpoint_share"),
            "checkpoint_ms": measured.get("checkpoint_ms"),
            # the garbage collector's pauses (pipeline.gc_pauses; settings.gc_young_threshold)
            "gc_young_threshold": bench_settings.gc_young_threshold,
            "gc_share": measured.get("gc_share"),
            "gc_longest_ms": measured.get("gc_longest_ms"),
            # from the first statistics report to the newest, over the backlog and its lead-in
            "requests_per_1k": backlog_requests,
        }
        report["latency"] = [_latency_of(run.warehouse, phase) for phase in phases]
        customers = [
            str(c)
            for c in run.warehouse.query(
                "SELECT customer_id FROM profiles WHERE is_anonymous = 0 AND merged_into IS NULL "
                "ORDER BY customer_id"
            )["customer_id"]
        ]
        report["collector"] = collector_throughput(
            run.address,
            batch=config.collector_batch,
            connections=config.collector_connections,
            seconds=config.collector_seconds,
            home=work,
            gc_young_threshold=bench_settings.gc_young_threshold,
        )
    rng = random.Random(config.seed)
    picks = [rng.choice(customers) for _ in range(config.api_requests)]
    latencies, api_gc = api_http_latencies(
        work,
        picks,
        k=config.api_k,
        requests=config.api_requests,
        gc_young_threshold=bench_settings.gc_young_threshold,
    )
    report["api"] = {
        "k": config.api_k,
        "customers": len(customers),
        "http": percentiles(latencies),
        **api_gc,
    }
    report["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    report["duration_s"] = round((datetime.now(UTC) - started_at).total_seconds(), 1)
    return report


def chart(report: dict[str, Any]) -> go.Figure:
    """Latency percentiles against offered load, throughput bars, latency per step, the CPU
    that the processor and the broker spend per 1,000 events, backlog and paced, where a
    processor core goes, and the requests the processor sends the broker per 1,000 events."""
    fig = make_subplots(
        rows=2,
        cols=3,
        subplot_titles=(
            "End-to-end latency vs offered load",
            "Throughput (events/s)",
            "Where the time goes (p50 per step)",
            "CPU-seconds per 1,000 events",
            "Where a processor core goes (backlog, µs per event)",
            "Broker requests per 1,000 events",
        ),
    )
    loads = [p["offered_eps"] for p in report["latency"]]
    for q in ("p50", "p95", "p99"):
        fig.add_trace(
            go.Scatter(
                x=loads, y=[p[f"{q}_ms"] for p in report["latency"]], mode="lines+markers", name=q
            ),
            row=1,
            col=1,
        )
    bars = {
        "floor (bare counter)": report["floor"]["events_per_s"],
        "topology floor (no logic)": report["topology_floor"]["events_per_s"],
        "processor (full path)": report["processor"]["events_per_s"],
        "collector (HTTP)": report["collector"]["events_per_s"],
    }
    for n, eps in report.get("scaleout", {}).get("events_per_s", {}).items():
        bars[f"{n} replica process(es)"] = eps
    fig.add_trace(
        go.Bar(x=list(bars), y=list(bars.values()), name="events/s", showlegend=False),
        row=1,
        col=2,
    )
    names = [f"{p['load_fraction']:.0%}" for p in report["latency"]]
    for step, _ in lineage.STEPS[1:]:
        fig.add_trace(
            go.Bar(
                x=names,
                y=[
                    next((st["p50_ms"] for st in p.get("steps", ()) if st["step"] == step), 0)
                    for p in report["latency"]
                ],
                name=step,
            ),
            row=1,
            col=3,
        )
    proc = report["processor"]
    per_1k = 1000 / proc["events"]
    cpu_rows = [("backlog", proc.get("cpu_s"), proc.get("broker_cpu_s"), per_1k)] + [
        (name, p.get("processor_cpu_s_per_1k"), p.get("broker_cpu_s_per_1k"), 1.0)
        for name, p in zip(names, report["latency"], strict=True)
    ]
    for who, index in (("processor CPU", 1), ("broker CPU", 2)):
        fig.add_trace(
            go.Bar(
                x=[row[0] for row in cpu_rows],
                y=[
                    None if row[index] is None else round(float(row[index]) * row[3], 3)
                    for row in cpu_rows
                ],
                name=who,
            ),
            row=2,
            col=1,
        )
    per_event = proc.get("cpu_us_per_event") or {}
    parts = [(step, us) for step, us in per_event.items() if step != "total"]
    fig.add_trace(
        go.Bar(
            x=[us for _, us in parts],
            y=[step for step, _ in parts],
            orientation="h",
            name="µs per event",
            showlegend=False,
        ),
        row=2,
        col=2,
    )
    request_rows = [("backlog", proc.get("requests_per_1k") or {})] + [
        (name, p.get("requests_per_1k") or {})
        for name, p in zip(names, report["latency"], strict=True)
    ]
    series = _top_requests([counts for _, counts in request_rows])
    for api in series:
        fig.add_trace(
            go.Bar(
                x=[row for row, _ in request_rows],
                y=[_request_count(counts, api, series) for _, counts in request_rows],
                name=api,
            ),
            row=2,
            col=3,
        )
    fig.update_layout(barmode="stack", height=900)
    fig.update_yaxes(title_text="requests per 1k events", row=2, col=3)
    fig.update_xaxes(title_text="load (share of max)", row=2, col=1)
    fig.update_yaxes(title_text="CPU-s per 1k events", row=2, col=1)
    fig.update_xaxes(title_text="CPU µs per raw event", row=2, col=2)
    fig.update_xaxes(title_text="load (share of max)", row=1, col=3)
    fig.update_yaxes(title_text="ms", row=1, col=3)
    fig.update_xaxes(title_text="offered load (events/s)", row=1, col=1)
    fig.update_yaxes(title_text="ms (stored - ingested)", row=1, col=1)
    fig.update_layout(
        title=f"pipeline bench {report['started_at']} "
        f"(full path / floor = {report['processor']['ratio_to_floor']})",
    )
    return fig


_OTHER_REQUESTS = "other requests"


def _top_requests(rows: list[dict[str, float]], n: int = 4) -> list[str]:
    """The ``n`` most frequent ``client:API`` over ``rows``, then the rest as one series."""
    totals: Counter[str] = Counter()
    for counts in rows:
        totals.update(counts)
    top = [name for name, _ in totals.most_common(n)]
    return top + ([_OTHER_REQUESTS] if len(totals) > n else [])


def _request_count(counts: dict[str, float], name: str, series: list[str]) -> float:
    """One series' requests per 1,000 events; "other requests" sums those of no series."""
    if name != _OTHER_REQUESTS:
        return counts.get(name, 0.0)
    return round(sum(v for k, v in counts.items() if k not in series), 1)


def write_results(report: dict[str, Any], home: Path) -> tuple[Path, Path]:
    """Write ``home/bench/<timestamp>.json`` and ``.html``; return both paths."""
    out = home / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(report["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    json_path, html_path = out / f"{stamp}.json", out / f"{stamp}.html"
    report["files"] = {"json": str(json_path), "chart": str(html_path)}
    json_path.write_text(json.dumps(report, indent=2))
    chart(report).write_html(html_path, include_plotlyjs="directory")
    return json_path, html_path
