"""Latency lineage: an event's steps, their durations, and per-step figures for metrics."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.lineage import durations, path, step_latency, total_ms
from pipeline.metrics import StreamMetrics
from pipeline.observability import exposition, metrics_registry

ROW = {
    "collected_ms": 1_000,
    "ingested_ms": 1_004,
    "parsed_ms": 1_010,
    "stitched_ms": 1_060,
    "scored_ms": 1_130,
    "stored_ms": 1_135,
}


def test_path_lists_steps_in_order_with_time_since_the_step_before() -> None:
    steps = path(ROW)
    assert [(s.name, s.duration_ms) for s in steps] == [
        ("collect", None),
        ("broker", 4),
        ("validate + enrich", 6),
        ("dedupe + stitch", 50),
        ("score + segments", 70),
        ("store", 5),
    ]
    assert total_ms(steps) == 135


def test_unknown_steps_are_skipped_and_the_next_counts_from_the_last_known() -> None:
    # produced straight to the broker (no collect time); a row from before lineage (NaN)
    row = {**ROW, "collected_ms": None, "stitched_ms": float("nan")}
    assert [(s.name, s.duration_ms) for s in path(row)] == [
        ("broker", None),
        ("validate + enrich", 6),
        ("score + segments", 120),
        ("store", 5),
    ]


def test_durations_take_the_store_time_of_a_record_not_yet_stored() -> None:
    record = {k: v for k, v in ROW.items() if k != "stored_ms"}
    assert durations(record, stored_ms=1_200)[-1] == ("store", 70)
    assert durations(record) == durations(record, None)
    assert ("store", 70) not in durations(record)


def test_step_latency_quantiles_per_step() -> None:
    rows = pd.DataFrame(
        [{**ROW, "stitched_ms": ROW["parsed_ms"] + d} for d in (10, 20, 30, 40, 50)]
        + [{**ROW, "stitched_ms": None}]
    )
    table = step_latency(rows, quantiles=(0.5,)).set_index("step")
    assert table.loc["dedupe + stitch", "n"] == 5
    assert table.loc["dedupe + stitch", "p50_ms"] == 30
    assert table.loc["broker", "p50_ms"] == 4
    # the event without a stitch time counts its scoring from the parse
    assert table.loc["score + segments", "n"] == 6
    assert table.loc["store", "p50_ms"] == 5


def test_step_latency_of_no_events_is_empty_not_an_error() -> None:
    table = step_latency(pd.DataFrame(columns=["ingested_ms", "parsed_ms", "stored_ms"]))
    assert table["step"].tolist() == ["broker", "validate + enrich", "store"]
    assert table["n"].tolist() == [0, 0, 0]
    assert math.isnan(table["p50_ms"].iloc[0])


def test_processor_metrics_expose_a_histogram_per_step() -> None:
    metrics = StreamMetrics()
    record = {k: v for k, v in ROW.items() if k != "stored_ms"}
    metrics.traced([record, {**record, "scored_ms": 1_160}], stored_ms=1_200)
    text = exposition(metrics_registry(metrics))
    assert 'pipeline_step_latency_seconds_count{step="dedupe + stitch"} 2.0' in text
    # 70 ms and 40 ms from score to store: one at or under 50 ms, both under 100 ms
    assert 'pipeline_step_latency_seconds_bucket{le="0.05",step="store"} 1.0' in text
    assert 'pipeline_step_latency_seconds_bucket{le="0.1",step="store"} 2.0' in text
    assert 'pipeline_step_latency_seconds_sum{step="store"} 0.11' in text


@pytest.mark.parametrize("missing", ["parsed_ms", "stitched_ms", "scored_ms"])
def test_histograms_never_count_a_step_an_event_did_not_record(missing: str) -> None:
    metrics = StreamMetrics()
    metrics.traced([{k: v for k, v in ROW.items() if k != missing}], stored_ms=1_200)
    step = {"parsed_ms": "validate + enrich", "stitched_ms": "dedupe + stitch"}.get(
        missing, "score + segments"
    )
    assert step not in metrics.step_counts
