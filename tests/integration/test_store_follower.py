"""An API that does not share the processor's files (the Kubernetes layout: its own pod and
home) keeps its own copy of the serving store from the output topics, and serves what an API
over the processor's own store serves, forgotten customers included (real broker, real HTTP)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_helpers import cli_env
from pandas.testing import assert_frame_equal

from pipeline.api.server import serve_api_in_thread
from pipeline.errors import StoreError
from pipeline.gdpr import forget
from pipeline.runner import Run, pipeline_run, process_until_idle, produce_messages
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.stores.follow import StoreFollower, follow_topics, followed_topics
from pipeline.stores.local import LocalWarehouse

pytestmark = pytest.mark.integration

KEY = {"X-API-Key": "ak_local_dev"}
END_OF_DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
TABLES = ("events", "profiles", "segment_changes", "identity_links", "dead_letters", "alerts")


def _counts(path: Any) -> dict[str, int]:
    with LocalWarehouse(path, read_only=True) as wh:
        return {t: int(wh.scalar(f"SELECT COUNT(*) FROM {t}")) for t in TABLES}


def _counts_when_ready(path: Path) -> dict[str, int] | None:
    """The store's counts, or None while it is absent or still being created (a reader then
    gets a StoreError, as the API's 503 does)."""
    try:
        return _counts(path) if path.exists() else None
    except StoreError:
        return None


