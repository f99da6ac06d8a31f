"""Property-based tests of parsing, dedupe, identity merge and scoring invariants.

Order independence of scoring lives in test_scoring.py; never-raising on plain arbitrary
bytes and JSON lives in test_parsing.py. These properties go further: bytes mutated inside
real events, envelopes with arbitrary field values, duplicates anywhere, any login order.
"""

from __future__ import annotations

import base64
import typing
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalog import load_catalog
from pipeline.events import CleanEvent, Failure, FailureReason, LineItem
from pipeline.identity import anonymous_customer_id
from pipeline.parsing import ParseLimits, parse_event
from pipeline.schemas import default_registry
from pipeline.scoring import (
    DAY_MS,
    DEFAULT_EVENT_WEIGHTS,
    IntentStage,
    ScoringParams,
    apply_event,
    intent_stage,
    interaction_score,
    new_profile,
)
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.testing import T0_MS, ReplayResult, make_event, replay

REGISTRY = default_registry()
LIMITS = ParseLimits()
NOW_MS = T0_MS + 400 * DAY_MS
REASONS = frozenset(typing.get_args(FailureReason))
CATALOG = load_catalog()
SETTINGS = Settings(_env_file=None)
SIMULATION = simulate(
    SimulationConfig(events=150, seed=5, end=datetime(2026, 11, 1, tzinfo=UTC), days=5), CATALOG
)
MESSAGES = [(m.key, m.value) for m in SIMULATION.messages]
REPLAY_NOW_MS = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp() * 1000)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(raw: bytes) -> CleanEvent | Failure:
    return parse_event(raw, registry=REGISTRY, limits=LIMITS, now_ms=NOW_MS, ingested_ms=NOW_MS)


def valid_event(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": "m-1",
        "anonymousId": "a-1",
        "timestamp": "2024-06-01T12:00:00.000Z",
        "context": {"device": {"type": "server"}},
        "properties": {"product_id": "P00001"},
    }
    event.update(fields)
    return event


VALID_BYTES = orjson.dumps(valid_event())


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(0, len(VALID_BYTES)),
    cut=st.integers(0, 8),
    insert=st.binary(max_size=12),
)
def test_parsing_bytes_mutated_inside_a_valid_event_never_raises(
    position: int, cut: int, insert: bytes
) -> None:
    raw = VALID_BYTES[:position] + insert + VALID_BYTES[position + cut :]
    result = parse(raw)
    if isinstance(result, Failure):
        assert result.reason in REASONS
        assert base64.b64decode(result.raw_b64) == raw
        assert result.detail
    else:
        assert result.message_id and (result.anonymous_id or result.user_id)
    assert parse(raw) == result, "parsing is deterministic"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
ENVELOPE_PATHS = [
    ("type",),
    ("event",),
    ("messageId",),
    ("anonymousId",),
    ("userId",),
    ("previousId",),
    ("timestamp",),
    ("sentAt",),
    ("context",),
    ("context", "device"),
    ("context", "device", "type"),
    ("context", "sessionId"),
    ("context", "schemaVersion"),
    ("context", "timezone"),
    ("properties",),
    ("properties", "product_id"),
    ("properties", "products"),
    ("properties", "revenue"),
    ("traits",),
]


@FAST
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(ENVELOPE_PATHS), json_values), min_size=1, max_size=4
    ),
    kind=st.sampled_from(["track", "identify", "page", "alias"]),
)
def test_parsing_envelopes_with_arbitrary_field_values_never_raises(
    changes: list[tuple[tuple[str, ...], Any]], kind: str
) -> None:
    event = valid_event(type=kind)
    for path, value in changes:
        target: Any = event
        for part in path[:-1]:
            if type(target) is not dict:
                break
            target = target.setdefault(part, {})
        if type(target) is dict:
            target[path[-1]] = value
    result = parse(orjson.dumps(event))
    if isinstance(result, Failure):
        assert result.reason in REASONS
        orjson.dumps(result.to_dict())
    else:
        assert type(result.message_id) is str and result.timestamp_ms >= LIMITS.min_timestamp_ms
        assert result.user_id or result.anonymous_id or result.previous_id
        orjson.dumps(result.to_dict())


