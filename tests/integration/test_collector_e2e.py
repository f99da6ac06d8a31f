"""Simulator and Segment SDK -> collector over HTTP -> broker -> processor -> warehouse."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from collector_helpers import KEYS, collector_settings, running_collector
from segment.analytics import Client as SegmentClient

from pipeline.collector.client import HttpSendReport, send_via_http
from pipeline.runner import Run, pipeline_run, process_until_idle
from pipeline.simulate import Simulation, SimulationConfig, simulate

pytestmark = pytest.mark.integration

END = datetime(2026, 11, 1, tzinfo=UTC)
SDK_USER = "cus_sdk_e2e"

REFUSED_AT_THE_EDGE = {
    "not_json": "invalid_json",
    "not_utf8": "not_utf8",
    "too_large": "event_too_large",
    "missing_identity": "missing_identity",
}
"""Malformed kinds the collector refuses, with its error code; the rest reach the dead letters."""


@dataclass
class Outcome:
    run: Run
    sim: Simulation
    report: HttpSendReport


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    settings = collector_settings(tmp_path_factory.mktemp("collector-e2e") / "home")
    with pipeline_run(settings) as run, running_collector(settings, run.address) as url:
        sim = simulate(
            SimulationConfig(events=3000, seed=7, end=END, days=7, malformed_rate=0.02),
            run.catalog,
        )
        report = send_via_http(sim.messages, url, KEYS["storefront"])
        _send_with_sdk(url)
        process_until_idle(run, expected_raw=report.accepted_count + 2, timeout_s=300)
        yield Outcome(run, sim, report)


def _send_with_sdk(url: str) -> None:
    errors: list[Any] = []
    sdk = SegmentClient(
        KEYS["backend"], host=url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )
    sdk.identify(SDK_USER, {"email": "sdk@example.com", "firstName": "Ada"})
    sdk.track(
        SDK_USER,
        "Order Completed",
        {
            "order_id": "o-sdk-1",
            "revenue": 72.99,
            "currency": "EUR",
            "products": [{"product_id": "P00001", "quantity": 1, "price": 72.99}],
        },
    )
    assert errors == []


def test_every_message_is_accepted_or_rejected_with_its_reason(outcome: Outcome) -> None:
    sim, report = outcome.sim, outcome.report
    assert report.accepted_count + len(report.rejected) == len(sim.messages)
    assert len(set(report.accepted) | {r.position for r in report.rejected}) == len(sim.messages)
    for rejection in report.rejected:
        msg = sim.messages[rejection.position]
        assert msg.kind == "malformed", rejection
        assert REFUSED_AT_THE_EDGE[msg.malformed_reason or ""] == rejection.code
    edge = [m for m in sim.messages if m.malformed_reason in REFUSED_AT_THE_EDGE]
    assert len(report.rejected) == len(edge) > 0


def test_processor_consumed_exactly_what_the_collector_acknowledged(outcome: Outcome) -> None:
    assert outcome.run.metrics.raw_in == outcome.report.accepted_count + 2


def test_stored_events_equal_the_simulators_valid_unique_events(outcome: Outcome) -> None:
    wh, sim = outcome.run.warehouse, outcome.sim
    stored = set(wh.query("SELECT message_id FROM events")["message_id"])
    valid = {m.message_id for m in sim.messages if m.kind == "valid" and m.message_id}
    assert stored - valid == set(
        wh.query("SELECT message_id FROM events WHERE customer_id = ?", (SDK_USER,))["message_id"]
    )
    assert valid <= stored
    assert int(wh.scalar("SELECT COUNT(*) FROM events")) == (
        sum(sim.ground_truth.expected_event_counts.values()) + 2
    )
    duplicates = sum(1 for m in sim.messages if m.kind == "duplicate")
    assert outcome.run.metrics.duplicates_dropped == duplicates


def test_malformed_events_passed_on_are_dead_lettered_with_their_reason(outcome: Outcome) -> None:
    letters = outcome.run.warehouse.query("SELECT reason, message_id, raw_b64 FROM dead_letters")
    passed_on = [
        m
        for m in outcome.sim.messages
        if m.kind == "malformed" and m.malformed_reason not in REFUSED_AT_THE_EDGE
    ]
    assert passed_on
    by_id = dict(zip(letters["message_id"], letters["reason"], strict=True))
    assert len(letters) == len(passed_on)
    for m in passed_on:
        assert by_id[m.message_id] == m.malformed_reason
    raw = base64.b64decode(letters["raw_b64"].iloc[0])
    assert b'"sourceId":"storefront"' in raw and b'"receivedAt"' in raw


def test_sdk_events_become_a_processed_profile(outcome: Outcome) -> None:
    profile = outcome.run.warehouse.get_profile(SDK_USER)
    assert profile
    events = outcome.run.warehouse.query("SELECT * FROM events WHERE customer_id = ?", (SDK_USER,))
    assert len(events) == 2


def test_send_via_http_batches_and_reports_codes(outcome: Outcome) -> None:
    report = outcome.report
    assert report.requests >= report.accepted_count // 50
    assert set(report.rejected_by_code()) <= set(REFUSED_AT_THE_EDGE.values())


def test_every_stored_event_carries_its_whole_path_in_order(outcome: Outcome) -> None:
    """Lineage: collect → broker → validate → stitch → score → store, each step after the last."""
    from pipeline.lineage import COLUMNS, path

    rows = outcome.run.warehouse.query(f"SELECT message_id, {', '.join(COLUMNS)} FROM events")
    assert len(rows) > 2000
    assert rows[list(COLUMNS)].notna().all().all(), "a step is missing its time"
    # the broker's timestamp is the producer's (collector's) clock: ms rounding aside, in order
    ats = rows[list(COLUMNS)].to_numpy()
    assert (ats[:, 1:] - ats[:, :-1] >= -1).all()
    steps = path(rows.iloc[0].to_dict())
    assert [s.name for s in steps] == [
        "collect",
        "broker",
        "validate + enrich",
        "dedupe + stitch",
        "score + segments",
        "store",
    ]
    assert sum(s.duration_ms or 0 for s in steps) == steps[-1].at_ms - steps[0].at_ms
