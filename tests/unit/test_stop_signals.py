"""`pipeline up`'s view of stop signals, which must not depend on its main thread running."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from quixstreams import Application

from pipeline.replicas import _remember_stop_signals
from pipeline.runner import StopSignals, _once


@pytest.fixture
def quiet_handlers() -> Iterator[list[int]]:
    """Python handlers that only record, as quixstreams' own would (and no KeyboardInterrupt)."""
    seen: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: seen.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    }
    yield seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_is_seen_by_the_reading_thread(quiet_handlers: list[int], sig: int) -> None:
    stops = StopSignals()
    try:
        assert not stops.requested.is_set()
        os.kill(os.getpid(), sig)
        assert stops.requested.wait(5)
        assert sig in quiet_handlers  # the Python handler still runs too
    finally:
        stops.close()


def test_other_signals_are_not_a_stop_request(quiet_handlers: list[int]) -> None:
    stops = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while signal.SIGUSR2 not in quiet_handlers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signal.SIGUSR2 in quiet_handlers
        time.sleep(0.2)  # the reader has had the byte by now
        assert not stops.requested.is_set()
    finally:
        stops.close()


def test_close_gives_the_wakeup_fd_back() -> None:
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    stops = StopSignals()
    stops.close()
    assert signal.set_wakeup_fd(before) == before


def test_a_service_stop_runs_once_whichever_threads_call_it() -> None:
    calls: list[int] = []
    stop = _once(lambda: calls.append(1))
    threads = [threading.Thread(target=stop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop()
    assert calls == [1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_replicas_stop_signal_is_remembered_beyond_quixstreams_own_stop(
    quiet_handlers: list[int], sig: int, tmp_path: Path
) -> None:
    """quixstreams' handlers call ``app.stop()``, which ``run()`` forgets before its loop has
    subscribed; the replica's handlers also set the event its status thread re-stops from."""
    app = Application(
        broker_address="127.0.0.1:9",  # never contacted: nothing here connects
        consumer_group="signals",
        state_dir=tmp_path / "state",
    )
    stopping = threading.Event()
    _remember_stop_signals(app, stopping)
    app._setup_signal_handlers()  # as app.run() does before it subscribes
    try:
        os.kill(os.getpid(), sig)
        assert stopping.wait(5)
        assert not app._run_tracker.running  # quixstreams' own stop ran too
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, _frame: quiet_handlers.append(signum))
