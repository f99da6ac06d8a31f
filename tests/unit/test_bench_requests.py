"""The bench's broker requests per 1,000 events: the window arithmetic and the chart's series."""

from __future__ import annotations

import pytest

from pipeline.bench import _OTHER_REQUESTS, _gc, _request_count, _requests, _top_requests
from pipeline.metrics import StreamMetrics


def test_requests_since_a_snapshot_per_1000_events_most_frequent_first() -> None:
    m = StreamMetrics()
    m.request_reports = {
        "c": ("consumer", {"Fetch": 30, "Heartbeat": 2}),
        "p": ("producer", {"Produce": 100, "EndTxn": 1}),
    }
    before = m.broker_requests()
    m.request_reports = {
        "c": ("consumer", {"Fetch": 50, "Heartbeat": 2}),
        "p": ("producer", {"Produce": 400, "EndTxn": 3}),
    }
    got = _requests(m, before, events=200)
    assert got == {"producer:Produce": 1500.0, "consumer:Fetch": 100.0, "producer:EndTxn": 10.0}
    assert list(got) == ["producer:Produce", "consumer:Fetch", "producer:EndTxn"]
    assert _requests(m, {}, events=1000)["producer:Produce"] == 400.0


def test_the_chart_shows_the_top_requests_and_the_rest_as_one_series() -> None:
    rows = [
        {"a": 10.0, "b": 5.0, "c": 1.0},
        {"a": 2.0, "d": 8.0, "e": 0.5, "f": 0.25},
    ]
    series = _top_requests(rows, n=3)
    assert series == ["a", "d", "b", _OTHER_REQUESTS]
    assert [_request_count(rows[1], s, series) for s in series] == [2.0, 8.0, 0.0, 0.8]
    assert _request_count(rows[0], _OTHER_REQUESTS, series) == pytest.approx(1.0)
    assert _top_requests([{"a": 1.0}], n=3) == ["a"]  # no "other" when nothing is left out


def test_gc_pauses_of_a_window_as_a_share_of_its_wall_time_and_the_longest() -> None:
    m = StreamMetrics()
    m.gc.record(2, 0.2)  # before the window: not its share, nor its longest
    m.gc.take_longest_s()
    since = m.gc.total()[1]
    m.gc.record(0, 0.01)
    m.gc.record(1, 0.03)
    got = _gc(m, since, 2.0)
    assert got == {"gc_share": 0.02, "gc_longest_ms": 30.0}
    assert _gc(m, m.gc.total()[1], 1.0) == {"gc_share": 0.0, "gc_longest_ms": 0.0}
    assert _gc(m, 0.0, 0.0)["gc_share"] is None
