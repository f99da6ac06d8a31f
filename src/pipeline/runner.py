"""Running the pipeline: producing simulated traffic, running the processor, summarizing a run.

Used by the CLI (``pipeline demo``/``up``/``simulate``), the notebooks and the integration tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from confluent_kafka import KafkaException, Producer

from pipeline.broker import BROKER_FILE, BrokerHandle, broker_for, producer_config
from pipeline.catalog import Catalog, load_catalog
from pipeline.errors import BrokerError, ConfigurationError, PipelineError, ProcessingTimeout
from pipeline.gc_pauses import tuned_and_counted
from pipeline.gdpr import close_source, suppression_source
from pipeline.metrics import StreamMetrics
from pipeline.schemas import default_registry
from pipeline.settings import Settings
from pipeline.simulate import Simulation, SimulationConfig, end_of, simulate
from pipeline.stores.local import LocalWarehouse, WarehouseWriter
from pipeline.stream.topology import build_application, stage_config

if TYPE_CHECKING:
    from pipeline.delivery.client import EmailPlatform
    from pipeline.stores.bigquery import BigQueryWarehouse
    from pipeline.stream.trigger_delivery import TriggeredDelivery
from pipeline.stream.trigger_scan import SegmentClock, emit_due, scan_periodically
from pipeline.triggers import Trigger

log = logging.getLogger(__name__)


class OutgoingMessage(Protocol):
    """What :func:`produce_messages` sends: a simulated ``RawMessage`` or a loadgen record."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...
    @property
    def delivered_ms(self) -> int: ...


