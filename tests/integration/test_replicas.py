"""Scale-out: replicas in one consumer group give the same per-customer results as one, and
`pipeline up --replicas N` runs, reports and stops its replica processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli_env, pipeline_cmd, run_cli, stop_up

from pipeline import bench_scaleout
from pipeline.bench_scaleout import (
    ScaleoutStalled,
    measure_replicas,
    scaleout,
    scaleout_summary,
    stall_diagnosis,
)
from pipeline.broker import EmbeddedBroker, ensure_topics
from pipeline.catalog import load_catalog
from pipeline.runner import pipeline_run, produce_messages, simulate_for
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse

pytestmark = pytest.mark.integration


def test_two_replicas_split_the_work_and_store_the_same_customer_results(
    settings: Settings,
) -> None:
    # one partition configured: the scale-out gives its fresh broker's topics one per replica
    report = scaleout(settings.model_copy(update={"partitions": 1}), 3000, (1, 2), seed=3)

    assert report["partitions"] == 2
    one, two = report["runs"]
    assert [one["replicas"], two["replicas"]] == [1, 2]
    for run in (one, two):
        assert run["events_stored"] == report["events_stored_truth"]
        assert run["matches_truth"], run
        assert run["events_per_s"] > 0
        assert all(r["exit_code"] == 0 for r in run["per_replica"]), run["per_replica"]
        # the replicas' own CPU: positive, and the per-CPU-second figure derived from it
        assert run["cpu_s"] > 0
        assert run["events_per_cpu_s"] == pytest.approx(run["events"] / run["cpu_s"], rel=0.01)
        assert run["broker_cpu_s"] > 0
    # both replicas of the group got partitions and did their share of every stage
    assert len(two["per_replica"]) == 2
    for replica in two["per_replica"]:
        assert replica["raw_read"] > 0, two["per_replica"]
        assert replica["events_stored"] > 0, two["per_replica"]
    assert sum(r["raw_read"] for r in two["per_replica"]) == report["events"]

    assert report["identical"], report["differing_customers"]
    assert report["comparisons"][0]["identical"]
    assert report["customers_compared"] > 0
    assert report["ratio_2_to_1"] == pytest.approx(
        two["events_per_s"] / one["events_per_s"], abs=0.001
    )
    assert report["events_per_cpu_s"] == {
        "1": one["events_per_cpu_s"],
        "2": two["events_per_cpu_s"],
    }


def test_a_run_that_cannot_finish_is_reported_as_stalled_with_what_it_misses(
    settings: Settings,
) -> None:
    """A group that stops moving before it is done fails in ``stall_s`` with a diagnosis.

    One event more is expected than the simulation can store: the replica drains everything,
    then sits still, so the diagnosis names the one missing stored event and no lagging partition.
    """
    with pipeline_run(settings) as run:
        sim = simulate_for(settings, 400, 5, run.catalog)
        produce_messages(settings, run.address, sim.messages)
        stored = sum(sim.ground_truth.expected_event_counts.values())
        own = settings.model_copy(update={"home": settings.home / "stall"})
        started = time.monotonic()
        with pytest.raises(ScaleoutStalled) as caught:
            measure_replicas(
                own,
                1,
                run.address,
                expected_raw=len(sim.messages),
                expected_stored=stored + 1,
                stall_s=3.0,
            )
    message = str(caught.value)
    assert message.startswith("1 replicas made no progress for 3s: ")
    assert f"events stored {stored:,} of {stored + 1:,}" in message
    assert "raw messages read" not in message and "attributed records" not in message
    assert "no partition lags (skipped?)" in message
    assert time.monotonic() - started < 120
    status = json.loads((own.home / "replicas" / "0-0.json").read_text())
    assert status["lag"] == {}  # read in full: the status names lagging partitions only


def test_stall_diagnosis_names_each_short_stage_and_the_lagging_partitions() -> None:
    statuses = [
        {
            "instance_id": "0-0",
            "raw_in": 600,
            "attributed_out": 640,
            "attributed_in": 600,
            "profile_updates": 600,
            "profiles_stored": 600,
            "lag": {"events.attributed[3]": 40},
        },
        {
            "instance_id": "0-1",
            "raw_in": 300,
            "attributed_out": 310,
            "attributed_in": 310,
            "profile_updates": 310,
            "profiles_stored": 300,
            "lag": {},
        },
        None,  # a replica that has not written its status yet
    ]
    assert stall_diagnosis(statuses, 1000, 870, 900) == (
        "raw messages read 900 of 1,000; attributed records read by stage 2 910 of 950; "
        "events stored 870 of 900; profiles stored 900 of 910; "
        "lagging: events.attributed[3] 40 (0-0)"
    )


def test_a_failed_replica_count_is_recorded_and_the_others_still_measured(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2-replica run fails (as one stalled on a 16-core machine); 1 is still measured."""
    real = bench_scaleout.measure_replicas

    def two_stall(s: Settings, count: int, address: str, **kw: Any) -> dict[str, Any]:
        if count == 2:
            raise ScaleoutStalled("2 replicas made no progress for 60s: events stored 1 of 2")
        return real(s, count, address, **kw)

    monkeypatch.setattr(bench_scaleout, "measure_replicas", two_stall)
    report = scaleout(settings, 600, (1, 2), seed=3)
    one, two = report["runs"]
    assert one["replicas"] == 1 and one["matches_truth"], one
    assert two == {"replicas": 2, "events": 600, "error": two["error"]}
    assert "events stored 1 of 2" in two["error"]
    assert report["failed_runs"] == 1
    assert report["events_per_s"] == {"1": one["events_per_s"]}
    assert report["comparisons"] == []
    assert "2 replicas FAILED: 2 replicas made no progress" in scaleout_summary(report)


