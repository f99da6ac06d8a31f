"""The `pipeline` command as a user runs it: real processes, real broker, real stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    cli_env,
    pipeline_cmd,
    run_cli,
    stop_up,
    stopped_after,
    wait_until_serving,
)
from esp_platform import platform_env, running_platform

from pipeline.broker import free_port
from pipeline.catalog import load_catalog
from pipeline.runner import simulate_for
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse

pytestmark = pytest.mark.integration


def test_demo_json_reports_measured_figures_next_to_truth(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = run_cli(home, tmp_path, "demo", "--events", "3000", "--seed", "5", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    for key in (
        "events_produced",
        "events_valid",
        "dead_lettered",
        "duplicates_dropped",
        "customers",
        "identities_merged",
        "throughput_eps",
        "latency_ms",
    ):
        assert key in summary
    assert summary["events_produced"] == 3000
    for measured in (
        "events_valid",
        "dead_lettered",
        "duplicates",
        "events_stored",
        "customers",
        "anonymous_profiles",
        "identities_linked",
    ):
        truth_key = f"{measured}_truth"
        got = summary[measured if measured != "duplicates" else "duplicates_dropped"]
        assert got == summary[truth_key], measured
    assert summary["throughput_eps"] > 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]

    # the stores outlive the run: `pipeline profile` reads them afterwards
    with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
        customer = wh.query(
            "SELECT customer_id FROM profiles WHERE is_anonymous = 0 AND merged_into IS NULL "
            "ORDER BY event_count DESC LIMIT 1"
        )["customer_id"][0]
    shown = run_cli(home, tmp_path, "profile", customer, "--json", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["customer_id"] == customer
    missing = run_cli(home, tmp_path, "profile", "nobody", timeout=60)
    assert missing.returncode == 1
    assert "no profile" in missing.stderr

    # `pipeline trace` shows where one stored event's time went, step by step
    with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
        stored = wh.query(
            "SELECT message_id, ingested_ms, stored_ms FROM events WHERE customer_id = ? LIMIT 1",
            (customer,),
        ).iloc[0]
    traced = run_cli(home, tmp_path, "trace", str(stored["message_id"]), "--json", timeout=60)
    assert traced.returncode == 0, traced.stderr
    trace = json.loads(traced.stdout)
    assert trace["customer_id"] == customer
    assert [s["step"] for s in trace["steps"]] == [
        "broker",
        "validate + enrich",
        "dedupe + stitch",
        "score + segments",
        "store",
    ]
    assert trace["total_ms"] == stored["stored_ms"] - stored["ingested_ms"]
    assert all(s["duration_ms"] >= 0 for s in trace["steps"][1:])

    # `pipeline forget`: its exit status tells a scheduled erasure job whether anything is left
    before = run_cli(home, tmp_path, "forget", customer, "--verify", timeout=60)
    assert before.returncode == 1, before.stderr
    assert json.loads(before.stdout)["rows"]["local.events"] > 0
    forgotten = run_cli(home, tmp_path, "forget", customer, timeout=120)
    assert forgotten.returncode == 0, forgotten.stderr[-3000:]
    report = json.loads(forgotten.stdout)
    assert report["suppressed"] and not any(report["rows"].values()), report
    after = run_cli(home, tmp_path, "forget", customer, "--verify", timeout=60)
    assert after.returncode == 0 and json.loads(after.stdout) == report
    # a mistyped home in a scheduled erasure fails, instead of "forgetting" in a new store
    typo = tmp_path / "hmoe"
    wrong = run_cli(typo, tmp_path, "forget", customer, timeout=60)
    assert wrong.returncode == 2 and "no warehouse at" in wrong.stderr, wrong.stderr[-2000:]
    assert not typo.exists()


def test_up_processes_traffic_readable_while_running_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    up = subprocess.Popen(
        pipeline_cmd("up", "--no-workbench"),
        env=cli_env(home, port),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with stopped_after(up, home) as log:
        # the collector answers once the broker is up and it can reach it
        wait_until_serving(up, f"http://127.0.0.1:{port}/health")
        sent = run_cli(home, tmp_path, "simulate", "--events", "1500", "--seed", "3", timeout=120)
        assert sent.returncode == 0, sent.stderr
        # and as a browser or backend would: through the collector over HTTP
        via_http = run_cli(
            home,
            tmp_path,
            *("simulate", "--events", "800", "--seed", "4"),
            *("--via-http", f"http://127.0.0.1:{port}"),
            timeout=120,
        )
        assert via_http.returncode == 0, via_http.stderr
        assert "accepted" in via_http.stdout + via_http.stderr
        # the same seeded simulations, to know what must arrive
        expected = sum(
            sum(
                simulate_for(
                    Settings(home=home), n, seed, load_catalog()
                ).ground_truth.expected_event_counts.values()
            )
            for n, seed in ((1500, 3), (800, 4))
        )
        # another process reads the warehouse while the processor writes to it
        stored = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (home / "warehouse.sqlite").exists():
                with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
                    stored = wh.counts()["events"]
                if stored >= expected:
                    break
            time.sleep(0.5)
        assert stored == expected
        # a second run on the same home is refused before it touches anything of the first
        second = run_cli(home, tmp_path, "demo", "--events", "200", timeout=60)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {up.pid}" in second.stderr and "Traceback" not in second.stderr
        with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
            assert wh.counts()["events"] == expected
        assert (home / "broker.json").exists()
    err = log[0]
    assert up.returncode == 0, err[-3000:]
    assert "stopped" in err
    assert not (home / "broker.json").exists()


class RunningUp:
    """A `pipeline up --no-workbench` on an embedded broker, and what a test asks of it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.home = tmp_path / "home"
        self.marker = self.home / "broker.json"
        self.process = subprocess.Popen(
            pipeline_cmd("up", "--no-workbench"),
            env=cli_env(self.home),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, predicate: Callable[[], bool], what: str, limit: float = 90) -> None:
        deadline = time.monotonic() + limit
        while not predicate():
            assert self.process.poll() is None, self.process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, what
            time.sleep(0.3)

    def broker(self) -> dict[str, Any]:
        """What broker.json says: the embedded broker's address and PID."""
        self.wait_for(self.marker.exists, "no broker started")
        return dict(json.loads(self.marker.read_text()))

    def stored(self) -> int:
        if not (self.home / "warehouse.sqlite").exists():
            return 0
        with LocalWarehouse(self.home / "warehouse.sqlite", read_only=True) as wh:
            return wh.counts()["events"]

    def send(self, seed: int) -> None:
        sent = run_cli(
            self.home,
            self.tmp_path,
            *("simulate", "--events", "500", "--seed", str(seed)),
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr


def test_up_recovers_from_a_dead_embedded_broker_with_fresh_state(tmp_path: Path) -> None:
    up = RunningUp(tmp_path)
    try:
        first = up.broker()
        up.send(1)
        up.wait_for(lambda: up.stored() > 0, "first traffic not processed")
        os.kill(first["embedded_pid"], signal.SIGKILL)
        # a new broker (new address) and wiped stores: nothing stale is served
        up.wait_for(
            lambda: (
                up.marker.exists()
                and json.loads(up.marker.read_text())["address"] != first["address"]
            ),
            "no new broker after the old one died",
        )
        assert up.stored() == 0
        up.send(2)
        up.wait_for(lambda: up.stored() > 0, "traffic after the restart not processed")
        assert up.process.poll() is None  # the same process (replaced in place) serves on
    finally:
        err = stop_up(up.process, up.home)
    assert "embedded broker died" in err
    assert "stopped" in err
    assert up.process.returncode == 0, err[-3000:]


def test_a_stop_signal_while_the_embedded_broker_is_dead_stops_up_instead_of_restarting(
    tmp_path: Path,
) -> None:
    # the race CI hit: Ctrl-C while `up` handles its broker's death (the processor possibly
    # blocked in a transactional commit against the dead broker) must stop it, not be
    # swallowed by the dying processor while a new broker starts
    up = RunningUp(tmp_path)
    first = up.broker()
    up.send(1)
    up.wait_for(lambda: up.stored() > 0, "first traffic not processed")
    os.kill(first["embedded_pid"], signal.SIGKILL)
    time.sleep(0.2)
    err = stop_up(up.process, up.home, timeout=60)
    assert up.process.returncode == 0, err[-3000:]
    assert "stopped" in err
    assert err.count("pipeline up: broker") == 1, "a new broker was started"
    assert not up.marker.exists()


def test_a_stop_signal_during_start_up_stops_the_embedded_broker_too(tmp_path: Path) -> None:
    """SIGTERM (a container stop) before the processor took over the signal handlers: `up`
    must unwind and stop the broker it started, not die and leave it running on its own."""
    up = RunningUp(tmp_path)
    broker = up.broker()["embedded_pid"]
    up.process.send_signal(signal.SIGTERM)
    up.process.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while _running(broker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(broker), "the embedded broker outlived `pipeline up`"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped) is not running
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    return True


def _up(tmp_path: Path, env: dict[str, str], *options: str) -> subprocess.Popen[str]:
    """`pipeline up OPTIONS` in the background, its output captured."""
    return subprocess.Popen(
        pipeline_cmd("up", *options),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_broker(up: subprocess.Popen[str], home: Path) -> None:
    deadline = time.monotonic() + 60
    while not (home / "broker.json").exists():
        assert up.poll() is None and time.monotonic() < deadline, "no broker started"
        time.sleep(0.2)


def test_up_with_no_triggers_leaves_the_scan_to_a_copy(tmp_path: Path) -> None:
    """`up --no-triggers` (the Kubernetes processor pods): the store fills, triggers fall due,
    and this process emits none; `pipeline follow --triggers` does that elsewhere."""
    from pipeline.settings import Settings
    from pipeline.stream.trigger_scan import find_due

    home = tmp_path / "home"
    env = {**cli_env(home), "PIPELINE_TRIGGERS__SCAN_INTERVAL_S": "0.5"}
    up = _up(tmp_path, env, "--no-workbench", "--no-api", "--no-collector", "--no-triggers")
    store = home / "warehouse.sqlite"
    with stopped_after(up, home) as log:
        _wait_for_broker(up, home)
        sent = run_cli(home, tmp_path, "simulate", "--events", "2000", "--seed", "8")
        assert sent.returncode == 0, sent.stderr
        due: list[Any] = []
        deadline = time.monotonic() + 90
        while not due:
            assert time.monotonic() < deadline, "no trigger fell due"
            time.sleep(1)
            if store.exists():
                with LocalWarehouse(store, read_only=True) as wh:
                    due = find_due(wh, Settings(_env_file=None).triggers)
        time.sleep(3)  # six scan intervals
        with LocalWarehouse(store, read_only=True) as wh:
            assert wh.scalar("SELECT COUNT(*) FROM email_triggers") == 0
    assert "stopped" in log[0]


def test_up_with_delivery_on_renders_triggered_emails_and_holds_them_for_their_send_time(
    tmp_path: Path,
) -> None:
    # delivery switched on as in production (the platform: a real local HTTP server): the
    # trigger scan's emails are rendered and kept, without the address, until their optimized
    # send time, which is the start of a coming hour, so none may reach the platform yet
    home = tmp_path / "home"
    with running_platform() as (platform, url):
        env = {**cli_env(home), **platform_env(url), "PIPELINE_TRIGGERS__SCAN_INTERVAL_S": "1"}
        up = _up(tmp_path, env, "--no-workbench", "--no-api")
        store = home / "warehouse.sqlite"

        def scheduled() -> list[dict[str, Any]]:
            if not store.exists():
                return []
            with LocalWarehouse(store, read_only=True) as wh:
                return wh.scheduled_emails()

        with stopped_after(up, home) as log:
            _wait_for_broker(up, home)
            sent = run_cli(home, tmp_path, "simulate", "--events", "3000", "--seed", "8")
            assert sent.returncode == 0, sent.stderr
            started = int(time.time() * 1000)
            # settled: the scan found every due trigger (nothing new for 5 scans)
            last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 120
            while time.monotonic() < deadline:
                now = len(scheduled())
                if now != last:
                    last, still_since = now, time.monotonic()
                elif now and time.monotonic() - still_since > 5:
                    break
                time.sleep(0.5)
            waiting = scheduled()
            assert waiting, "no email was scheduled"
            with LocalWarehouse(store, read_only=True) as wh:
                triggers = wh.query("SELECT customer_id, trigger FROM email_triggers")
                no_address = wh.query(
                    "SELECT customer_id FROM profiles "
                    "WHERE json_extract(profile, '$.traits.email') IS NULL"
                )
        assert "stopped" in log[0]
    assert platform.deliveries == {} and platform.token_requests == 0  # nothing due yet
    assert {(e["customer_id"], e["campaign_id"]) for e in waiting} <= set(
        zip(triggers.customer_id, triggers.trigger, strict=True)
    )
    assert not {e["customer_id"] for e in waiting} & set(no_address.customer_id)
    for email in waiting:
        assert email["send_at_ms"] > started - 60_000
        assert "unsubscribe" in email["html"].lower()
