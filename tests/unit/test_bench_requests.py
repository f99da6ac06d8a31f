"""The bench's window arithmetic (broker requests, collector pauses), its wait for the first
raw message, and the chart's series of requests."""

from __future__ import annotations

import threading

import pytest

from pipeline.bench import (
    _OTHER_REQUESTS,
    _gc,
    _request_count,
    _requests,
    _top_requests,
    gc_window,
)
from pipeline.errors import ProcessingTimeout
from pipeline.metrics import StreamMetrics, wait_first_in


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


def test_a_servers_pauses_between_two_scrapes_share_counts_and_the_bound_of_the_longest() -> None:
    # cumulative buckets over GC_BUCKETS_S (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000 ms) + Inf
    zero = [0.0] * 11
    before = ([0.5, 0.1, 0.2], [list(zero), list(zero), [0.0] * 8 + [1.0] * 3])
    young = [0.0, 3.0, 4.0, *[5.0] * 8]  # 3 under 2.5 ms, 1 more under 5, 1 more under 10
    # one more under 50 ms (the 250-500 ms one came before the window)
    full = [0.0] * 5 + [1.0] * 3 + [2.0] * 3
    after = ([0.52, 0.1, 0.24], [young, list(zero), full])
    got = gc_window(before, after, seconds=2.0)
    assert got["gc_share"] == pytest.approx(0.03)
    assert got["gc_collections"] == [5, 0, 1]
    assert got["gc_longest_under_ms"] == 50.0  # the 250 ms pause before the window is not in it
    assert gc_window(after, after, seconds=1.0) == {
        "gc_share": 0.0,
        "gc_collections": [0, 0, 0],
        "gc_longest_under_ms": None,
    }
    beyond = ([0.52, 0.1, 1.24], [young, list(zero), [*full[:-1], 3.0]])  # a 1 s+ pause
    assert gc_window(after, beyond, seconds=1.0)["gc_longest_under_ms"] is None


def test_waiting_for_the_first_raw_message_returns_once_it_is_read() -> None:
    m = StreamMetrics()
    reader = threading.Timer(0.05, m.saw_raw)  # the processor's first message, 50 ms on
    reader.start()
    wait_first_in(m, timeout_s=5.0)
    assert m.first_in_s is not None
    reader.join()


def test_a_processor_that_reads_nothing_is_a_timeout_not_a_hang() -> None:
    with pytest.raises(ProcessingTimeout, match="no raw message within"):
        wait_first_in(StreamMetrics(), timeout_s=0.05)
