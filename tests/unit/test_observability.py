"""Prometheus exposition of StreamMetrics, its HTTP endpoint, and the shipped dashboard/alerts."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections import Counter
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import StreamMetrics
from pipeline.observability import (
    METRIC_NAMES,
    StreamMetricsCollector,
    exposition,
    metrics_registry,
    start_metrics_server,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def known_metrics() -> StreamMetrics:
    m = StreamMetrics(
        raw_in=120,
        rekeyed=5,
        valid=110,
        dead_lettered=Counter({"invalid_json": 7, "schema": 3}),
        duplicates_dropped=4,
        replays_dropped=1,
        profile_updates=100,
        segment_changes=9,
    )
    m.stored_events([1000, 1000, 1000], 1004)  # 4 ms each
    m.stored_events([1000, 1000], 1300)  # 300 ms each
    m.stored_events([0], 20_000)  # 20 s
    m.stored_events([], 90_000_000, reattributed=2)  # stored again: counted, no latency
    m.traced([{"ingested_ms": 1000, "parsed_ms": 1001, "scored_ms": 1002}], 1004)
    m.last_stored_s = 100.0
    m.last_stats_s = 40.0
    m.step_cpu_s["parse"] += 0.25
    m.stored_cpu(0.5)
    m.request_reports = {"rdkafka#producer-1": ("producer", {"Produce": 12, "EndTxn": 3})}
    m.gc.record(0, 0.002)
    m.gc.record(0, 0.0005)
    m.gc.record(2, 0.2)  # a full collection: 200 ms with the loop stopped
    return m


def test_counters_per_stage_and_dead_letters_by_reason() -> None:
    m = known_metrics()
    lag = {("events.raw", 2): 42}
    # any live process stands for the embedded broker's: its series are the broker's process'
    got = samples(exposition(metrics_registry(m, lag=lambda: lag, broker_pid=os.getppid())))
    assert got[("pipeline_raw_in_total", ())] == 120
    assert got[("pipeline_rekeyed_total", ())] == 5  # read twice: the rules subtract them
    assert got[("pipeline_valid_total", ())] == 110
    assert got[("pipeline_dead_lettered_total", (("reason", "invalid_json"),))] == 7
    assert got[("pipeline_dead_lettered_total", (("reason", "schema"),))] == 3
    assert got[("pipeline_duplicates_dropped_total", ())] == 4
    assert got[("pipeline_replays_dropped_total", ())] == 1
    assert got[("pipeline_profile_updates_total", ())] == 100
    assert got[("pipeline_events_stored_total", ())] == 8  # 2 stored again
    assert got[("pipeline_segment_changes_total", ())] == 9
    assert got[("pipeline_consumer_lag", (("partition", "2"), ("topic", "events.raw")))] == 42
    assert got[("pipeline_step_cpu_seconds_total", (("step", "parse"),))] == 0.25
    assert got[("pipeline_step_cpu_seconds_total", (("step", "store"),))] == 0.5
    assert got[("pipeline_step_cpu_seconds_total", (("step", "fold"),))] == 0  # from zero
    assert (
        got[("pipeline_broker_requests_total", (("client", "producer"), ("request", "EndTxn")))]
        == 3
    )
    gc_bucket = "pipeline_gc_pause_seconds_bucket"
    assert got[(gc_bucket, (("generation", "0"), ("le", "0.001")))] == 1
    assert got[(gc_bucket, (("generation", "0"), ("le", "0.0025")))] == 2
    assert got[(gc_bucket, (("generation", "2"), ("le", "0.1")))] == 0
    assert got[(gc_bucket, (("generation", "2"), ("le", "0.25")))] == 1
    assert got[(gc_bucket, (("generation", "2"), ("le", "+Inf")))] == 1
    assert got[("pipeline_gc_pause_seconds_count", (("generation", "1"),))] == 0  # from zero
    assert got[("pipeline_gc_pause_seconds_sum", (("generation", "0"),))] == 0.0025
    assert got[("process_cpu_seconds_total", ())] > 0  # this test process's own CPU
    assert got[("pipeline_embedded_broker_process_resident_memory_bytes", ())] > 0
    assert {name for name, _ in got} == METRIC_NAMES


def test_latency_histogram_counts_each_sample_once_across_scrapes() -> None:
    m = known_metrics()
    collector = StreamMetricsCollector(m, clock=lambda: 103.5)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def bucket(le: str, text: str) -> float:
        return samples(text)[("pipeline_end_to_end_latency_seconds_bucket", (("le", le),))]

    first = exposition(registry)
    assert bucket("0.005", first) == 3
    assert bucket("0.25", first) == 3
    assert bucket("0.5", first) == 5
    assert bucket("10.0", first) == 5
    assert bucket("30.0", first) == 6
    assert bucket("+Inf", first) == 6
    got = samples(first)
    assert got[("pipeline_end_to_end_latency_seconds_count", ())] == 6
    assert got[("pipeline_end_to_end_latency_seconds_sum", ())] == 0.012 + 0.6 + 20
    assert got[("pipeline_seconds_since_last_store", ())] == 3.5
    assert got[("pipeline_seconds_since_consumer_poll", ())] == 63.5

    m.stored_events([0], 40)
    second = exposition(registry)
    assert bucket("0.05", second) == 4  # the new 40 ms sample, nothing counted twice
    assert bucket("+Inf", second) == 7
    assert exposition(registry) == second

    # a login stores a device's history again between two scrapes: counted as stored, but
    # its copies have no latency sample, so the histogram gains only the new event's
    m.stored_events([1000], 1010, reattributed=90)
    third = exposition(registry)
    assert bucket("+Inf", third) == 8 and bucket("0.005", third) == 3
    assert bucket("0.01", third) == 4  # the 10 ms sample, once
    assert samples(third)[("pipeline_events_stored_total", ())] == 8 + 1 + 91


def test_metrics_server_serves_the_exposition_on_loopback() -> None:
    m = known_metrics()
    stop = start_metrics_server(m, "127.0.0.1", 0)
    try:
        assert stop.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(stop.url, timeout=10) as response:
            body = response.read().decode()
        m.raw_in += 1
        with urllib.request.urlopen(stop.url, timeout=10) as response:
            again = response.read().decode()
    finally:
        stop()
    assert samples(body)[("pipeline_raw_in_total", ())] == 120
    assert samples(again)[("pipeline_raw_in_total", ())] == 121


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\bpipeline_[a-z_]+\b", expr))


def test_alerting_rules_reference_exported_series() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "PipelineConsumerLagHigh",
        "PipelineEndToEndLatencyP99High",
        "PipelineDeadLetterRateHigh",
        "PipelineProcessorStalled",
        "PipelineProcessorHung",
        "PipelineProcessorAbsent",
        "PipelineNoInput",
        "PipelineAnomalyWarning",
        "PipelineAnomalyCritical",
    }
    for name, rule in alerts.items():
        used = series_in(rule["expr"])
        assert used, name
        assert used <= METRIC_NAMES, (name, used - METRIC_NAMES)
        assert rule["labels"]["severity"] in {"warning", "critical"}
    assert {"pipeline_raw_in_total", "pipeline_consumer_lag"} <= series_in(
        alerts["PipelineProcessorStalled"]["expr"]
    )


def test_grafana_dashboard_queries_exported_series() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "pipeline-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    used = set().union(*(series_in(e) for e in exprs))
    assert used <= METRIC_NAMES
    assert {
        "pipeline_raw_in_total",
        "pipeline_dead_lettered_total",
        "pipeline_end_to_end_latency_seconds_bucket",
        "pipeline_consumer_lag",
    } <= used


def test_alerts_by_kind_and_severity_exported_from_zero() -> None:
    m = StreamMetrics()
    m.alerts[("bot_identity", "warning")] += 2
    got = samples(exposition(metrics_registry(m, lag=dict)))
    alerts = {labels: v for (name, labels), v in got.items() if name == "pipeline_alerts_total"}
    assert alerts[(("kind", "bot_identity"), ("severity", "warning"))] == 2
    assert alerts[(("kind", "volume_spike"), ("severity", "critical"))] == 0
    assert len(alerts) == 12  # six kinds x two severities, so increase() sees the first one


def test_grafana_dashboard_shows_consumer_lag_total_per_partition_and_catch_up_time() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "pipeline-dashboard.json").read_text())
    lag_panels = {
        panel["title"]: [t["expr"] for t in panel["targets"]]
        for panel in dashboard["panels"]
        if any("pipeline_consumer_lag" in t["expr"] for t in panel["targets"])
    }
    assert lag_panels["Consumer lag"] == ['sum(pipeline_consumer_lag{job=~"$job"})']
    [per_partition] = lag_panels["Consumer lag per partition"]
    assert "by (topic, partition)" in per_partition
    [catch_up] = lag_panels["Consumer lag: time to catch up at the current rate"]
    assert series_in(catch_up) == {"pipeline_consumer_lag", "pipeline_raw_in_total"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_a_taken_metrics_port_is_one_clear_error() -> None:
    import socket

    import pytest

    from pipeline.errors import ConfigurationError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match="PIPELINE_METRICS_PORT"):
            start_metrics_server(StreamMetrics(), "127.0.0.1", port)
