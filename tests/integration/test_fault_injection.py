"""Processor killed (SIGKILL x3, SIGTERM x1) mid-stream and restarted: nothing lost or doubled.

Modelled on Kafka's transactions system test: a fixed input is seeded, the processor is killed at
different points after >= 20% progress and restarted each time, and the outputs are compared with
the simulator's ground truth. The embedded broker leaves records of aborted transactions visible,
and stage 2 reads stage 1's output uncommitted by default, so this also proves that the effects
are idempotent, not only transactional. (At-least-once
cannot be tested this way here: the embedded broker's wrong ListOffsets makes a restarted
at-least-once processor refuse its own state, ``InvalidStoreChangelogOffset``.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.broker import EmbeddedBroker, ensure_topics, free_port
from pipeline.catalog import load_catalog
from pipeline.runner import produce_messages
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.stores.local import LocalWarehouse

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = int(os.environ.get("FAULT_TEST_EVENTS", "100000"))
RESUME_LIMIT_S = 30.0
# Two replicas killed in turn failed on the embedded broker in 4 runs of 16, under either
# consumer isolation: in 3, profile updates were lost (the 2 analysed: a replica took a
# partition over without replaying the changelog updates the other had made); in 1, no replica
# resumed. Likely cause:
# quixstreams sizes changelog recovery by ListOffsets, which Tansu answers wrongly (0 for
# read_committed while a transaction is open, base of the newest batch + 1 for
# read_uncommitted). Kept as a reproducer; see the README.
TWO_REPLICAS = pytest.param(
    2,
    marks=pytest.mark.skipif(
        os.environ.get("FAULT_TEST_TWO_REPLICAS") != "1",
        reason="known failure on the embedded broker (set FAULT_TEST_TWO_REPLICAS=1 to run)",
    ),
)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker.start() as b:
        yield b


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with LocalWarehouse(db, read_only=True) as wh:
            return int(wh.scalar("SELECT COUNT(*) FROM events"))
    except Exception:  # the file may be mid-creation right after a restart
        return 0


@pytest.mark.parametrize("replicas", [1, TWO_REPLICAS])
def test_kills_and_restarts_lose_nothing_and_double_nothing(
    broker: EmbeddedBroker, tmp_path: Path, replicas: int
) -> None:
    """One replica: a kill aborts both stages' work together, but the aborted stage-1 records
    stay readable and the sinks wrote ahead of the commit, so the restarted processor meets
    effects it must not repeat. Two replicas, killed in turn: stage 2 of a customer often runs
    in the replica that was not killed and has committed effects of the killed one's
    uncommitted records (read_uncommitted, the default) when their replay arrives."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(
        PIPELINE_HOME=str(home),
        PIPELINE_BROKER=broker.address,
        PIPELINE_CONSUMER_SESSION_TIMEOUT_MS="6000",
        PIPELINE_COMMIT_INTERVAL_S="0.5",
        PIPELINE_COLLECTOR__PORT=str(free_port()),
        PIPELINE_API__PORT="0",
        PIPELINE_METRICS_PORT="0",
    )
    settings = Settings(home=home, broker=broker.address)
    ensure_topics(settings, broker.address)
    sim = simulate(
        SimulationConfig(EVENTS, end=datetime(2026, 11, 1, tzinfo=UTC), seed=99), load_catalog()
    )
    produce_messages(settings, broker.address, sim.messages)
    truth = sim.ground_truth
    expected = sum(truth.expected_event_counts.values())
    db = home / "warehouse.sqlite"

    logs: list[Path] = []

    def start(replica: int) -> subprocess.Popen[bytes]:
        command = ["up", "--no-workbench"]
        if replicas > 1:
            command = ["process", "--instance-id", str(replica)]
        logs.append(tmp_path / f"processor-{replica}-{len(logs)}.log")
        with logs[-1].open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline", *command],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def died(replica: int) -> str:
        """What the replica's processor that stopped by itself last wrote."""
        log = [p for p in logs if p.name.startswith(f"processor-{replica}-")][-1]
        return log.read_text(errors="replace")[-3000:]

    faults = [
        (0.20, signal.SIGKILL),
        (0.40, signal.SIGKILL),
        (0.55, signal.SIGTERM),
        (0.70, signal.SIGKILL),
    ]
    resumes: list[float] = []
    procs = [start(r) for r in range(replicas)]
    try:
        for n, (fraction, sig) in enumerate(faults):
            victim = n % replicas
            deadline = time.monotonic() + 600
            while _stored(db) < fraction * expected:
                for r, p in enumerate(procs):
                    assert p.poll() is None, f"processor {r} died by itself:\n{died(r)}"
                assert time.monotonic() < deadline, f"no progress to {fraction:.0%}"
                time.sleep(0.2)
            procs[victim].send_signal(sig)
            procs[victim].wait(timeout=60)
            if sig == signal.SIGTERM:
                assert procs[victim].returncode == 0, "SIGTERM must stop the processor cleanly"
            before = _stored(db)
            restarted = time.monotonic()
            procs[victim] = start(victim)
            while _stored(db) <= before:
                assert procs[victim].poll() is None, f"restarted one died:\n{died(victim)}"
                assert time.monotonic() - restarted < 120, "processing did not resume"
                time.sleep(0.2)
            resumes.append(time.monotonic() - restarted)
        deadline = time.monotonic() + 900
        while _stored(db) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a few more checkpoints: profiles and dead letters flush too
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)

    print(f"resume times after each fault (s): {[round(r, 1) for r in resumes]}")
    assert max(resumes) < RESUME_LIMIT_S
    with LocalWarehouse(db, read_only=True) as wh:
        ids = wh.query("SELECT message_id FROM events")["message_id"]
        valid = {m.message_id for m in sim.messages if m.kind == "valid"}
        assert set(ids) == valid, "events lost or invented"
        per_customer = wh.query(
            "SELECT customer_id, COUNT(*) AS n FROM events GROUP BY customer_id"
        )
        assert dict(zip(per_customer.customer_id, per_customer.n.astype(int), strict=True)) == (
            truth.expected_event_counts
        )
        profiles = wh.query(
            "SELECT customer_id, event_count FROM profiles WHERE merged_into IS NULL"
        )
        # every event's effect on its profile counted exactly once
        assert (
            dict(zip(profiles.customer_id, profiles.event_count.astype(int), strict=True))
            == truth.expected_event_counts
        )
        links = wh.query("SELECT anonymous_id, customer_id FROM identity_links")
        assert dict(zip(links.anonymous_id, links.customer_id, strict=True)) == (
            truth.identity_links
        )
        n_malformed = sum(1 for m in sim.messages if m.kind == "malformed")
        assert int(wh.scalar("SELECT COUNT(*) FROM dead_letters")) == n_malformed
