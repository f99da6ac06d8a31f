"""Anomaly alerts end to end: simulated traffic with a spike, a bot and a broken source injected,
through the embedded broker and the real processor, to the alerts topic, table and metrics."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from topic_reader import read_topic

from pipeline.runner import Run, pipeline_run, process_until_idle, produce_messages
from pipeline.settings import Settings
from pipeline.simulate import RawMessage, SimulationConfig, simulate
from pipeline.simulate.faults import Injection, bot_identity, broken_source, inject, volume_spike
from pipeline.workbench_data import open_alerts

pytestmark = pytest.mark.integration

END = datetime(2026, 11, 1, tzinfo=UTC)
END_MS = int(END.timestamp() * 1000)
HOUR_MS = 3_600_000


@dataclass
class Outcome:
    run: Run
    messages: list[RawMessage]
    injections: tuple[Injection, ...]
    topic: list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module", params=[1, 4], ids=["1-partition", "4-partitions"])
def outcome(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Outcome]:
    # one detector per input partition: one sees all the traffic (the default), four a quarter
    settings = Settings(
        home=tmp_path_factory.mktemp("alerts") / "home",
        partitions=request.param,
        commit_interval_s=0.3,
    )
    with pipeline_run(settings) as run:
        sim = simulate(SimulationConfig(events=20_000, seed=7, end=END, days=1), run.catalog)
        # the shop closes at END; what is delivered later is only hours-late events, which
        # clock_skew rightly reports: the simulated day ends at END
        day = [m for m in sim.messages if m.delivered_ms <= END_MS]
        rng = random.Random(5)
        products = run.catalog.products()
        injections = (
            volume_spike(rng, sim.customers, products=products, start_ms=END_MS - 6 * HOUR_MS),
            bot_identity(rng, start_ms=END_MS - 5 * HOUR_MS),
            broken_source(rng, products=products, start_ms=END_MS - 4 * HOUR_MS),
        )
        messages = inject(day, *injections)
        process_until_idle(
            run,
            expected_raw=len(messages),
            feed=lambda: (
                produce_messages(settings, run.address, messages, stamp_delivered=True) and None
            ),
            timeout_s=300,
        )
        topic = [
            (k.decode() if k else "", orjson.loads(v))
            for k, v in read_topic(settings, run.address, settings.topics.alerts)
        ]
        yield Outcome(run, messages, injections, topic)


def stored(outcome: Outcome) -> list[dict[str, Any]]:
    frame = outcome.run.warehouse.query("SELECT * FROM alerts ORDER BY at_ms, alert_id")
    return frame.to_dict("records")  # type: ignore[no-any-return]


def test_every_injected_anomaly_is_alerted(outcome: Outcome) -> None:
    alerts = stored(outcome)
    found = {(a["kind"], a["subject"]) for a in alerts}
    print("\nalerts by kind and subject:", Counter((a["kind"], a["subject"]) for a in alerts))
    for injection in outcome.injections:
        assert injection.expected <= found, injection.name
        for kind, subject in injection.expected:
            times = [a["at_ms"] for a in alerts if (a["kind"], a["subject"]) == (kind, subject)]
            # raised while it happened (bucketed alerts at the end of their minute)
            assert injection.start_ms < min(times) <= injection.end_ms + 60_000, (kind, subject)


def test_no_false_positives_on_the_ordinary_traffic(outcome: Outcome) -> None:
    """Every alert is explained by an injection: none about ordinary customers or traffic."""
    allowed = set().union(*(i.expected | i.explained for i in outcome.injections))
    unexplained = [a for a in stored(outcome) if (a["kind"], a["subject"]) not in allowed]
    print(f"\nfalse positives on {len(outcome.messages):,} messages: {len(unexplained)}")
    assert unexplained == []
    bots = {s for inj in outcome.injections for k, s in inj.expected if k == "bot_identity"}
    assert {a["subject"] for a in stored(outcome) if a["kind"] == "bot_identity"} == bots


def test_the_alerts_topic_the_table_and_the_metrics_agree(outcome: Outcome) -> None:
    alerts = stored(outcome)
    records = [record for _, record in outcome.topic]
    assert {r["alert_id"] for r in records} == {a["alert_id"] for a in alerts}
    for key, record in outcome.topic:
        assert key == f"{record['alert_kind']}:{record['subject']}"
        assert record["kind"] == "alert" and record["severity"] in ("warning", "critical")
    counted = outcome.run.metrics.alerts
    assert sum(counted.values()) == len(records)
    assert counted == Counter((r["alert_kind"], r["severity"]) for r in records)


def test_open_alerts_are_relative_to_data_time(outcome: Outcome) -> None:
    wh = outcome.run.warehouse
    broken = outcome.injections[2]
    during = open_alerts(wh, as_of_ms=broken.end_ms, window_ms=15 * 60_000)
    assert {"clock_skew", "dead_letter_rate"} <= set(during["kind"])
    assert set(during["subject"]) <= {"kiosk", "Product Viewed/kiosk"}
    # the simulated day is in the past: open alerts end with it, not with the wall clock
    later = open_alerts(wh)
    assert later.empty
