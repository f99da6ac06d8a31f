"""Scale-out: processor replicas in one consumer group, each in its own process.

``pipeline process`` runs one replica (:func:`run_replica`): only the stream processor, against
the configured broker or the one a running ``pipeline up`` recorded, with its own
``instance_id`` (hence its own transactional.id and state directory) and its own metrics port.
It reports its counters to ``HOME/replicas/<instance_id>.json`` twice a second, so that a
parent (``pipeline up --replicas N``, the scale-out benchmark) can tell when the group drained.

``pipeline up --replicas N`` (:func:`serve_replicas`) runs the broker, the collector, API and
workbench, and the trigger scan and delivery once, in the parent, and N replicas as child
processes. Nothing is restarted silently: if a replica exits on its own, the others are stopped
and the command fails saying which one. Unlike ``pipeline up`` with one in-process processor,
it does not start a new embedded broker when the old one dies (the replicas' state would have
to be wiped under them): it stops with a message and can be started again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from pydantic import BaseModel, SecretStr

from pipeline.broker import client_config, ensure_topics, topic_partitions, wait_until_ready
from pipeline.errors import BrokerError, ConfigurationError, PipelineError
from pipeline.gc_pauses import tuned_and_counted
from pipeline.metrics import StreamMetrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

STATUS_DIR = "replicas"
STATUS_INTERVAL_S = 0.5
# the embedded broker's session timeout (see pipeline.stream.topology): a child told the
# broker's address would otherwise think it talks to a cluster and wait librdkafka's 45 s
EMBEDDED_SESSION_TIMEOUT_MS = 3000


class ReplicaError(PipelineError):
    """A processor replica exited when nobody asked it to, or did not stop when asked."""


def status_path(settings: Settings) -> Path:
    """Where the replica ``settings.instance_id`` reports its progress."""
    return settings.home / STATUS_DIR / f"{settings.instance_id}.json"


def replica_instance_id(settings: Settings, index: int) -> str:
    """The ``instance_id`` of child ``index`` of a deployment whose own id is the settings'."""
    return f"{settings.instance_id}-{index}"


def _plain(value: Any) -> Any:
    """A JSON-able copy of a settings value, secrets revealed (they travel to a child process)."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value


def settings_env(settings: Settings) -> dict[str, str]:
    """``PIPELINE_*`` variables that make a child process read exactly ``settings``.

    Settings built in code (``--home``, tests, the benchmark) are not in this process's
    environment, so the child cannot simply inherit it. Unset optional fields are left out.
    """
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = _plain(getattr(settings, name))
        if value is None:
            continue
        key = f"PIPELINE_{name.upper()}"
        if isinstance(value, dict | list):
            env[key] = json.dumps(value)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        else:
            env[key] = str(value)
    return env


def replica_settings(settings: Settings, index: int, address: str) -> Settings:
    """The settings child ``index`` runs with: same deployment, own id, port and state."""
    update: dict[str, Any] = {
        "broker": address,
        "instance_id": replica_instance_id(settings, index),
        "metrics_port": settings.metrics_port + index if settings.metrics_port else 0,
    }
    if settings.embedded and settings.consumer_session_timeout_ms is None:
        update["consumer_session_timeout_ms"] = EMBEDDED_SESSION_TIMEOUT_MS
    return settings.model_copy(update=update)


@dataclass
class Replica:
    """A started ``pipeline process`` child."""

    index: int
    settings: Settings
    process: subprocess.Popen[bytes]

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict[str, Any] | None:
        """Its latest progress report, or None before the first one."""
        try:
            data: dict[str, Any] = json.loads(status_path(self.settings).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data


def spawn_replicas(
    settings: Settings,
    count: int,
    address: str,
    *,
    output: Callable[[int], IO[bytes] | None] = lambda _index: None,
    fresh_state: bool = True,
    start_after: Path | None = None,
) -> list[Replica]:
    """Start ``count`` ``pipeline process`` children against the broker at ``address``.

    Each child gets this process's settings (see :func:`settings_env`) with its own id, metrics
    port and state directory, and stops by itself if this process disappears. ``fresh_state``
    wipes their state directories first (required after a new embedded broker). ``output``
    gives the file a child writes its output to (None: this process's stdout and stderr).
    With ``start_after`` the children wait for that file before joining the group (see
    :func:`run_replica`).
    """
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    replicas: list[Replica] = []
    try:
        for index in range(count):
            child = replica_settings(settings, index, address)
            if fresh_state:
                shutil.rmtree(child.state_dir, ignore_errors=True)
            status_path(child).unlink(missing_ok=True)
            out = output(index)
            command = ["process", "--parent-pid", str(os.getpid())]
            if start_after is not None:
                command += ["--start-after", str(start_after.absolute())]
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *command],
                env={**inherited, **settings_env(child)},
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                # signals reach a child only through its parent, which forwards SIGTERM
                start_new_session=True,
            )
            replicas.append(Replica(index, child, process))
    except BaseException:
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: Sequence[Replica], timeout_s: float = 60.0) -> dict[str, int]:
    """SIGTERM every running replica (a clean stop: commit, leave the group) and wait; those
    still running after ``timeout_s`` are killed. Returns each one's exit code."""
    for r in replicas:
        if r.process.poll() is None:
            r.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int] = {}
    for r in replicas:
        try:
            codes[r.instance_id] = r.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error(
                "replica %s (pid %s) did not stop within %.0fs; killed",
                r.instance_id,
                r.pid,
                timeout_s,
            )
            r.process.kill()
            codes[r.instance_id] = r.process.wait()
    return codes


