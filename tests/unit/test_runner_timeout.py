"""process_until_idle's time limit: a shortfall raises, a run that only lacks its final quiet
wait does not (a stand-in for the quixstreams application: this is the watcher's logic)."""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

import pytest

from pipeline import runner
from pipeline.errors import ProcessingTimeout
from pipeline.metrics import StreamMetrics


class _App:
    """Consumes ``consumed`` raw messages after ``after_s``, then idles until stopped."""

    def __init__(self, metrics: StreamMetrics, consumed: int, after_s: float) -> None:
        self.metrics, self.consumed, self.after_s = metrics, consumed, after_s
        self.stopped = threading.Event()

    def run(self) -> None:
        time.sleep(self.after_s)
        self.metrics.raw_in = self.consumed
        self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()


class _SlowStartApp(_App):
    """As quixstreams: run() resets its stop flag when it starts, forgetting earlier stops."""

    def run(self) -> None:
        time.sleep(self.after_s)
        self.stopped.clear()
        self.stopped.wait()


class _CollectorWatchingApp(_App):
    """Notes how the garbage collector is set while the loop runs, and makes a collection."""

    seen: tuple[tuple[int, int, int], int] | None = None

    def run(self) -> None:
        _CollectorWatchingApp.seen = (gc.get_threshold(), gc.get_freeze_count())
        gc.collect(0)
        super().run()


def _run(
    monkeypatch: pytest.MonkeyPatch,
    consumed: int,
    after_s: float,
    app: type[_App] = _App,
    gc_young_threshold: int = 0,
) -> StreamMetrics:
    metrics = StreamMetrics()
    monkeypatch.setattr(
        runner, "build_application", lambda *a, **k: app(metrics, consumed, after_s)
    )
    monkeypatch.setattr(runner, "suppression_source", lambda *a, **k: None)
    monkeypatch.setattr(runner, "close_source", lambda source: None)
    monkeypatch.setattr(runner, "default_registry", lambda: None)
    run = SimpleNamespace(
        settings=SimpleNamespace(gc_young_threshold=gc_young_threshold),
        address="x",
        catalog=None,
        warehouse=None,
        metrics=metrics,
        extra_warehouses=(),
    )
    runner.process_until_idle(run, expected_raw=100, timeout_s=1.0, idle_s=2.0)  # type: ignore[arg-type]
    return metrics


def test_the_loop_runs_with_the_collector_tuned_and_its_pauses_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = gc.get_threshold()
    metrics = _run(
        monkeypatch, consumed=100, after_s=0.1, app=_CollectorWatchingApp, gc_young_threshold=5000
    )
    assert _CollectorWatchingApp.seen is not None
    threshold, frozen = _CollectorWatchingApp.seen
    assert threshold == (5000, 20, 100)
    assert frozen > 0
    assert metrics.gc.counts[0] >= 1  # the loop's own collection, recorded
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0  # restored


def test_everything_consumed_before_the_limit_is_a_finished_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _run(monkeypatch, consumed=100, after_s=0.3)  # the idle wait (2 s) is what the limit cut


def test_a_shortfall_at_the_limit_raises_with_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProcessingTimeout, match="consumed 60 of 100 raw messages"):
        _run(monkeypatch, consumed=60, after_s=0.3)


@pytest.mark.timeout(30)
def test_a_stop_before_the_application_started_is_not_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit passes while the application is still starting (the watcher's stop comes
    first): the run must still end, with the shortfall, not hang."""
    with pytest.raises(ProcessingTimeout, match="consumed 0 of 100"):
        _run(monkeypatch, consumed=0, after_s=1.5, app=_SlowStartApp)