def test_bench_scaleout_only_writes_its_report(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = run_cli(
        home,
        tmp_path,
        "bench",
        "--scaleout-only",
        "--quick",
        "--events",
        "600",
        "--replicas",
        "1",
        "--json",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    (run,) = report["runs"]
    assert run["replicas"] == 1 and run["matches_truth"], run
    assert run["events_stored"] == report["events_stored_truth"] > 0
    assert report["events_per_s"] == {"1": run["events_per_s"]}
    (written,) = (home / "bench").glob("*-scaleout.json")
    assert json.loads(written.read_text())["runs"][0]["events"] == run["events"]


def test_bench_refuses_a_bad_replica_list(tmp_path: Path) -> None:
    done = subprocess.run(
        pipeline_cmd("bench", "--scaleout-only", "--replicas", "1,two"),
        env=cli_env(tmp_path / "home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--replicas" in done.stderr and "'1,two'" in done.stderr


def _start_up(home: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pipeline_cmd("up", "--replicas", "2", "--no-collector", "--no-api", "--no-workbench"),
        env=cli_env(home),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(
    up: subprocess.Popen[str], predicate: Callable[[], bool], what: str, limit: float = 90
) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert up.poll() is None, up.communicate()[1][-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _statuses(home: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((home / "replicas").glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # replaced while read
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_replicas_stopped_as_they_start_stop_cleanly(tmp_path: Path) -> None:
    """SIGTERM right after the replicas report running: quixstreams forgets a stop that comes
    before its loop subscribed; a replica kept running until killed (against this broker,
    started apart from `up`, the window was hit in four tries out of four)."""
    home = tmp_path / "home"
    with EmbeddedBroker.start() as cluster:
        ensure_topics(Settings(home=home, partitions=2), cluster.address)
        up = subprocess.Popen(
            pipeline_cmd("up", "--replicas", "2", "--no-collector", "--no-api", "--no-workbench"),
            env={**cli_env(home), "PIPELINE_BROKER": cluster.address},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(
                up,
                lambda: (
                    len(_statuses(home)) == 2
                    and {s["state"] for s in _statuses(home).values()} == {"running"}
                ),
                "the replicas did not start",
            )
        finally:
            started = time.monotonic()
            err = stop_up(up, home, signal.SIGTERM, timeout=120)
    assert up.returncode == 0, err[-3000:]
    assert "did not stop" not in err
    assert time.monotonic() - started < 50  # the replicas' own limit is 60 s
    assert {s["state"] for s in _statuses(home).values()} == {"stopped"}


def test_up_with_two_replicas_processes_traffic_and_stops_them_on_sigterm(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    up = _start_up(home, tmp_path)
    pids: dict[str, int] = {}
    try:
        _wait_for(up, lambda: len(_statuses(home)) == 2, "two replicas did not report")
        pids = {i: int(s["pid"]) for i, s in _statuses(home).items()}
        assert set(pids) == {"0-0", "0-1"}
        assert {_parent_of(pid) for pid in pids.values()} == {up.pid}
        sent = run_cli(home, tmp_path, "simulate", "--events", "1500", "--seed", "3", timeout=120)
        assert sent.returncode == 0, sent.stderr
        expected = sum(
            simulate_for(
                Settings(home=home), 1500, 3, load_catalog()
            ).ground_truth.expected_event_counts.values()
        )

        def stored() -> int:
            if not (home / "warehouse.sqlite").exists():
                return 0
            with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
                return wh.counts()["events"]

        _wait_for(up, lambda: stored() >= expected, f"not all {expected} events stored")
        assert stored() == expected
        # each replica processed its share of the partitions
        _wait_for(
            up,
            lambda: all(int(s["raw_in"]) > 0 for s in _statuses(home).values()),
            "a replica read nothing",
            limit=10,
        )
    finally:
        err = stop_up(up, home, signal.SIGTERM, timeout=120)
    assert up.returncode == 0, err[-3000:]
    # the default is one partition: `up` gave the embedded broker's topics one per replica
    assert "2 replicas: the embedded broker's topics get 2 partitions" in err
    for instance, pid in pids.items():
        assert f"replica {instance}: pid {pid}" in err
        assert not _alive(pid)
    assert "stopped" in err
    assert {s["state"] for s in _statuses(home).values()} == {"stopped"}
    assert not (home / "broker.json").exists()


def test_up_on_a_cluster_says_which_replicas_its_partitions_leave_idle(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with EmbeddedBroker.start() as cluster:  # stands in for a cluster: topics made beforehand
        ensure_topics(Settings(home=home, partitions=1), cluster.address)
        env = {**cli_env(home), "PIPELINE_BROKER": cluster.address}
        up = subprocess.Popen(
            pipeline_cmd("up", "--replicas", "2", "--no-collector", "--no-api", "--no-workbench"),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(up, lambda: len(_statuses(home)) == 2, "two replicas did not report")
            _wait_for(
                up,
                lambda: {s["state"] for s in _statuses(home).values()} == {"running"},
                "the replicas did not start",
            )
            sent = subprocess.run(
                pipeline_cmd("simulate", "--events", "300", "--seed", "3"),
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stderr
            # the group settled: the replica that has the partition read it all, the other none
            _wait_for(
                up,
                lambda: sorted(int(s["raw_in"]) for s in _statuses(home).values()) == [0, 300],
                "the one partition was not read by one replica",
            )
        finally:
            err = stop_up(up, home, signal.SIGTERM, timeout=120)
    assert up.returncode == 0, err[-3000:]
    assert "events.raw has 1 partition(s): 1 of the 2 replicas will sit idle" in err
    assert "topics get 2 partitions" not in err  # a cluster's topics are not remade


@pytest.mark.parametrize("victim", ["replica", "broker"])
def test_up_stops_loudly_when_a_replica_or_the_broker_dies(tmp_path: Path, victim: str) -> None:
    home = tmp_path / "home"
    up = _start_up(home, tmp_path)
    try:
        _wait_for(up, lambda: len(_statuses(home)) == 2, "two replicas did not report")
        pids = {i: int(s["pid"]) for i, s in _statuses(home).items()}
        if victim == "replica":
            os.kill(pids["0-1"], signal.SIGKILL)
            expected = f"replica 0-1 (pid {pids['0-1']}) exited unexpectedly"
        else:
            os.kill(json.loads((home / "broker.json").read_text())["embedded_pid"], signal.SIGKILL)
            expected = "the embedded broker died"
        _out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 2, err[-3000:]
    assert expected in " ".join(err.split()), err[-3000:]  # rich wraps long lines
    assert not any(_alive(pid) for pid in pids.values())
    assert not (home / "broker.json").exists()