def _metrics_snapshot(metrics: StreamMetrics) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for f in dataclasses.fields(metrics):
        value = getattr(metrics, f.name)
        if isinstance(value, Counter):  # keys may be tuples, JSON wants strings
            snap[f.name] = {
                "/".join(map(str, k)) if isinstance(k, tuple) else str(k): v
                for k, v in value.items()
            }
        elif isinstance(value, int | float) or value is None:
            snap[f.name] = value
    # partitions behind their high watermark, for whoever must tell a stuck group from a slow one
    snap["lag"] = {f"{t}[{p}]": n for (t, p), n in sorted(metrics.consumer_lag().items()) if n}
    return snap


def aggregate(statuses: Sequence[Mapping[str, Any]]) -> StreamMetrics:
    """The group's metrics: every replica's counters summed (``first_in_s`` the earliest,
    ``last_stored_s`` the latest: ``time.monotonic`` is one clock for all processes on Linux)."""
    total = StreamMetrics()
    for f in dataclasses.fields(total):
        values = [s[f.name] for s in statuses if s.get(f.name) is not None]
        current = getattr(total, f.name)
        if isinstance(current, Counter):
            for v in values:
                current.update(v)
        elif f.name == "first_in_s":
            total.first_in_s = min(values, default=None)
        elif f.name == "last_stored_s":
            total.last_stored_s = max(values, default=None)
        elif isinstance(current, int) and not isinstance(current, bool):
            setattr(total, f.name, sum(values))
    return total