def make_producer(settings: Settings, address: str) -> Producer:
    """An idempotent producer (acks=all): a retried send never duplicates a message."""
    return Producer(
        {
            **producer_config(settings, address),
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
    messages: Sequence[OutgoingMessage],
    *,
    rate: float | None = None,
    offsets_s: Sequence[float] | None = None,
    on_progress: Callable[[int], None] | None = None,
    stamp_delivered: bool = False,
    producer: Producer | None = None,
) -> float:
    """Send ``messages`` to the raw topic in order, paced at ``rate`` msg/s or each at its
    ``offsets_s`` (seconds from the start), or as fast as possible.

    Pass a ``producer`` (from :func:`make_producer`) to keep one warm across calls: a new one
    connects and sets up idempotence first, which holds its first messages back for a while.

    ``stamp_delivered`` sets each record's timestamp to the message's simulated delivery time,
    as the collector that received it would have: broker time then follows the simulated
    period, which the anomaly detectors need (and end-to-end latency figures do not).

    Returns the seconds it took, including the final flush (all acknowledged).
    """
    if offsets_s is not None and len(offsets_s) != len(messages):
        raise ValueError(f"{len(offsets_s)} offsets for {len(messages)} messages")
    if producer is None:
        producer = make_producer(settings, address)
    topic = settings.topics.raw
    # connect and learn the partitions before a paced run's clock starts
    try:
        producer.list_topics(topic, timeout=30)
    except KafkaException as exc:  # a wrong PIPELINE_BROKER, a stale broker.json
        raise BrokerError(f"cannot reach the broker at {address}: {exc.args[0]}") from exc
    start = time.monotonic()
    for i, msg in enumerate(messages):
        due = offsets_s[i] if offsets_s is not None else i / rate if rate else None
        if due is not None:
            ahead = start + due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                if stamp_delivered:
                    producer.produce(
                        topic, value=msg.value, key=msg.key, timestamp=msg.delivered_ms
                    )
                else:
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
    broker: BrokerHandle
    catalog: Catalog
    warehouse: LocalWarehouse
    metrics: StreamMetrics = field(default_factory=StreamMetrics)
    extra_warehouses: tuple[WarehouseWriter, ...] = ()

    @property
    def address(self) -> str:
        return self.broker.address


def _bigquery(settings: Settings) -> tuple[BigQueryWarehouse, ...]:
    """The BigQuery warehouse when enabled (production), schema ensured; else nothing."""
    if not settings.bigquery.enabled:
        return ()
    from pipeline.retention import retention_days
    from pipeline.stores.bigquery import BigQueryWarehouse

    bq = BigQueryWarehouse(settings.bigquery)
    bq.ensure_schema(retention_days(settings.retention))
    return (bq,)


LOCK_FILE = "run.lock"


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold ``home`` for this run: a second `pipeline up` or `demo` on the same home would
    reset the first one's stores and state (embedded broker) or share its ports and broker
    file. The kernel releases the lock when the process ends, however it ends."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigurationError(
            f"another pipeline run (pid {holder}) is using {home}: stop it, or give this one "
            "its own PIPELINE_HOME"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def pipeline_run(settings: Settings) -> Iterator[Run]:
    """Broker (embedded unless configured), topics, catalog and warehouse for one run; the
    home is held for the run (:func:`home_lock`)."""
    catalog = load_catalog(settings.catalog_path)
    with home_lock(settings.home), broker_for(settings) as broker:
        settings.home.mkdir(parents=True, exist_ok=True)
        # the store (with its tables) first: whoever finds the broker file finds a store too
        warehouse = LocalWarehouse(settings.warehouse_path)
        extra: tuple[BigQueryWarehouse, ...] = ()
        try:
            pid = broker.embedded.process.pid if broker.embedded else None
            (settings.home / BROKER_FILE).write_text(
                json.dumps({"address": broker.address, "embedded_pid": pid})
            )
            extra = _bigquery(settings)
            yield Run(
                settings=settings,
                broker=broker,
                catalog=catalog,
                warehouse=warehouse,
                extra_warehouses=extra,
            )
        finally:
            warehouse.close()
            for wh in extra:
                wh.close()
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
    nothing moved for ``idle_s`` (every checkpoint flushed); ``feed`` runs in a thread.

    Raises :class:`ProcessingTimeout` past ``timeout_s``: partial results are not a run.
    """
    registry = default_registry()
    suppressed = suppression_source(run.settings, run.address)
    app = build_application(
        run.settings,
        run.address,
        catalog=run.catalog,
        registry=registry,
        warehouse=run.warehouse,
        metrics=run.metrics,
        extra_warehouses=run.extra_warehouses,
        suppressed=suppressed,
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
            if m.drained(expected_raw):  # all consumed; only the final quiet wait was cut
                log.warning("all raw messages consumed; the time limit cut the final idle wait")
                return
            raise ProcessingTimeout(
                f"processing did not finish within {timeout_s:.0f} s: consumed "
                f"{m.raw_in - m.rekeyed} of {expected_raw} raw messages"
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            # quixstreams forgets a stop that comes before app.run() reaches its loop (it
            # resets its run tracker on start): stop again until run() has returned
            app.stop()
            while not returned.wait(0.2):
                app.stop()

    returned = threading.Event()
    watcher = threading.Thread(target=watch, name="pipeline-watch", daemon=True)
    watcher.start()
    try:
        with tuned_and_counted(run.metrics.gc, run.settings.gc_young_threshold):
            app.run()
    finally:
        returned.set()
        close_source(suppressed)
    watcher.join()
    if errors:
        raise errors[0]


def emit_triggers(run: Run) -> list[Trigger]:
    """One trigger scan: produce what became due since the last scan (see pipeline.triggers)."""
    producer = make_producer(run.settings, run.address)
    return emit_due(run.warehouse, producer, run.settings.topics.triggers, run.settings.triggers)


class ScanParts(Protocol):
    """What the trigger scan and the email delivery need: a processor's run, or a serving copy
    that holds every partition's profiles (:func:`start_copy_scan`)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def warehouse(self) -> LocalWarehouse: ...
    @property
    def catalog(self) -> Catalog: ...


@dataclass(frozen=True)
class CopyParts:
    """A serving copy's :class:`ScanParts`."""

    settings: Settings
    warehouse: LocalWarehouse
    catalog: Catalog


def segment_clock(run: ScanParts, producer: Producer) -> SegmentClock:
    """The clock of time-dependent segments, ticked by the trigger scan (see SegmentClock)."""
    every_ms = int(run.settings.triggers.segment_tick_minutes * 60_000)
    topic = run.settings.topics.attributed
    return SegmentClock(run.warehouse, producer, topic, stage_config(run.settings), every_ms)


def scan_step(
    run: ScanParts, producer: Producer, delivery: TriggeredDelivery | None
) -> Callable[[], None]:
    """One trigger scan, as run every ``triggers.scan_interval_s``: tick the segment clock,
    emit the triggers due and send their emails when delivery is on; a failure is logged and
    retried at the next interval.

    With delivery on, what a previous run scheduled and did not send is queued again first
    (``up`` and ``up --replicas`` both build their scan here), at every scan until that
    succeeds. Sending is tried at every scan whatever happened to the ticks and triggers: it
    needs no broker.
    """
    clock = segment_clock(run, producer)
    settings = run.settings
    unrecovered = delivery  # until recover() has succeeded once

    def recover() -> None:
        nonlocal unrecovered
        if unrecovered is None:
            return
        try:
            recovered = unrecovered.recover()
        except PipelineError:
            log.warning(
                "scheduled emails not queued again; retried at the next scan", exc_info=True
            )
            return
        unrecovered = None
        if recovered:
            log.info("%d scheduled emails queued again from the warehouse", recovered)

    recover()

    def scan() -> None:
        recover()
        try:
            clock.tick()
            fresh = emit_due(
                run.warehouse,
                producer,
                settings.topics.triggers,
                settings.triggers,
                record=delivery is None,  # else recorded with their emails
            )
            if delivery is not None:
                delivery.schedule(fresh)
        except PipelineError:
            log.warning("trigger scan failed; retried at the next interval", exc_info=True)
        if delivery is None:
            return
        try:
            delivery.deliver()
        except PipelineError:
            log.warning("email delivery failed; retried at the next interval", exc_info=True)

    return scan


def trigger_delivery(
    run: ScanParts, producer: Producer, platform: EmailPlatform | None = None
) -> TriggeredDelivery:
    """Emails for triggers, sent through the configured platform (or ``platform``)."""
    from pipeline.api.service import PersonalizationService
    from pipeline.delivery.client import DeliveryClient
    from pipeline.stream.trigger_delivery import TriggeredDelivery

    return TriggeredDelivery(
        service=PersonalizationService(
            run.settings,
            run.settings.warehouse_path,
            catalog=run.catalog,
            background_refresh=False,
        ),
        platform=platform or DeliveryClient(run.settings.delivery),
        warehouse=run.warehouse,
        producer=producer,
        dlq_topic=run.settings.topics.email_dlq,
        trigger_params=run.settings.triggers,
    )


def start_copy_scan(
    settings: Settings, address: str, caught_up: threading.Event, stop: threading.Event
) -> threading.Thread:
    """Run the trigger scan and, when on, the email delivery on a serving copy of the store
    (``pipeline follow --triggers``) once it has ``caught_up`` with the output topics, every
    ``triggers.scan_interval_s`` until ``stop``: where each processor replica keeps only its
    own partitions (Kubernetes), a scan there reads stale profiles after a rebalance, while the
    copy holds every partition's. Not before it caught up: half-applied topics would show carts
    whose orders are not read yet."""

    def run_scan() -> None:
        while not caught_up.wait(0.5):
            if stop.is_set():
                return
        warehouse = LocalWarehouse(settings.warehouse_path)  # (the follower's thread has its own)
        parts = CopyParts(settings, warehouse, load_catalog(settings.catalog_path))
        producer = make_producer(settings, address)
        delivery = trigger_delivery(parts, producer) if settings.delivery.enabled else None
        scan = scan_step(parts, producer, delivery)
        log.info(
            "trigger scan%s on the copy %s", " and delivery" if delivery else "", warehouse.path
        )
        try:
            scan_periodically(scan, settings.triggers.scan_interval_s, stop).join()
        finally:
            if delivery is not None:
                delivery.service.close()
            producer.flush(10)
            warehouse.close()

    thread = threading.Thread(target=run_scan, name="copy-trigger-scan", daemon=True)
    thread.start()
    return thread


class StopSignals:
    """Whether SIGINT or SIGTERM reached this process, even while its main thread is blocked
    in a Kafka call and so cannot run Python's handlers: CPython's C-level handler writes each
    signal's number to the wakeup fd, which a thread here reads. Create it in the main thread.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer = writer
        self._previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._read, name="stop-signals", daemon=True).start()

    def close(self) -> None:
        """Give the wakeup fd back to whoever had it."""
        signal.set_wakeup_fd(self._previous)
        self._writer.close()
        self._reader.shutdown(socket.SHUT_RDWR)  # ends the reading thread
        self._reader.close()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := self._reader.recv(64):
                if signal.SIGINT in data or signal.SIGTERM in data:
                    self.requested.set()


def _once(stop: Callable[[], None]) -> Callable[[], None]:
    """``stop``, run at most once however many threads call it."""
    lock = threading.Lock()
    done = False

    def run_once() -> None:
        nonlocal done
        with lock:
            if not done:
                done = True
                stop()

    return run_once


def _leave_dead_broker(settings: Settings) -> None:
    """Before this process is replaced or exits at once: forget the dead broker's address
    (``pipeline api``/``simulate`` read it from the home) and flush what was printed."""
    (settings.home / BROKER_FILE).unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()


def _restart_process(settings: Settings) -> NoReturn:
    """Replace this process by a fresh `pipeline up` (same PID, arguments and environment),
    which resets the local state and starts a new embedded broker like any start does."""
    _leave_dead_broker(settings)
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:
        log.exception("could not restart `pipeline up`")
        os._exit(1)


def _process_while_broker_lives(
    run: Run,
    *,
    services: Sequence[Callable[[Run], Callable[[], None]]] = (),
    on_broker_death: Callable[[bool], None] | None = None,
    grace_s: float = 5.0,
    stop_requested: threading.Event | None = None,
) -> None:
    """Run the processor until it is stopped (by a signal, or because the broker died).

    ``stop_requested`` (set when a stop signal came, :class:`StopSignals`) is obeyed again
    every half second: quixstreams' own handlers call ``app.stop()``, which ``run()`` forgets
    when the signal comes before its loop has subscribed, and `up` would then run on.

    The trigger scan runs beside it, every ``settings.triggers.scan_interval_s``, and so do
    ``services`` (each started with the run, returning its stop function).

    When the broker dies, the processor is stopped and its producer's undeliverable records
    dropped; the services are stopped once the processor has (or after ``grace_s``: a
    transactional commit against a dead broker can block the main thread for minutes), and
    then ``on_broker_death(processor_stopped)`` runs in the watchdog thread (it may replace
    the process).
    """
    producer = make_producer(run.settings, run.address)
    suppressed = suppression_source(run.settings, run.address)
    params = run.settings.triggers
    scan: Callable[[], None] | None = None
    if params.beside_processor:
        delivery = trigger_delivery(run, producer) if run.settings.delivery.enabled else None
        scan = scan_step(run, producer, delivery)  # (queues again what a run did not send)

    app = build_application(
        run.settings,
        run.address,
        catalog=run.catalog,
        registry=default_registry(),
        warehouse=run.warehouse,
        metrics=run.metrics,
        extra_warehouses=run.extra_warehouses,
        suppressed=suppressed,
    )
    done = threading.Event()
    stopped = threading.Event()
    broker_died = threading.Event()
    stops = [_once(start(run)) for start in services]

    def stop_services() -> None:
        for stop in reversed(stops):
            stop()

    def watchdog() -> None:
        while not done.wait(0.5):
            if not run.broker.alive():
                broker_died.set()
                app.stop(fail=True)  # nothing to commit to: the topics are gone
                # and what the producer still holds can never be delivered: without this, a
                # checkpoint flushing it waits out the delivery timeout (a minute) first
                app._producer.purge()  # type: ignore[no-untyped-call]  # no public handle on it
                processor_stopped = stopped.wait(grace_s)
                if not processor_stopped:
                    log.warning("processor blocked on the dead broker; stopping without it")
                    stop_services()
                if on_broker_death is not None:
                    on_broker_death(processor_stopped)
                return
            if stop_requested is not None and stop_requested.is_set():
                app.stop()  # again each time: a stop before app.run() subscribed is forgotten

    guard = threading.Thread(target=watchdog, name="broker-watchdog", daemon=True)
    guard.start()
    if scan is not None:
        scan_periodically(scan, params.scan_interval_s, done)
    try:
        with tuned_and_counted(run.metrics.gc, run.settings.gc_young_threshold):
            app.run()
    except Exception:
        if not broker_died.is_set():
            raise
        log.debug("processor stopped after the broker died", exc_info=True)
    finally:
        done.set()
        close_source(suppressed)
        stop_services()
        stopped.set()
    if broker_died.is_set():
        guard.join()  # on_broker_death decides what comes next


def serve(
    settings: Settings,
    *,
    announce: Callable[[str], None] = log.warning,
    services: Sequence[Callable[[Run], Callable[[], None]]] = (),
) -> None:
    """Run broker and processor until interrupted (SIGINT/SIGTERM stop it cleanly).

    If the embedded broker dies, its in-memory topics are gone: serving the old profiles would
    be serving state that no topic can reproduce. So `pipeline up` starts afresh: this process
    is replaced by a new `pipeline up`, which wipes the local state and starts a new broker,
    and this is announced; unless a stop signal came meanwhile, which stops it instead. (An
    external cluster's outages are handled by the clients' retries instead.)
    """
    stop_signals = StopSignals()
    # until quixstreams installs its own handlers (in app.run), SIGTERM would end the process
    # without unwinding: the embedded broker, in a session of its own, would outlive it
    previous_term = signal.signal(signal.SIGTERM, _interrupt)

    def on_broker_death(processor_stopped: bool) -> None:
        if stop_signals.requested.is_set():
            if not processor_stopped:  # blocked in a call to the dead broker: do not wait
                announce("stopped")
                _leave_dead_broker(settings)
                os._exit(0)
            return  # the main thread returns and stops as for any stop signal
        announce(
            "the embedded broker died and its topics are gone: restarting `pipeline up` "
            "with fresh processor state and local stores"
        )
        _restart_process(settings)

    try:
        with pipeline_run(settings) as run:
            announce(
                f"pipeline up: broker {run.address} "
                f"({'embedded' if settings.embedded else 'external'}), home {settings.home}; "
                f"send traffic with: PIPELINE_BROKER={run.address} pipeline simulate"
            )
            _process_while_broker_lives(
                run,
                services=services,
                on_broker_death=on_broker_death,
                stop_requested=stop_signals.requested,
            )
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        stop_signals.close()


def _interrupt(signum: int, frame: object) -> NoReturn:
    """SIGTERM as Ctrl-C: unwind, so every context manager stops what it started."""
    raise KeyboardInterrupt(f"signal {signum}")


def simulate_for(
    settings: Settings, events: int, seed: int, catalog: Catalog, *, end: str = ""
) -> Simulation:
    """The seeded simulation a demo of ``events`` messages uses; its period ends at 00:00 UTC
    of ``end`` (ISO date), today's when empty."""
    return simulate(SimulationConfig(events=events, seed=seed, end=end_of(end)), catalog)


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
        "segment_changes": m.segment_changes,
        "segment_sizes": {
            str(k): int(v)
            for k, v in wh.query(
                "SELECT segment, SUM(CASE change WHEN 'enter' THEN 1 ELSE -1 END) AS n "
                "FROM segment_changes GROUP BY segment"
            ).itertuples(index=False)
        },
        "triggers_emitted": {
            str(k): int(v)
            for k, v in wh.query(
                "SELECT trigger, COUNT(*) FROM email_triggers GROUP BY trigger"
            ).itertuples(index=False)
        },
        "produce_s": round(produce_s, 2),
        "process_s": round(elapsed, 2),
        "throughput_eps": round(m.raw_in / elapsed, 1) if elapsed == elapsed and elapsed else None,
        "latency_ms": m.latency_percentiles(),
    }


def write_ground_truth(settings: Settings, sim: Simulation) -> Path:
    out = settings.home / "ground_truth"
    sim.write_ground_truth(out)
    return out
