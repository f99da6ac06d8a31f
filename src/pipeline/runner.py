"""Running the pipeline: producing simulated traffic, running the processor, summarizing a run.

Used by the CLI (``pipeline demo``/``up``/``simulate``), the notebooks and the integration tests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pipeline.broker import broker_for, client_config
from pipeline.catalog import Catalog, load_catalog
from pipeline.metrics import StreamMetrics
from pipeline.schemas import default_registry
from pipeline.settings import Settings
from pipeline.simulate import RawMessage, Simulation, SimulationConfig, default_end, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.topology import build_application

log = logging.getLogger(__name__)

BROKER_FILE = "broker.json"


def make_producer(settings: Settings, address: str) -> Producer:
    """An idempotent producer (acks=all): a retried send never duplicates a message."""
    return Producer(
        {
            **client_config(settings, address),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 200_000,
            "compression.type": "lz4",
        }
    )


def produce_messages(
    settings: Settings,
    address: str,
    messages: Sequence[RawMessage],
    *,
    rate: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> float:
    """Send ``messages`` to the raw topic in order, optionally paced at ``rate`` msg/s.

    Returns the seconds it took, including the final flush (all acknowledged).
    """
    producer = make_producer(settings, address)
    topic = settings.topics.raw
    start = time.monotonic()
    for i, msg in enumerate(messages):
        if rate:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                producer.produce(topic, value=msg.value, key=msg.key)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)
            if on_progress:
                on_progress(1000)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} messages were not acknowledged by the broker")
    if on_progress:
        on_progress(len(messages) % 1000)
    return time.monotonic() - start


@dataclass
class Run:
    """One processor run's parts, for callers that drive it (demo, tests, notebooks)."""

    settings: Settings
    address: str
    catalog: Catalog
    warehouse: LocalWarehouse
    metrics: StreamMetrics = field(default_factory=StreamMetrics)


@contextmanager
def pipeline_run(settings: Settings) -> Iterator[Run]:
    """Broker (embedded unless configured), topics, catalog and warehouse for one run."""
    catalog = load_catalog(settings.catalog_path)
    with broker_for(settings) as address:
        settings.home.mkdir(parents=True, exist_ok=True)
        (settings.home / BROKER_FILE).write_text(json.dumps({"address": address}))
        warehouse = LocalWarehouse(settings.warehouse_path)
        try:
            yield Run(settings=settings, address=address, catalog=catalog, warehouse=warehouse)
        finally:
            warehouse.close()
            (settings.home / BROKER_FILE).unlink(missing_ok=True)


def process_until_idle(
    run: Run,
    *,
    expected_raw: int,
    feed: Callable[[], None] | None = None,
    idle_s: float = 1.0,
    timeout_s: float = 600.0,
    on_tick: Callable[[StreamMetrics], None] | None = None,
) -> None:
    """Run the processor in this thread until it consumed ``expected_raw`` raw messages and
    nothing moved for ``idle_s`` (every checkpoint flushed); ``feed`` runs in a thread."""
    registry = default_registry()
    app = build_application(
        run.settings,
        run.address,
        catalog=run.catalog,
        registry=registry,
        warehouse=run.warehouse,
        metrics=run.metrics,
    )
    m = run.metrics
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            if feed is not None:
                feed()
            deadline = time.monotonic() + timeout_s
            last: tuple[int, ...] = ()
            still_since = time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(0.1)
                if on_tick:
                    on_tick(m)
                now = m.progress()
                if now != last:
                    last, still_since = now, time.monotonic()
                elif m.drained(expected_raw) and time.monotonic() - still_since >= idle_s:
                    return
            log.error("processing did not finish within %.0fs", timeout_s)
        except BaseException as exc:
            errors.append(exc)
        finally:
            app.stop()

    watcher = threading.Thread(target=watch, name="pipeline-watch", daemon=True)
    watcher.start()
    app.run()
    watcher.join()
    if errors:
        raise errors[0]


def simulate_for(settings: Settings, events: int, seed: int, catalog: Catalog) -> Simulation:
    """The seeded simulation a demo of ``events`` messages uses (period ends today 00:00 UTC)."""
    return simulate(SimulationConfig(events=events, seed=seed, end=default_end()), catalog)


def summarize(run: Run, sim: Simulation, *, produce_s: float) -> dict[str, Any]:
    """Measured figures next to the simulator's ground truth."""
    m = run.metrics
    truth = sim.ground_truth
    wh = run.warehouse
    live = "SELECT COUNT(*) FROM profiles WHERE merged_into IS NULL AND is_anonymous = ?"
    customers = int(wh.scalar(live, (0,)))
    anonymous = int(wh.scalar(live, (1,)))
    true_known = sum(1 for c in truth.expected_event_counts if not c.startswith("anon:"))
    n_dup = sum(1 for msg in sim.messages if msg.kind == "duplicate")
    n_bad = sum(1 for msg in sim.messages if msg.kind == "malformed")
    elapsed = (m.last_stored_s - m.first_in_s) if m.last_stored_s and m.first_in_s else float("nan")
    return {
        "events_produced": len(sim.messages),
        "events_valid": m.valid,
        "events_valid_truth": len(sim.messages) - n_bad,
        "dead_lettered": m.dead_lettered_total,
        "dead_lettered_truth": n_bad,
        "dead_letters_by_reason": dict(m.dead_lettered),
        "duplicates_dropped": m.duplicates_dropped,
        "duplicates_truth": n_dup,
        "events_stored": int(wh.scalar("SELECT COUNT(*) FROM events")),
        "events_stored_truth": sum(truth.expected_event_counts.values()),
        "customers": customers,
        "customers_truth": true_known,
        "anonymous_profiles": anonymous,
        "anonymous_profiles_truth": len(truth.expected_event_counts) - true_known,
        "identities_linked": int(wh.scalar("SELECT COUNT(*) FROM identity_links")),
        "identities_linked_truth": len(truth.identity_links),
        "identities_merged": m.identities_merged,
        "events_merged": m.events_merged,
        "replays_dropped": m.replays_dropped,
        "produce_s": round(produce_s, 2),
        "process_s": round(elapsed, 2),
        "throughput_eps": round(m.raw_in / elapsed, 1) if elapsed == elapsed and elapsed else None,
        "latency_ms": m.latency_percentiles(),
    }


def write_ground_truth(settings: Settings, sim: Simulation) -> Path:
    out = settings.home / "ground_truth"
    sim.write_ground_truth(out)
    return out