def _write_status(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def run_replica(
    settings: Settings,
    *,
    announce: Callable[[str], None] = log.warning,
    parent_pid: int | None = None,
    start_after: Path | None = None,
) -> dict[str, Any]:
    """Run the stream processor, and nothing else, until SIGTERM/SIGINT (a clean stop).

    With ``settings.broker`` unset it joins the embedded broker of a running ``pipeline up``;
    that broker may be newer than this replica's state, so the state is wiped first and
    restored from the changelog topics. With ``parent_pid`` it also stops once that process is
    gone. With ``start_after`` it reports ``ready`` and waits for that file to exist before it
    joins the group, so that replicas started together get their partitions in one rebalance
    (the benchmark uses it). Returns its last progress report.
    """
    from pipeline.broker import broker_address
    from pipeline.catalog import load_catalog
    from pipeline.gdpr import close_source, suppression_source
    from pipeline.observability import start_metrics_server
    from pipeline.runner import _bigquery
    from pipeline.schemas import default_registry
    from pipeline.stores.local import LocalWarehouse
    from pipeline.stream.topology import build_application

    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # until app.run() takes over the signals, a SIGTERM during start-up is a clean stop too
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _signum, _frame: stopping.set())
    address = broker_address(settings)
    if settings.broker is None:
        if settings.instance_id == "0":
            # fencing each other's transactions and sharing one state directory
            raise ConfigurationError(
                "instance id 0 is the one of `pipeline up`'s own processor: give this replica "
                "another (--instance-id or PIPELINE_INSTANCE_ID)"
            )
        shutil.rmtree(settings.state_dir, ignore_errors=True)
    wait_until_ready(address, timeout_s=30, config=client_config(settings, address))
    ensure_topics(settings, address)
    catalog = load_catalog(settings.catalog_path)
    metrics = StreamMetrics()
    path = status_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        warehouse = stack.enter_context(LocalWarehouse(settings.warehouse_path))
        extra = _bigquery(settings)
        for wh in extra:
            stack.callback(wh.close)
        suppressed = suppression_source(settings, address)
        stack.callback(close_source, suppressed)
        app = build_application(
            settings,
            address,
            catalog=catalog,
            registry=default_registry(),
            warehouse=warehouse,
            metrics=metrics,
            extra_warehouses=extra,
            suppressed=suppressed,
        )
        _remember_stop_signals(app, stopping)
        server = start_metrics_server(metrics, settings.metrics_host, settings.metrics_port)
        stack.callback(server)
        base = {
            "instance_id": settings.instance_id,
            "pid": os.getpid(),
            "consumer_group": settings.consumer_group,
            "broker": address,
            "metrics_url": server.url,
        }
        announce(
            f"replica {settings.instance_id} (pid {os.getpid()}): group "
            f"{settings.consumer_group}, broker {address}, state {settings.state_dir}, "
            f"metrics {server.url}"
        )

        phase = ["starting"]
        reporting = threading.Lock()

        def report(state: str | None = None) -> dict[str, Any]:
            with reporting:
                if state is not None:
                    phase[0] = state
                payload = {
                    **base,
                    "state": phase[0],
                    "at_s": time.monotonic(),
                    **_metrics_snapshot(metrics),
                }
                _write_status(path, payload)
                return payload

        done = threading.Event()

        def watch() -> None:
            while not done.wait(STATUS_INTERVAL_S):
                report()
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("parent %s is gone: replica %s stops", parent_pid, base["pid"])
                    stopping.set()
                if stopping.is_set():
                    app.stop()  # again each time: a stop before app.run() starts is forgotten

        report()
        watcher = threading.Thread(target=watch, name="replica-status", daemon=True)
        watcher.start()
        state = "failed"
        try:
            if start_after is not None:
                report("ready")
                while not start_after.exists() and not stopping.wait(0.02):
                    pass
            if not stopping.is_set():
                report("running")
                with tuned_and_counted(metrics.gc, settings.gc_young_threshold):
                    app.run()  # installs its own SIGINT/SIGTERM handlers: a clean stop
            state = "stopped"
        finally:
            done.set()
            watcher.join()
            final = report(state)
    return final


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (in the main thread; elsewhere signals are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.debug("signal %s: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _remember_stop_signals(app: Any, stopping: threading.Event) -> None:
    """Let the signal handlers that ``app.run()`` installs also set ``stopping``.

    quixstreams' handlers call ``app.stop()``, which ``run()`` forgets when the signal comes
    before it has subscribed (it marks itself running after that): a replica sent SIGTERM just
    as it started kept processing until it was killed. With ``stopping`` set, the replica's
    status thread calls ``app.stop()`` again every half second, which a running loop obeys.
    """
    on_sigint, on_sigterm = app._on_sigint, app._on_sigterm  # no public hook

    def sigint(*args: Any) -> None:
        stopping.set()
        on_sigint(*args)

    def sigterm(*args: Any) -> None:
        stopping.set()
        on_sigterm(*args)

    app._on_sigint, app._on_sigterm = sigint, sigterm


def serve_replicas(
    settings: Settings,
    replicas: int,
    *,
    announce: Callable[[str], None] = log.warning,
    services: Sequence[Callable[[Any], Callable[[], None]]] = (),
) -> None:
    """``pipeline up --replicas N``: broker, services and trigger scan here, N replicas as
    child processes, until SIGINT/SIGTERM (forwarded to the replicas as SIGTERM).

    Raises :class:`ReplicaError` when a replica exits on its own and :class:`BrokerError`
    when the embedded broker dies; the other replicas are stopped first in both cases.
    """
    from pipeline.runner import make_producer, pipeline_run, scan_step, trigger_delivery
    from pipeline.stream.trigger_scan import scan_periodically

    if settings.embedded and settings.partitions < replicas:
        # a fresh embedded broker: give its topics a partition per replica (none sits idle)
        announce(f"{replicas} replicas: the embedded broker's topics get {replicas} partitions")
        settings = settings.model_copy(update={"partitions": replicas})
    stop = threading.Event()
    failure: PipelineError | None = None
    with _stop_on_signals(stop), pipeline_run(settings) as run:
        announce(
            f"pipeline up: broker {run.address} "
            f"({'embedded' if settings.embedded else 'external'}), home {settings.home}, "
            f"{replicas} processor replicas in group {settings.consumer_group}; "
            f"send traffic with: PIPELINE_BROKER={run.address} pipeline simulate"
        )
        partitions = topic_partitions(settings, run.address, settings.topics.raw)
        if partitions is not None and partitions < replicas:
            announce(
                f"{settings.topics.raw} has {partitions} partition(s): "
                f"{replicas - partitions} of the {replicas} replicas will sit idle"
            )
        producer = make_producer(settings, run.address)
        scan: Callable[[], None] | None = None
        if settings.triggers.beside_processor:
            delivery = trigger_delivery(run, producer) if settings.delivery.enabled else None
            # (it queues again what a previous run scheduled and did not send, as in `up`)
            scan = scan_step(run, producer, delivery)

        scan_done = threading.Event()
        stops: list[Callable[[], None]] = []
        children = spawn_replicas(settings, replicas, run.address, fresh_state=settings.embedded)
        for r in children:
            announce(f"replica {r.instance_id}: pid {r.pid}")
        try:
            stops = [start(run) for start in services]
            if scan is not None:
                scan_periodically(scan, settings.triggers.scan_interval_s, scan_done)
            while not stop.wait(0.5):
                exited = [r for r in children if r.process.poll() is not None]
                if exited:
                    failure = ReplicaError(
                        "; ".join(
                            f"replica {r.instance_id} (pid {r.pid}) exited unexpectedly with "
                            f"code {r.process.returncode}"
                            for r in exited
                        )
                    )
                    break
                if not run.broker.alive():
                    failure = BrokerError(
                        "the embedded broker died and its topics are gone; with replicas, "
                        "`pipeline up` stops instead of starting a new broker: run it again"
                    )
                    break
            if failure is not None:
                announce(f"error: {failure}: stopping the replicas (nothing is restarted)")
        finally:
            scan_done.set()
            # with the broker gone there is nothing to commit to: a short grace, then killed
            codes = stop_replicas(children, 5.0 if isinstance(failure, BrokerError) else 60.0)
            for stop_service in reversed(stops):
                stop_service()
        unclean = {i: c for i, c in codes.items() if c != 0}
        if failure is None and unclean:
            failure = ReplicaError(f"replicas did not stop cleanly (exit codes {unclean})")
        announce(f"replicas stopped: {codes}")
    if failure is not None:
        raise failure
