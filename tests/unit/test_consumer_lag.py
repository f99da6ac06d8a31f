"""Consumer lag from librdkafka statistics: the parser, StreamMetrics' stats_cb, the gauge."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from pipeline.metrics import (
    CONSUMER_LAG_STALE_S,
    StreamMetrics,
    broker_requests_from_stats,
    consumer_lag_from_stats,
    consumer_stats_config,
    producer_stats_config,
)
from pipeline.observability import exposition, metrics_registry

INVALID = -1001  # librdkafka's RD_KAFKA_OFFSET_INVALID


def partition_stats(
    n: int,
    *,
    fetch_state: str = "active",
    app: int = INVALID,
    stored: int = INVALID,
    committed: int = INVALID,
    hi: int = INVALID,
    lag: int = -1,
    lag_stored: int = -1,
    next_offset: int | None = None,
    fetchq_cnt: int | None = None,
) -> dict[str, Any]:
    """One ``topics.<t>.partitions.<p>`` object with every field librdkafka 2.x writes."""
    return {
        "partition": n,
        "broker": 1 if n >= 0 else -1,
        "leader": 1 if n >= 0 else -1,
        "desired": fetch_state != "none",
        "unknown": False,
        "msgq_cnt": 0,
        "msgq_bytes": 0,
        "xmit_msgq_cnt": 0,
        "xmit_msgq_bytes": 0,
        "fetchq_cnt": (12 if fetch_state == "active" else 0) if fetchq_cnt is None else fetchq_cnt,
        "fetchq_size": 3640 if fetch_state == "active" else 0,
        "fetch_state": fetch_state,
        "query_offset": -2,
        "next_offset": max(hi, 0) if next_offset is None else next_offset,
        "app_offset": app,
        "stored_offset": stored,
        "stored_leader_epoch": -1,
        "commited_offset": committed,
        "committed_offset": committed,
        "committed_leader_epoch": -1,
        "eof_offset": INVALID,
        "lo_offset": 0 if hi >= 0 else INVALID,
        "hi_offset": hi,
        "ls_offset": hi,
        "consumer_lag": lag,
        "consumer_lag_stored": lag_stored,
        "leader_epoch": 0 if n >= 0 else -1,
        "txmsgs": 0,
        "txbytes": 0,
        "rxmsgs": max(app, 0),
        "rxbytes": max(app, 0) * 300,
        "msgs": max(app, 0),
        "rx_ver_drops": 0,
        "msgs_inflight": 0,
        "next_ack_seq": 0,
        "next_err_seq": 0,
        "acked_msgid": 0,
    }


def window() -> dict[str, int]:
    keys = ("min", "max", "avg", "sum", "stddev", "p50", "p75", "p90", "p95", "p99", "p99_99")
    return {**dict.fromkeys(keys, 0), "outofrange": 0, "hdrsize": 11376, "cnt": 0}


def consumer_stats(name: str = "rdkafka#consumer-2") -> dict[str, Any]:
    """A processor consumer's report, shaped like librdkafka's STATISTICS.md example.

    events.raw: partition 0 under exactly-once (nothing committed by the consumer, 42 behind),
    1 at-least-once between commits (position 120, committed 100, high watermark 150),
    2 assigned to another replica, 3 assigned but nothing handed over yet; events.attributed 0
    just assigned with a committed offset; -1 is librdkafka's unassigned-messages queue.
    """
    return {
        "name": name,
        "client_id": "pipeline-processor",
        "type": "consumer",
        "ts": 5016483227792,
        "time": 1767225600,
        "age": 12004530,
        "replyq": 0,
        "msg_cnt": 0,
        "msg_size": 0,
        "msg_max": 100000,
        "msg_size_max": 1073741824,
        "simple_cnt": 0,
        "metadata_cache_cnt": 2,
        "brokers": {
            "127.0.0.1:9092/1": {
                "name": "127.0.0.1:9092/1",
                "nodeid": 1,
                "nodename": "127.0.0.1:9092",
                "source": "learned",
                "state": "UP",
                "stateage": 11903411,
                "outbuf_cnt": 0,
                "waitresp_cnt": 1,
                "tx": 811,
                "rx": 810,
                "int_latency": window(),
                "outbuf_latency": window(),
                "rtt": window(),
                "throttle": window(),
                "req": {"Fetch": 640, "OffsetCommit": 0, "Heartbeat": 41},
                "toppars": {
                    "events.raw-0": {"topic": "events.raw", "partition": 0},
                    "events.raw-1": {"topic": "events.raw", "partition": 1},
                },
            }
        },
        "topics": {
            "events.raw": {
                "topic": "events.raw",
                "age": 12003,
                "metadata_age": 9060,
                "batchsize": window(),
                "batchcnt": window(),
                "partitions": {
                    "0": partition_stats(0, app=1000, hi=1042),
                    "1": partition_stats(1, app=120, committed=100, hi=150, lag=50),
                    "2": partition_stats(2, fetch_state="none", app=7, hi=900),
                    "3": partition_stats(3, hi=310),
                    "-1": partition_stats(-1, fetch_state="none"),
                },
            },
            "events.attributed": {
                "topic": "events.attributed",
                "age": 11990,
                "metadata_age": 9060,
                "batchsize": window(),
                "batchcnt": window(),
                "partitions": {
                    "0": partition_stats(0, fetch_state="offset-wait", committed=10, hi=15, lag=5),
                    "-1": partition_stats(-1, fetch_state="none"),
                },
            },
        },
        "cgrp": {
            "state": "up",
            "stateage": 11892,
            "join_state": "steady",
            "rebalance_age": 11890,
            "rebalance_cnt": 1,
            "rebalance_reason": "",
            "assignment_size": 4,
        },
        "tx": 811,
        "tx_bytes": 90411,
        "rx": 810,
        "rx_bytes": 3401111,
        "txmsgs": 0,
        "txmsg_bytes": 0,
        "rxmsgs": 1120,
        "rxmsg_bytes": 336000,
    }


EXPECTED = {
    ("events.raw", 0): 42,
    ("events.raw", 1): 30,
    ("events.attributed", 0): 5,
}


def test_lag_counts_from_the_position_of_fetched_partitions_only() -> None:
    assert consumer_lag_from_stats(consumer_stats()) == EXPECTED


def test_position_is_the_newest_of_handed_over_committed_and_stored() -> None:
    def lag(**offsets: int) -> int:
        stats = {"topics": {"t": {"partitions": {"0": partition_stats(0, hi=100, **offsets)}}}}
        return consumer_lag_from_stats(stats)[("t", 0)]

    assert lag(app=60) == 40
    assert lag(committed=70) == 30
    assert lag(stored=80, app=75) == 20
    assert lag(app=60, committed=90) == 10  # another member committed further
    assert lag(app=130) == 0  # a high watermark older than the position is no negative lag


def test_a_partition_that_handed_over_nothing_counts_from_its_fetch_position() -> None:
    """Paused from its assignment on (measured: librdkafka reports it active, next_offset 0, no
    app offset): its backlog is lag. With messages prefetched, the position is unknown."""

    def lag(**fields: int) -> int | None:
        stats = {"topics": {"t": {"partitions": {"0": partition_stats(0, hi=100, **fields)}}}}
        return consumer_lag_from_stats(stats).get(("t", 0))

    assert lag(next_offset=0, fetchq_cnt=0) == 100
    assert lag(next_offset=40, fetchq_cnt=0) == 60
    assert lag(next_offset=100, fetchq_cnt=12) is None  # prefetched, not handed over: unknown
    assert lag(next_offset=INVALID, fetchq_cnt=0) is None  # no position yet
    assert lag(next_offset=0, fetchq_cnt=0, app=90) == 10  # a handed-over offset wins


def test_unknown_high_watermark_or_missing_sections_give_no_lag() -> None:
    no_hi = {"topics": {"t": {"partitions": {"0": partition_stats(0, app=5)}}}}
    assert consumer_lag_from_stats(no_hi) == {}
    assert consumer_lag_from_stats({"name": "rdkafka#producer-1", "type": "producer"}) == {}
    assert consumer_lag_from_stats({"topics": {"t": {"topic": "t"}}}) == {}
    assert consumer_lag_from_stats({"topics": {"t": {"partitions": {"0": "?"}}}}) == {}


def test_stats_callback_records_the_newest_report_per_client() -> None:
    m = StreamMetrics()
    m.on_consumer_stats(json.dumps(consumer_stats()))
    assert m.consumer_lag() == EXPECTED
    moved = consumer_stats()
    moved["topics"]["events.raw"]["partitions"]["0"] = partition_stats(0, app=1042, hi=1042)
    m.on_consumer_stats(json.dumps(moved))
    assert m.consumer_lag()[("events.raw", 0)] == 0

    # a second replica in the same process reports its own partitions
    other = consumer_stats("rdkafka#consumer-5")
    other["topics"] = {
        "events.raw": {"partitions": {"2": partition_stats(2, app=880, hi=900)}},
    }
    m.on_consumer_stats(json.dumps(other))
    assert m.consumer_lag()[("events.raw", 2)] == 20
    assert m.consumer_lag()[("events.raw", 1)] == 30


def test_a_client_that_stopped_reporting_drops_out() -> None:
    m = StreamMetrics()
    m.on_consumer_stats(json.dumps(consumer_stats()))
    [(at_s, _)] = m.consumer_lag_reports.values()
    assert m.consumer_lag(now_s=at_s + CONSUMER_LAG_STALE_S) == EXPECTED
    assert m.consumer_lag(now_s=at_s + CONSUMER_LAG_STALE_S + 1) == {}


def test_unreadable_statistics_are_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    m = StreamMetrics()
    m.on_consumer_stats(json.dumps(consumer_stats()))
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics"):
        m.on_consumer_stats("{not json")
        m.on_consumer_stats("[1, 2]")
    assert m.consumer_lag() == EXPECTED  # the last good report stays
    assert len(caplog.records) == 2


def test_stats_config_wires_the_callback_and_interval() -> None:
    m = StreamMetrics()
    config = consumer_stats_config(m, interval_ms=250)
    assert config["statistics.interval.ms"] == 250
    config["stats_cb"](json.dumps(consumer_stats()))
    assert m.consumer_lag() == EXPECTED
    assert consumer_stats_config(m)["statistics.interval.ms"] == 1000
    with pytest.raises(ValueError, match="positive"):
        consumer_stats_config(m, interval_ms=0)


def test_gauge_exports_the_reported_lag() -> None:
    m = StreamMetrics()
    m.on_consumer_stats(json.dumps(consumer_stats()))
    lines = exposition(metrics_registry(m)).splitlines()
    assert 'pipeline_consumer_lag{partition="0",topic="events.raw"} 42.0' in lines
    assert 'pipeline_consumer_lag{partition="1",topic="events.raw"} 30.0' in lines
    assert 'pipeline_consumer_lag{partition="0",topic="events.attributed"} 5.0' in lines
    assert not any('partition="-1"' in line or 'partition="2"' in line for line in lines)


def with_requests(stats: dict[str, Any], **per_broker: dict[str, int]) -> dict[str, Any]:
    """``stats`` with a ``brokers`` object: per broker name, its ``req`` counts by Kafka API."""
    stats["brokers"] = {
        name: {"name": name, "nodeid": 1, "state": "UP", "req": req}
        for name, req in per_broker.items()
    }
    return stats


def test_requests_are_summed_over_broker_connections_and_zeros_left_out() -> None:
    stats = with_requests(
        consumer_stats(),
        **{
            "127.0.0.1:9092/1": {"Fetch": 120, "Produce": 0, "Heartbeat": 9},
            "GroupCoordinator": {"Fetch": 0, "Heartbeat": 3, "OffsetFetch": 1},
            ":0/internal": {},
        },
    )
    assert broker_requests_from_stats(stats) == {"Fetch": 120, "Heartbeat": 12, "OffsetFetch": 1}
    assert broker_requests_from_stats({"name": "x"}) == {}
    assert broker_requests_from_stats({"brokers": {"b": {"req": "?"}, "c": 3}}) == {}


def test_requests_of_consumers_and_producers_add_up_by_client_type() -> None:
    m = StreamMetrics()
    m.on_consumer_stats(json.dumps(with_requests(consumer_stats(), b={"Fetch": 10})))
    other = with_requests(consumer_stats("rdkafka#consumer-5"), b={"Fetch": 5, "JoinGroup": 1})
    m.on_consumer_stats(json.dumps(other))
    producer = {"name": "rdkafka#producer-2", "type": "producer"}
    producer_stats_config(m)["stats_cb"](
        json.dumps(with_requests(producer, b={"Produce": 7, "EndTxn": 2}))
    )
    # a newer report of the same client replaces its totals (they are cumulative)
    m.on_consumer_stats(json.dumps(with_requests(consumer_stats(), b={"Fetch": 30})))
    assert m.broker_requests() == {
        ("consumer", "Fetch"): 35,
        ("consumer", "JoinGroup"): 1,
        ("producer", "Produce"): 7,
        ("producer", "EndTxn"): 2,
    }
    lines = exposition(metrics_registry(m)).splitlines()
    assert 'pipeline_broker_requests_total{client="consumer",request="Fetch"} 35.0' in lines
    assert 'pipeline_broker_requests_total{client="producer",request="EndTxn"} 2.0' in lines
    with pytest.raises(ValueError, match="positive"):
        producer_stats_config(m, interval_ms=0)
    m.on_producer_stats("{not json")  # logged, never raised
    assert m.broker_requests()[("producer", "Produce")] == 7
