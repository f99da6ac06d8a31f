"""The retail simulator: exact counts, determinism, injected faults and consistent ground truth."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.catalog import Catalog, load_catalog
from pipeline.events import Failure, iso_to_ms
from pipeline.parsing import ParseLimits, parse_event
from pipeline.schemas import SchemaRegistry
from pipeline.scoring import DEFAULT_EVENT_WEIGHTS
from pipeline.simulate import (
    MALFORMED_REASONS,
    MAX_EVENT_BYTES,
    RawMessage,
    Simulation,
    SimulationConfig,
    default_end,
    end_of,
    simulate,
)

END = datetime(2026, 11, 20, tzinfo=UTC)
SRC = Path(__file__).resolve().parents[2] / "src"
TRACK_EVENTS = set(DEFAULT_EVENT_WEIGHTS) - {"Page Viewed", "Identify", "Alias"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def sim(catalog: Catalog) -> Simulation:
    config = SimulationConfig(
        8_000, end=END, seed=3, duplicate_rate=0.03, malformed_rate=0.02, late_rate=0.03
    )
    return simulate(config, catalog)


@pytest.fixture(scope="module")
def bodies(sim: Simulation) -> list[dict[str, Any]]:
    """Parsed JSON of every valid (first-delivery) message, in delivery order."""
    return [orjson.loads(m.value) for m in sim.messages if m.kind == "valid"]


def _valid(sim: Simulation) -> list[RawMessage]:
    return [m for m in sim.messages if m.kind == "valid"]


@pytest.mark.parametrize("events", [1, 2, 17, 333, 2_500])
def test_emits_exactly_the_requested_number_of_messages(catalog: Catalog, events: int) -> None:
    result = simulate(SimulationConfig(events, end=END, seed=events), catalog)
    assert len(result.messages) == events
    counts = result.ground_truth.expected_event_counts
    assert sum(counts.values()) == sum(1 for m in result.messages if m.kind == "valid")


def test_same_seed_gives_identical_bytes_and_another_seed_differs(catalog: Catalog) -> None:
    def run(seed: int) -> list[tuple[bytes | None, bytes, str]]:
        result = simulate(SimulationConfig(1_500, end=END, seed=seed), catalog)
        return [(m.key, m.value, m.kind) for m in result.messages]

    first = run(11)
    assert first == run(11)
    other = run(12)
    assert len(other) == len(first)
    assert {v for _, v, _ in first}.isdisjoint({v for _, v, _ in other})


def test_fault_counts_match_the_rates(sim: Simulation) -> None:
    kinds = Counter(m.kind for m in sim.messages)
    assert kinds["duplicate"] == round(8_000 * 0.03)
    assert kinds["malformed"] == round(8_000 * 0.02)
    assert kinds["valid"] == 8_000 - kinds["duplicate"] - kinds["malformed"]
    reasons = Counter(m.malformed_reason for m in sim.messages if m.kind == "malformed")
    assert set(reasons) == set(MALFORMED_REASONS)
    assert max(reasons.values()) - min(reasons.values()) <= 1
    assert dict(reasons) == sim.ground_truth.malformed_by_reason
    late = sum(1 for m in sim.messages if m.late)
    expected = 0.03 * kinds["valid"]
    assert abs(late - expected) < 4 * math.sqrt(expected)


def test_duplicates_are_byte_identical_resends_delivered_after_the_original(
    sim: Simulation,
) -> None:
    first_seen: dict[str, tuple[int, RawMessage]] = {}
    resent: set[str] = set()
    for offset, m in enumerate(sim.messages):
        if m.kind == "valid":
            assert m.message_id is not None and m.message_id not in first_seen
            first_seen[m.message_id] = (offset, m)
        elif m.kind == "duplicate":
            assert m.message_id in first_seen, "a duplicate must follow its original"
            offset_original, original = first_seen[m.message_id]
            assert offset_original < offset
            assert (m.key, m.value, m.timestamp_ms) == (
                original.key,
                original.value,
                original.timestamp_ms,
            )
            assert m.delivered_ms > original.delivered_ms
            resent.add(m.message_id)
    assert resent == sim.ground_truth.duplicates


def test_every_valid_message_carries_segment_metadata(
    sim: Simulation, bodies: list[dict[str, Any]]
) -> None:
    start_ms = int(sim.config.start.timestamp() * 1000)
    end_ms = int(sim.config.end.timestamp() * 1000)
    for m, body in zip(_valid(sim), bodies, strict=True):
        assert body["messageId"] == m.message_id
        assert body["timestamp"].endswith("Z") and len(body["timestamp"]) == 24
        assert iso_to_ms(body["timestamp"]) == m.timestamp_ms
        assert start_ms <= m.timestamp_ms < end_ms
        assert m.timestamp_ms <= iso_to_ms(body["sentAt"]) <= m.delivered_ms
        device = body["context"]["device"]["type"]
        assert device in {"mobile", "desktop", "tablet", "server"}
        if body["type"] in ("track", "page") and device != "server":
            assert body["context"]["sessionId"].startswith("s_")
        # the device first (stage 1's key), as the collector keys them
        expected_key: str = (
            body.get("anonymousId")
            or (body.get("previousId") if body["type"] == "alias" else None)
            or body.get("userId")
            or ""
        )
        assert expected_key
        assert m.key == expected_key.encode()
        assert len(m.value) <= MAX_EVENT_BYTES
        if body["type"] == "track":
            assert body["event"] in TRACK_EVENTS
        elif body["type"] == "alias":
            assert body["previousId"] and body["userId"]
        elif body["type"] == "identify":
            assert body["anonymousId"] and body["userId"]
            assert set(body["traits"]) == {"email", "firstName", "lastName", "timezone"}


def test_commerce_events_follow_the_ecommerce_spec(
    catalog: Catalog, bodies: list[dict[str, Any]]
) -> None:
    names = Counter(b.get("event") for b in bodies if b["type"] == "track")
    for name in ("Product Viewed", "Product Added", "Cart Viewed", "Order Completed"):
        assert names[name] > 0, name
    for body in bodies:
        props = body.get("properties", {})
        event = body.get("event")
        if event in ("Product Viewed", "Product Clicked", "Product Added", "Product Removed"):
            assert props["product_id"] in catalog
            assert props["price"] == catalog[props["product_id"]].price
        if event in ("Product Added", "Product Removed"):
            assert props["quantity"] >= 1 and props["cart_id"].startswith("cart_")
        if event == "Product Added":
            assert catalog[props["product_id"]].in_stock
        if event == "Order Completed":
            assert props["currency"] == "EUR" and props["products"]
            total = sum(li["price"] * li["quantity"] for li in props["products"])
            assert props["revenue"] == pytest.approx(total)
        if event == "Scroll Depth":
            assert 0 <= props["depth"] <= 100 and props["path"].startswith("/p/")


def test_server_side_and_email_events_carry_only_the_user_id(
    bodies: list[dict[str, Any]],
) -> None:
    server = [b for b in bodies if b["context"]["device"]["type"] == "server"]
    assert {b["event"] for b in server} == {"Order Completed", "Email Opened", "Email Clicked"}
    assert all("anonymousId" not in b and b["userId"].startswith("cus_") for b in server)
    orders = [b for b in bodies if b.get("event") == "Order Completed"]
    server_orders = sum(1 for b in orders if b["context"]["device"]["type"] == "server")
    assert 0.25 < server_orders / len(orders) < 0.75


def test_ground_truth_counts_match_the_messages(sim: Simulation) -> None:
    truth = sim.ground_truth
    counted = Counter(m.true_customer_id for m in _valid(sim))
    assert dict(counted) == truth.expected_event_counts
    assert sum(truth.expected_event_counts.values()) == len(_valid(sim))
    assert truth.late_message_ids == {m.message_id for m in sim.messages if m.late}
    assert all(m.true_customer_id == "" for m in sim.messages if m.kind == "malformed")


def test_every_known_device_that_appears_is_linked_to_its_customer(
    sim: Simulation, bodies: list[dict[str, Any]]
) -> None:
    owner = {d.anonymous_id: c for c in sim.customers for d in c.devices}
    seen: set[str] = {b.get("anonymousId") or b.get("previousId") or "" for b in bodies} - {""}
    links = sim.ground_truth.identity_links
    logged_in_by = {
        b.get("anonymousId") or b["previousId"]
        for b in bodies
        if b["type"] in ("identify", "alias")
    }
    assert set(links) == logged_in_by, "every link comes from an identify or alias message"
    for anon in seen:
        customer = owner[anon]
        if customer.is_known:
            assert links[anon] == customer.customer_id
        else:
            assert anon not in links
    assert set(links) <= seen
    assert sum(1 for b in bodies if b["type"] == "alias") >= 1


def test_true_customer_ids_resolve_anonymous_events(
    sim: Simulation, bodies: list[dict[str, Any]]
) -> None:
    owner = {d.anonymous_id: c for c in sim.customers for d in c.devices}
    anonymous_only_known = 0
    for m, body in zip(_valid(sim), bodies, strict=True):
        if "userId" in body:
            assert m.true_customer_id == body["userId"]
            continue
        customer = owner[body["anonymousId"]]
        assert m.true_customer_id == customer.customer_id
        if customer.is_known:
            anonymous_only_known += 1
        else:
            assert m.true_customer_id == "anon:" + body["anonymousId"]
    assert anonymous_only_known > 0, "known customers browse logged out before logging in"


def test_each_known_device_starts_logged_out_and_logs_in(
    sim: Simulation, bodies: list[dict[str, Any]]
) -> None:
    by_device: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for m, body in zip(_valid(sim), bodies, strict=True):
        anon = body.get("anonymousId") or body.get("previousId")
        if anon is not None and m.true_customer_id.startswith("cus_"):
            by_device.setdefault(anon, []).append((m.timestamp_ms, body))
    assert by_device
    for events in by_device.values():
        events.sort(key=lambda item: item[0])
        first = events[0][1]
        assert "userId" not in first
        logins = [b for _, b in events if b["type"] in ("identify", "alias")]
        assert logins, "every known device logs in"
        assert any(b.get("event") in ("Logged In", "Signed Up") for _, b in events), (
            "a login is also tracked"
        )


def test_delivery_order_is_timestamp_order_except_late_events(sim: Simulation) -> None:
    delivered = [m.delivered_ms for m in sim.messages]
    assert delivered == sorted(delivered)
    for m in _valid(sim):
        lag = m.delivered_ms - m.timestamp_ms
        if m.late:
            assert 5 * 60_000 <= lag <= 4 * 3_600_000
        else:
            assert 0 < lag < 1_000
    newest = 0
    overtaken = 0
    for m in _valid(sim):
        overtaken += m.timestamp_ms < newest
        newest = max(newest, m.timestamp_ms)
    assert overtaken >= sum(1 for m in sim.messages if m.late) // 2


def test_malformed_messages_fail_for_their_stated_reason(sim: Simulation) -> None:
    for m in sim.messages:
        if m.kind != "malformed":
            continue
        reason = m.malformed_reason
        if reason == "not_utf8":
            with pytest.raises(UnicodeDecodeError):
                m.value.decode("utf-8")
            continue
        if reason == "not_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(m.value)
            continue
        body = orjson.loads(m.value)
        if reason == "too_large":
            assert len(m.value) > MAX_EVENT_BYTES
        elif reason == "missing_identity":
            assert "userId" not in body and "anonymousId" not in body and m.key is None
        elif reason == "bad_timestamp":
            with pytest.raises(ValueError):
                iso_to_ms(body["timestamp"])
            assert m.timestamp_ms == 0
        elif reason == "timestamp_out_of_range":
            assert body["timestamp"][:4] in ("1970", "2100")
            assert iso_to_ms(body["timestamp"]) == m.timestamp_ms
        elif reason == "unknown_event":
            assert body["event"] not in DEFAULT_EVENT_WEIGHTS
        elif reason == "schema_violation":
            props = body["properties"]
            assert (
                isinstance(props.get("price"), str)
                or props.get("quantity", 1) < 0
                or "product_id" not in props
            )
        else:
            pytest.fail(f"unexpected reason {reason}")


def test_true_preferences_drive_browsing(sim: Simulation, bodies: list[dict[str, Any]]) -> None:
    prefs = {c.customer_id: c.category_prefs for c in sim.customers}
    for c in sim.customers:
        assert math.isclose(sum(c.category_prefs.values()), 1.0)
        assert math.isclose(sum(c.brand_prefs.values()), 1.0)
        top_weights = sorted(c.category_prefs.values(), reverse=True)[:3]
        assert sum(top_weights) >= 0.8
    in_top = total = 0
    for m, body in zip(_valid(sim), bodies, strict=True):
        if body.get("event") != "Product Viewed":
            continue
        mine = prefs[m.true_customer_id]
        top = sorted(mine, key=mine.__getitem__, reverse=True)[:3]
        in_top += body["properties"]["category"] in top
        total += 1
    assert in_top / total > 0.6


def test_evening_peak_hours_are_busier_than_the_night(sim: Simulation) -> None:
    hours = Counter(datetime.fromtimestamp(m.timestamp_ms / 1000, tz=UTC).hour for m in _valid(sim))
    evening = sum(hours[h] for h in (18, 19, 20, 21))
    small_hours = sum(hours[h] for h in (2, 3, 4, 5))
    assert evening > 2 * small_hours


def test_write_ground_truth_files(sim: Simulation, tmp_path: Path) -> None:
    paths = sim.write_ground_truth(tmp_path / "truth")
    assert all(p.exists() for p in paths.values())
    lines = paths["messages.jsonl"].read_text().splitlines()
    assert len(lines) == len(sim.messages)
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == [m.kind for m in sim.messages]
    assert sum(r["resent"] for r in records) == len(sim.ground_truth.duplicates)
    assert json.loads(paths["identity_links.json"].read_text()) == sim.ground_truth.identity_links
    counts = json.loads(paths["expected_event_counts.json"].read_text())
    assert counts == sim.ground_truth.expected_event_counts
    customers = paths["customers.jsonl"].read_text().splitlines()
    assert len(customers) == len(sim.customers)
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["messages"] == 8_000 and summary["valid"] == len(_valid(sim))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="UTC"):
        SimulationConfig(10, end=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="UTC"):
        SimulationConfig(10, end=datetime.fromisoformat("2026-01-01T00:00:00+01:00"))
    with pytest.raises(ValueError, match="events"):
        SimulationConfig(0, end=END)
    with pytest.raises(ValueError, match="duplicate_rate"):
        SimulationConfig(10, end=END, duplicate_rate=0.9)
    assert SimulationConfig(6_000, end=END).known_customers == 100
    assert SimulationConfig(100, end=END).known_customers == 10


def test_all_visitors_known_when_no_anonymous_share(catalog: Catalog) -> None:
    result = simulate(
        SimulationConfig(1_200, end=END, seed=5, anonymous_visitor_share=0.0), catalog
    )
    assert len(result.messages) == 1_200
    assert all(c.is_known for c in result.customers)
    assert all(m.true_customer_id.startswith("cus_") for m in _valid(result))


def test_twenty_thousand_events_simulate_quickly(catalog: Catalog) -> None:
    started = time.perf_counter()
    result = simulate(SimulationConfig(20_000, end=END, seed=9), catalog)
    assert len(result.messages) == 20_000
    assert time.perf_counter() - started < 10.0


def test_the_pipeline_parser_agrees_with_the_simulator_truth(sim: Simulation) -> None:
    registry = SchemaRegistry.load()
    now_ms = int(sim.config.end.timestamp() * 1000)
    for m in sim.messages:
        parsed = parse_event(
            m.value, registry=registry, limits=ParseLimits(), now_ms=now_ms, ingested_ms=now_ms
        )
        if m.kind == "malformed":
            assert isinstance(parsed, Failure) and parsed.reason == m.malformed_reason
        else:
            assert not isinstance(parsed, Failure), parsed.detail
            assert parsed.message_id == m.message_id and parsed.timestamp_ms == m.timestamp_ms


def test_output_does_not_depend_on_the_process_hash_seed() -> None:
    script = (
        "import hashlib, sys\n"
        "from datetime import UTC, datetime\n"
        "from pipeline.catalog import load_catalog\n"
        "from pipeline.simulate import SimulationConfig, simulate\n"
        "sim = simulate(SimulationConfig(600, end=datetime(2026, 11, 20, tzinfo=UTC)),"
        " load_catalog())\n"
        "h = hashlib.sha256()\n"
        "for m in sim.messages: h.update((m.key or b'') + m.value + m.true_customer_id.encode())\n"
        "print(h.hexdigest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SRC)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_end_of_names_a_fixed_day_or_today() -> None:
    """Notebooks simulate up to "today" unless given an ``end``: a nightly report of a fixed
    day must not change because the calendar moved on."""
    assert end_of("2026-03-10") == datetime(2026, 3, 10, tzinfo=UTC)
    assert end_of(date(2026, 3, 10)) == end_of("2026-03-10")
    assert end_of("") == default_end() and end_of(None) == default_end()
    with pytest.raises(ValueError):
        end_of("10/03/2026")