def _wait_for(done: Callable[[], bool], what: Callable[[], str], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, what()
        time.sleep(0.3)


def _process(run: Run, config: SimulationConfig) -> dict[str, int]:
    """Simulate, process everything and return the rows per table the processor stored."""
    sim = simulate(config, run.catalog)
    process_until_idle(
        run,
        expected_raw=run.metrics.raw_in + len(sim.messages),  # the run's metrics add up
        feed=lambda: produce_messages(run.settings, run.address, sim.messages),
    )
    return _counts(run.settings.warehouse_path)


def _read(follower: StoreFollower) -> int:
    """Records a follower read (applied or dropped)."""
    return follower.applied + follower.dropped


def _api_settings(settings: Settings, home_name: str, **api: Any) -> Settings:
    return settings.model_copy(
        update={
            "home": settings.home.parent / home_name,
            "api": settings.api.model_copy(update={"port": 0, **api}),
        }
    )


# when each copy wrote a row (an event stitched twice, anonymous and then re-attributed at a
# login, travels on two partitions, so copies apply them in either order: the rows must still
# be the same, lineage included)
_COPY_DEPENDENT = ["stored_ms"]


def _assert_same_rows(a_path: Path, b_path: Path) -> None:
    """The two copies hold the same rows (but for the columns above)."""
    assert _counts(a_path) == _counts(b_path)
    keys = {"events": "message_id", "profiles": "customer_id", "identity_links": "anonymous_id"}
    with (
        LocalWarehouse(a_path, read_only=True) as a,
        LocalWarehouse(b_path, read_only=True) as b,
    ):
        for table, key in keys.items():
            sql = f"SELECT * FROM {table} ORDER BY {key}"
            assert_frame_equal(
                a.query(sql).drop(columns=_COPY_DEPENDENT, errors="ignore"),
                b.query(sql).drop(columns=_COPY_DEPENDENT, errors="ignore"),
                obj=table,
            )


def test_an_api_in_its_own_home_serves_what_the_processor_stored(settings: Settings) -> None:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    with pipeline_run(settings) as run:
        processed = _process(run, SimulationConfig(events=700, seed=21, end=end, days=5))
        assert processed["events"] > 0 and processed["profiles"] > 0
        # the processor's own API, and a "pod" with nothing but the broker's address
        beside = serve_api_in_thread(
            settings.model_copy(update={"api": settings.api.model_copy(update={"port": 0})})
        )
        pod_settings = _api_settings(settings, "api-pod", follow_topics=True).model_copy(
            update={"broker": run.address}
        )
        assert not pod_settings.warehouse_path.exists()
        pod = serve_api_in_thread(pod_settings)
        try:
            with (
                httpx.Client(base_url=beside.url, headers=KEY, timeout=30) as here,
                httpx.Client(base_url=pod.url, headers=KEY, timeout=30) as there,
            ):
                _wait_for(
                    lambda: _counts(pod_settings.warehouse_path) == processed,
                    lambda: f"replica {_counts(pod_settings.warehouse_path)} != {processed}",
                )
                following = there.get("/health").json()["following"]
                assert following["caught_up"]
                assert following["applied"] >= sum(processed.values()) - processed["alerts"]
                customers = [
                    str(c)
                    for c in run.warehouse.query(
                        "SELECT customer_id FROM profiles WHERE merged_into IS NULL "
                        "AND is_anonymous = 0 ORDER BY customer_id LIMIT 5"
                    )["customer_id"]
                ]
                assert customers
                for c in customers:
                    for route in (
                        f"/api/customers/{c}",
                        f"/api/customers/{c}/send-time",
                        f"/api/customers/{c}/recommendations",
                    ):
                        a, b = here.get(route), there.get(route)
                        assert a.status_code == b.status_code == 200, (route, b.text)
                        _assert_same(a.json(), b.json(), route)
                # forgotten through the broker: the replica drops the customer as well
                gone = customers[0]
                admin = settings.model_copy(
                    update={"home": settings.home.parent / "admin-host", "broker": run.address}
                )
                with LocalWarehouse(settings.warehouse_path) as wh:
                    devices = wh.linked_devices(gone)
                    forget(gone, admin, warehouse=wh)
                keys = 1 + len(devices)  # one erasure request per key: customer, devices
                process_until_idle(
                    run,
                    expected_raw=run.metrics.raw_in + keys,
                    feed=lambda: _wait_for(
                        lambda: run.metrics.profiles_erased >= keys,
                        lambda: f"erasures not processed: {run.metrics.progress()}",
                    ),
                )
                _wait_for(
                    lambda: there.get(f"/api/customers/{gone}").status_code == 404,
                    lambda: (
                        f"{gone} still served by the replica "
                        f"(here: {here.get(f'/api/customers/{gone}').status_code}, "
                        f"erased: {run.metrics.profiles_erased}, "
                        f"{there.get('/health').json()['following']})"
                    ),
                )
                with LocalWarehouse(pod_settings.warehouse_path, read_only=True) as replica:
                    left = replica.count_customer_rows([gone], devices, gone)
                assert not any(left.values()), left
                assert there.get(f"/api/customers/{customers[1]}").status_code == 200
        finally:
            pod()
            beside()


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Equal, but for scores that decay with the request's clock (two requests differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in {"at_ms", "as_of"}:
                _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{n}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_pipeline_follow_keeps_a_home_until_stopped(settings: Settings, tmp_path: Path) -> None:
    with pipeline_run(settings) as run:
        processed = _process(run, SimulationConfig(events=300, seed=4, end=END_OF_DAY, days=3))
        sidecar_home = tmp_path / "workbench-pod"
        env = {**cli_env(sidecar_home), "PIPELINE_BROKER": run.address}
        follow = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "follow"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            store = sidecar_home / "warehouse.sqlite"
            _wait_for(
                lambda: _counts_when_ready(store) == processed,
                lambda: f"{_counts_when_ready(store)} != {processed}",
            )
            time.sleep(2)  # a read that finds nothing more (0.5 s), then its report
        finally:
            follow.send_signal(signal.SIGTERM)
            out, err = follow.communicate(timeout=30)
        assert follow.returncode == 0, err[-3000:]
        log = out + err
        assert "caught up" in log and "stopped" in log, log[-3000:]


def test_the_trigger_scan_on_a_copy_finds_what_the_processors_store_holds(
    settings: Settings, tmp_path: Path
) -> None:
    """`pipeline follow --triggers` (Kubernetes: the processor replicas each keep their own
    partitions): once caught up, the copy's scan emits the triggers due in the processor's
    whole store, and none before."""
    from pipeline.runner import start_copy_scan
    from pipeline.stream.trigger_scan import find_due

    with pipeline_run(settings) as run:
        _process(run, SimulationConfig(events=600, seed=8, end=END_OF_DAY, days=3))
        due = {t.trigger_id for t in find_due(run.warehouse, settings.triggers)}
        assert due  # (carts left in the last three days)
        fast = settings.triggers.model_copy(update={"scan_interval_s": 0.3})
        copy = settings.model_copy(
            update={"home": tmp_path / "delivery-pod", "broker": run.address, "triggers": fast}
        )
        stop, caught_up = threading.Event(), threading.Event()
        scan = start_copy_scan(copy, run.address, caught_up, stop)
        follower = follow_topics(copy, copy.warehouse_path)
        try:
            time.sleep(1.0)
            assert not copy.warehouse_path.exists() or not _recorded(copy.warehouse_path)
            _wait_for(follower.caught_up.is_set, lambda: "the copy did not catch up")
            caught_up.set()
            _wait_for(
                lambda: _recorded(copy.warehouse_path) == due,
                lambda: f"{len(_recorded(copy.warehouse_path))} recorded, {len(due)} due",
            )
        finally:
            stop.set()
            scan.join(30)
            follower.close()
        assert not scan.is_alive()


def _recorded(path: Path) -> set[str]:
    with LocalWarehouse(path, read_only=True) as wh:
        return set(wh.query("SELECT trigger_id FROM email_triggers")["trigger_id"])


def test_a_replica_whose_disk_fills_up_keeps_retrying_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    with pipeline_run(settings) as run:
        processed = _process(run, SimulationConfig(events=300, seed=8, end=END_OF_DAY, days=2))
        path = tmp_path / "replica.sqlite"
        with LocalWarehouse(path) as wh:
            full = f"PRAGMA max_page_count = {int(wh.scalar('PRAGMA page_count'))}"
            wh._conn.execute(full)  # no page more: SQLite's "database or disk is full"
            with StoreFollower(settings, run.address, wh, poll_s=0.2) as follower:
                _wait_for(lambda: follower.retries >= 3, lambda: f"{follower.retries} retries")
                assert (follower.applied, follower.dropped) == (0, 0)
                assert sum(_counts(path).values()) == 0
                wh._conn.execute("PRAGMA max_page_count = 1073741823")  # space again
                _wait_for(
                    lambda: _counts(path) == processed,
                    lambda: f"replica {_counts(path)} != {processed}",
                )
                assert follower.dropped == 0


def test_a_replica_closed_mid_write_finishes_it_then_releases_its_consumer(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() gives up waiting after CLOSE_WAIT_S; the write in hand still ends well, and
    only then does the thread close the consumer and run on_close (it used to be closed under
    the write, which then failed on a closed handle)."""
    monkeypatch.setattr(StoreFollower, "CLOSE_WAIT_S", 0.2)
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    with pipeline_run(settings) as run:
        _process(run, SimulationConfig(events=200, seed=6, end=END_OF_DAY, days=2))
        released = threading.Event()
        in_write, go_on = threading.Event(), threading.Event()
        with LocalWarehouse(tmp_path / "replica.sqlite") as wh:
            follower = StoreFollower(settings, run.address, wh, on_close=[released.set])
            apply_records = follower._apply_records

            def held(*args: Any) -> Any:
                in_write.set()
                assert go_on.wait(30)
                return apply_records(*args)

            monkeypatch.setattr(follower, "_apply_records", held)
            follower.start()
            assert in_write.wait(30)
            follower.close()  # returns after 0.2 s, the write still held
            assert not released.is_set()
            go_on.set()
            assert released.wait(30)
            assert follower.applied > 0 and failures == []


def test_a_replica_started_again_goes_on_from_where_it_was(
    settings: Settings, tmp_path: Path
) -> None:
    with pipeline_run(settings) as run:
        first = _process(run, SimulationConfig(events=250, seed=5, end=END_OF_DAY, days=2))
        path = tmp_path / "replica.sqlite"
        with LocalWarehouse(path) as wh, StoreFollower(settings, run.address, wh) as follower:
            _wait_for(lambda: _counts(path) == first, lambda: f"{_counts(path)} != {first}")
            _wait_for(follower.caught_up.is_set, lambda: "not caught up")
        read_before = _read(follower)
        with LocalWarehouse(path, read_only=True) as wh:
            saved = wh.replica_positions()
        assert {topic for topic, _ in saved} == set(followed_topics(settings))

        more = _process(run, SimulationConfig(events=250, seed=6, end=END_OF_DAY, days=2))
        assert more != first
        with LocalWarehouse(path) as wh, StoreFollower(settings, run.address, wh) as again:
            _wait_for(lambda: _counts(path) == more, lambda: f"{_counts(path)} != {more}")
            _wait_for(again.caught_up.is_set, lambda: "not caught up")

        # positions beyond the topics' ends (the topics were recreated, as by a new embedded
        # broker): those partitions are read from their start again
        with LocalWarehouse(path) as wh:
            wh.save_replica_positions({key: 10**9 for key in wh.replica_positions()})
            with StoreFollower(settings, run.address, wh) as fresh:
                _wait_for(fresh.caught_up.is_set, lambda: "not caught up")
            assert _counts(path) == more
            assert max(wh.replica_positions().values()) < 10**9
        # the replica started again read only what came after its saved positions
        assert 0 < _read(again) == _read(fresh) - read_before


def test_a_replica_reads_a_recreated_topic_from_its_start_however_far_it_grew(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "replica.sqlite"
    with pipeline_run(settings) as run:
        _process(run, SimulationConfig(events=150, seed=5, end=END_OF_DAY, days=2))
        with LocalWarehouse(path) as wh, StoreFollower(settings, run.address, wh) as first:
            _wait_for(first.caught_up.is_set, lambda: "not caught up")
    with LocalWarehouse(path, read_only=True) as wh:
        saved, first_ids = wh.replica_positions(), wh.replica_topic_ids()
    assert set(first_ids) == set(followed_topics(settings))

    # a new embedded broker: the same topic names with new ids, and more records than before
    second = settings.model_copy(update={"home": settings.home.parent / "second"})
    with pipeline_run(second) as run:
        _process(run, SimulationConfig(events=600, seed=6, end=END_OF_DAY, days=2))
        with (
            LocalWarehouse(tmp_path / "new.sqlite") as wh,
            StoreFollower(second, run.address, wh) as new,
        ):
            _wait_for(new.caught_up.is_set, lambda: "not caught up")
            ends = wh.replica_positions()
        # the case a position check alone misses: partitions longer now than where it was
        assert any(ends.get(key, 0) > position for key, position in saved.items())
        with LocalWarehouse(path) as wh, StoreFollower(second, run.address, wh) as old:
            _wait_for(old.caught_up.is_set, lambda: "not caught up")
            assert wh.replica_positions() == ends
            ids = wh.replica_topic_ids()
    assert all(ids[t] != first_ids[t] for t in first_ids), (ids, first_ids)
    assert _read(old) == _read(new)  # every record of the new topics, none left out
    # and nothing of the old broker's: the old copy now holds what the new one does (profile
    # versions started again at 1, which the old copy's higher versions would have refused)
    _assert_same_rows(path, tmp_path / "new.sqlite")


def test_a_new_replica_started_from_a_snapshot_reads_only_what_came_after_it(
    settings: Settings, tmp_path: Path
) -> None:
    with pipeline_run(settings) as run:
        first = _process(run, SimulationConfig(events=200, seed=5, end=END_OF_DAY, days=2))
        pod = settings.model_copy(update={"home": tmp_path / "api-pod", "broker": run.address})
        with closing(follow_topics(pod, pod.warehouse_path)) as old:
            _wait_for(lambda: _counts(pod.warehouse_path) == first, lambda: "not caught up")
            _wait_for(old.caught_up.is_set, lambda: "not caught up")
        # a consistent copy of that pod's store, with its positions (the CLI, as a job would)
        snapshot = tmp_path / "snapshots" / "latest.sqlite"
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "snapshot", str(snapshot)],
            env=cli_env(pod.home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        said = " ".join((done.stdout + done.stderr).split())  # however the console wraps
        assert "saved topic positions" in said, said

        more = _process(run, SimulationConfig(events=200, seed=6, end=END_OF_DAY, days=2))
        with closing(
            follow_topics(pod, pod.warehouse_path)
        ) as again:  # the old pod, for comparison
            _wait_for(lambda: _counts(pod.warehouse_path) == more, lambda: "not caught up")
            _wait_for(again.caught_up.is_set, lambda: "not caught up")
        new_pod = pod.model_copy(update={"home": tmp_path / "new-pod", "replica_seed": snapshot})
        with closing(follow_topics(new_pod, new_pod.warehouse_path)) as new:
            _wait_for(new.caught_up.is_set, lambda: "not caught up")
        assert _counts(new_pod.warehouse_path) == more
        _assert_same_rows(pod.warehouse_path, new_pod.warehouse_path)
        # it read what came after the snapshot, as the old pod did, not the topics again
        assert 0 < _read(new) == _read(again) < _read(old) + _read(again)