def _comparable(result: ReplayResult) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Profiles and events without the processing-time stamps that shift with input position."""
    profiles = {
        cid: {k: v for k, v in p.items() if k != "updated_ms"} for cid, p in result.profiles.items()
    }
    events = {
        mid: {k: v for k, v in e.items() if k not in ("ingested_ms", "scored_ms")}
        for mid, e in result.events_by_id.items()
    }
    links = sorted((link["anonymous_id"], link["customer_id"]) for link in result.links)
    return profiles, events, links


def _replay(messages: list[tuple[bytes | None, bytes]]) -> ReplayResult:
    return replay(
        messages, catalog=CATALOG, registry=REGISTRY, settings=SETTINGS, now_ms=REPLAY_NOW_MS
    )


BASELINE = _replay(MESSAGES)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_duplicates_anywhere_after_the_original_change_nothing(data: st.DataObject) -> None:
    copies = data.draw(
        st.lists(st.integers(0, len(MESSAGES) - 1), min_size=1, max_size=40), label="copied"
    )
    sequence: list[tuple[bytes | None, bytes]] = list(MESSAGES)
    for original in copies:
        # A copy lands anywhere after its original's first occurrence.
        first = sequence.index(MESSAGES[original])
        at = data.draw(st.integers(first + 1, len(sequence)), label="position")
        sequence.insert(at, MESSAGES[original])
    result = _replay(sequence)
    assert _comparable(result) == _comparable(BASELINE)
    refused = {base64.b64decode(f.raw_b64) for f in BASELINE.failures}
    refused_copies = sum(1 for i in copies if MESSAGES[i][1] in refused)
    assert len(result.failures) == len(BASELINE.failures) + refused_copies
    dropped = BASELINE.duplicates_dropped + len(copies) - refused_copies
    assert result.duplicates_dropped == dropped


def _raw(n: int, ts_ms: int, **fields: Any) -> tuple[bytes, bytes]:
    """Message ``n`` as the collector would key it; an identify carries no properties."""
    event = valid_event(
        messageId=f"m-{n}",
        timestamp=datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat().replace("+00:00", "Z"),
        **fields,
    )
    event.pop("anonymousId") if "anonymousId" not in fields else None
    if event["type"] == "identify":
        del event["properties"], event["event"]
    key: str = fields.get("userId") or fields["anonymousId"]
    return key.encode(), orjson.dumps(event)


@FAST
@given(
    kinds=st.lists(st.sampled_from(["device", "server"]), max_size=12),
    login_at=st.integers(0, 12),
    times=st.lists(st.integers(0, 30 * DAY_MS), min_size=13, max_size=13),
)
def test_any_interleaving_of_anonymous_events_and_a_login_merges_exactly(
    kinds: list[str], login_at: int, times: list[int]
) -> None:
    device, user = "dev-1", "cus-1"
    login_at = min(login_at, len(kinds))
    messages = []
    for i, kind in enumerate(kinds):
        if i == login_at:
            messages.append(
                _raw(
                    1000,
                    T0_MS + times[12],
                    type="identify",
                    anonymousId=device,
                    userId=user,
                    traits={"firstName": "Ada"},
                )
            )
        fields = {"anonymousId": device} if kind == "device" else {"userId": user}
        messages.append(_raw(i, T0_MS + times[i], **fields))
    if login_at == len(kinds):
        messages.append(
            _raw(1000, T0_MS + times[12], type="identify", anonymousId=device, userId=user)
        )
    result = _replay([(k, v) for k, v in messages])
    assert result.failures == []
    assert result.profiles[user]["event_count"] == len(messages)
    assert {e["customer_id"] for e in result.events} == {user}
    assert len(result.events) == len(messages)
    anonymous_before = sum(1 for k in kinds[:login_at] if k == "device")
    anon = anonymous_customer_id(device)
    if anonymous_before:
        assert result.profiles[anon]["merged_into"] == user
        merged = [e for e in result.events if e["merged_from"] == anon]
        assert len(merged) == anonymous_before
    else:
        assert anon not in result.profiles
    assert [(link["anonymous_id"], link["customer_id"]) for link in result.links] == [
        (device, user)
    ]


NAMES = sorted(n for n in DEFAULT_EVENT_WEIGHTS if n not in ("Identify", "Alias"))
LINE_ITEMS = st.builds(
    LineItem,
    product_id=st.sampled_from(["P1", "P2", "P3"]),
    quantity=st.integers(1, 1000),
    price=st.floats(0.0, 1e9),
    category=st.sampled_from([None, "dresses", "shoes"]),
    brand=st.sampled_from([None, "Acme", "Zed"]),
)


@st.composite
def scoring_params(draw: st.DrawFn) -> ScoringParams:
    raw = [draw(st.floats(0.0, 1.0)) for _ in range(3)]
    total = sum(raw) or 1.0
    r, f = raw[0] / total, raw[1] / total
    weights = {name: draw(st.floats(-20.0, 20.0)) for name in NAMES}
    return ScoringParams(
        weight_recency=r,
        weight_frequency=f,
        weight_monetary=max(0.0, 1.0 - r - f) if sum(raw) else 1.0,
        engagement_half_life_days=draw(st.floats(0.01, 1000.0)),
        affinity_half_life_days=draw(st.floats(0.01, 1000.0)),
        monetary_half_life_days=draw(st.floats(0.01, 1000.0)),
        recency_half_life_days=draw(st.floats(0.01, 1000.0)),
        frequency_saturation=draw(st.floats(0.01, 1000.0)),
        monetary_saturation=draw(st.floats(0.01, 10_000.0)),
        event_weights=weights,
    )


@st.composite
def scored_events(draw: st.DrawFn) -> list[CleanEvent]:
    events = []
    for _ in range(draw(st.integers(1, 30))):
        name = draw(st.sampled_from(NAMES))
        fields: dict[str, Any] = {
            "category": draw(st.sampled_from([None, "dresses", "shoes"])),
            "brand": draw(st.sampled_from([None, "Acme", "Zed"])),
            "product_id": draw(st.sampled_from([None, "P1", "P2"])),
            "timezone": draw(st.sampled_from([None, "UTC", "Asia/Kolkata", "Not/AZone"])),
        }
        if name in ("Order Completed", "Cart Viewed", "Checkout Started"):
            fields["items"] = draw(st.lists(LINE_ITEMS, max_size=3))
            fields["revenue"] = draw(st.floats(0.0, 1e9))
        ts = T0_MS + draw(st.integers(-400 * DAY_MS, 400 * DAY_MS))
        events.append(make_event(name, ts=ts, **fields))
    return events


@settings(max_examples=150, deadline=None)
@given(events=scored_events(), params=scoring_params(), later=st.integers(0, 3000 * DAY_MS))
def test_scores_stay_in_range_and_affinities_never_negative(
    events: list[CleanEvent], params: ScoringParams, later: int
) -> None:
    profile = new_profile("c1", is_anonymous=False)
    for i, event in enumerate(events):
        apply_event(profile, event, params, processed_ms=NOW_MS + i)
        assert 0.0 <= profile.cis <= 100.0
        # >= 0, not > 0: with a tiny half-life an old affinity can decay to exactly 0.0.
        assert all(v >= 0.0 for v in profile.category_affinity.values())
        assert all(v >= 0.0 for v in profile.brand_affinity.values())
        assert profile.monetary >= 0.0 and profile.revenue_total >= 0.0
        assert all(v >= 0.0 for v in profile.hour_of_week.values())
    assert profile.event_count == len(events)
    assert profile.as_of_ms == max(e.timestamp_ms for e in events)
    assert profile.version == len(events)
    for at in (profile.as_of_ms or 0, (profile.as_of_ms or 0) + later, T0_MS - DAY_MS):
        score = interaction_score(profile, at, params)
        assert 0.0 <= score.score <= 100.0 + 1e-9
        for part in (score.recency, score.frequency, score.monetary):
            assert 0.0 <= part <= 1.0
        assert intent_stage(profile, at, params) in typing.get_args(IntentStage)


def test_fixtures_are_meaningful() -> None:
    """The replayed simulation has duplicates, failures, merges and several profiles."""
    assert BASELINE.duplicates_dropped > 0
    assert BASELINE.failures
    assert any(p.get("merged_into") for p in BASELINE.profiles.values())
    assert len(BASELINE.profiles) > 5
    with pytest.raises(ValueError):
        ScoringParams(weight_recency=0.5, weight_frequency=0.5, weight_monetary=0.5)
