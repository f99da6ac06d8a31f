"""parse_event: clean events from realistic messages, one typed failure per kind of bad input."""

from __future__ import annotations

import base64
import copy
import typing
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.events import CleanEvent, Failure, FailureReason, LineItem, iso_to_ms
from pipeline.parsing import MIN_TIMESTAMP_MS, ParseLimits, parse_event
from pipeline.schemas import SchemaRegistry, default_registry

NOW_MS = iso_to_ms("2026-11-20T12:00:00Z")
LIMITS = ParseLimits()
REGISTRY = default_registry()
NAMES = sorted(n for n in REGISTRY.versions() if n != "envelope")


def example(name: str) -> dict[str, Any]:
    message: dict[str, Any] = REGISTRY.schema(name, 1)["examples"][0]
    return message


def parse(raw: bytes | None, registry: SchemaRegistry = REGISTRY) -> CleanEvent | Failure:
    return parse_event(
        raw,
        registry=registry,
        limits=LIMITS,
        now_ms=NOW_MS,
        ingested_ms=NOW_MS - 5,
        key="a_5d41402a",
        topic="events.raw",
        partition=3,
        offset=1234,
    )


def parse_dict(message: Any) -> CleanEvent | Failure:
    return parse(orjson.dumps(message))


def clean(message: dict[str, Any]) -> CleanEvent:
    result = parse_dict(message)
    assert isinstance(result, CleanEvent), result
    return result


def failure(raw: bytes | None, reason: FailureReason) -> Failure:
    result = parse(raw)
    assert isinstance(result, Failure), result
    assert result.reason == reason, result
    return result


def mutated(name: str, **changes: Any) -> bytes:
    message = copy.deepcopy(example(name))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = message
        for part in parents:
            target = target[part]
        if value is ...:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return orjson.dumps(message)


@pytest.mark.parametrize("name", NAMES)
def test_every_event_type_parses(name: str) -> None:
    message = example(name)
    event = clean(message)
    expected_name = {"page": "Page Viewed", "identify": "Identify", "alias": "Alias"}.get(
        name, name
    )
    assert event.name == expected_name
    assert event.type == message["type"]
    assert event.message_id == message["messageId"]
    assert event.timestamp_ms == iso_to_ms("2026-11-20T10:11:12.345Z")
    assert event.ingested_ms == NOW_MS - 5
    assert event.device_type == message["context"]["device"]["type"]
    assert event.identity_key


def test_product_viewed_fields() -> None:
    event = clean(example("Product Viewed"))
    assert event.timestamp_ms == 1795169472345
    assert (event.user_id, event.anonymous_id) == ("cus_000042", "a_5d41402a")
    assert (event.session_id, event.timezone, event.source) == (
        "s_8f2c1a",
        "Europe/Paris",
        "analytics.js",
    )
    assert event.schema_version == 1
    assert event.product_id == "P00042"
    assert event.properties["price"] == 79.0
    assert (event.category, event.brand, event.price, event.revenue) == (None, None, None, None)


def test_order_completed_items_and_revenue() -> None:
    event = clean(example("Order Completed"))
    assert event.revenue == 130.0
    assert event.items == (LineItem("P00042", 1, 79.0), LineItem("P00107", 2, 25.5))
    assert all(i.category is None and i.brand is None for i in event.items)


def test_line_items_keep_the_category_and_brand_sent_with_them() -> None:
    products = [
        {
            "product_id": "new1",
            "quantity": 1,
            "price": 50.0,
            "category": "dresses",
            "brand": "Lune",
        },
        {"product_id": "new2", "quantity": 1, "price": 5.0, "brand": ""},  # empty: none
    ]
    event = parse(mutated("Order Completed", properties__products=products))
    assert isinstance(event, CleanEvent)
    assert event.items == (
        LineItem("new1", 1, 50.0, "dresses", "Lune"),
        LineItem("new2", 1, 5.0, None, None),
    )


def test_cart_items_default_quantity_and_missing_price() -> None:
    raw = mutated("Cart Viewed", properties={"products": [{"product_id": "P9"}]})
    event = parse(raw)
    assert isinstance(event, CleanEvent)
    assert event.items == (LineItem("P9", 1, 0.0),)


def test_product_added_quantity_defaults_to_one() -> None:
    event = parse(mutated("Product Added", properties__quantity=...))
    assert isinstance(event, CleanEvent)
    assert event.properties["quantity"] == 1


def test_identify_alias_and_page_specifics() -> None:
    identify = parse(mutated("identify", context__timezone=...))
    assert isinstance(identify, CleanEvent)
    assert identify.timezone == "Europe/Paris"
    assert identify.traits["email"] == "lea.martin@example.com"
    alias = clean(example("alias"))
    assert (alias.previous_id, alias.user_id, alias.anonymous_id) == (
        "a_5d41402a",
        "cus_000042",
        None,
    )
    assert alias.identity_key == "a_5d41402a"
    page = clean(example("page"))
    assert page.properties["name"] == "Dresses"
    assert page.properties["path"] == "/women/dresses"


def test_timestamp_with_offset_and_schema_version() -> None:
    event = parse(
        mutated(
            "Product Viewed", timestamp="2026-11-20T11:11:12.345+01:00", context__schemaVersion=4
        )
    )
    assert isinstance(event, CleanEvent)
    assert event.timestamp_ms == 1795169472345
    assert event.schema_version == 4


def test_anonymous_only_and_user_only_events() -> None:
    anon = parse(mutated("Product Viewed", userId=None))
    assert isinstance(anon, CleanEvent)
    assert anon.user_id is None and anon.identity_key == "a_5d41402a"
    user = parse(mutated("Product Viewed", anonymousId=""))
    assert isinstance(user, CleanEvent)
    assert user.anonymous_id is None and user.identity_key == "cus_000042"


def test_clean_event_round_trips_through_dict() -> None:
    event = clean(example("Order Completed"))
    assert CleanEvent.from_dict(orjson.loads(orjson.dumps(event.to_dict()))) == event


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        (None, "not_json", "no value"),
        (b"", "not_json", "empty"),
        (b"{" + b" " * 40000 + b"}", "too_large", "40002 bytes"),
        (b"\xff\xfe", "not_utf8", "byte 0"),
        (b'{"type": "track", "event": "Product Viewed \xc3\x28"}', "not_utf8", "byte 43"),
        (b"not json", "not_json", "not JSON"),
        (b'{"type": "track",', "not_json", "not JSON"),
        (b"NaN", "not_json", "not JSON"),
        (b'{"properties": {"price": NaN}}', "not_json", "not JSON"),
        (b'{"properties": {"price": Infinity}}', "not_json", "not JSON"),
        (b'{"properties": {"price": 1e400}}', "not_json", "infinity"),
        (b"[" * 2000 + b"]" * 2000, "not_json", "depth"),
        (b"[1, 2]", "not_an_object", "array"),
        (b'"track"', "not_an_object", "string"),
        (b"null", "not_an_object", "null"),
        (b"42", "not_an_object", "number"),
    ],
)
def test_undecodable_messages(raw: bytes | None, reason: FailureReason, words: str) -> None:
    result = failure(raw, reason)
    assert words in result.detail
    assert result.message_id is None


def test_failure_keeps_position_and_exact_bytes() -> None:
    raw = b"\xff\xfe{junk"
    result = failure(raw, "not_utf8")
    assert (result.key, result.topic, result.partition, result.offset) == (
        "a_5d41402a",
        "events.raw",
        3,
        1234,
    )
    assert result.dead_letter_id == "events.raw:3:1234"
    assert (result.ingested_ms, result.failed_ms) == (NOW_MS - 5, NOW_MS)
    assert base64.b64decode(result.raw_b64) == raw
    assert "\ufffd" in result.raw_text


@pytest.mark.parametrize(
    "changes",
    [
        {"userId": ..., "anonymousId": ...},
        {"userId": None, "anonymousId": ""},
        {"userId": "", "anonymousId": None},
    ],
)
def test_missing_identity(changes: dict[str, Any]) -> None:
    result = failure(mutated("Product Viewed", **changes), "missing_identity")
    assert result.message_id == "m_product_viewed_0001"
    assert result.event_name == "Product Viewed"


@pytest.mark.parametrize("name", ["Product Viewed", "identify", "alias"])
def test_a_user_id_in_the_anonymous_profiles_namespace_is_refused(name: str) -> None:
    """``anon:<device>`` names a device's anonymous profile: a customer with such an id would be
    folded into one (and never counted as known), so the event is dead-lettered, saying why."""
    result = failure(mutated(name, userId="anon:d1"), "schema_violation")
    assert result.schema_path == "userId"
    assert "'anon:'" in result.detail and "reserved" in result.detail
    # the prefix elsewhere in the id, or as a device id, is nobody's business
    assert isinstance(parse(mutated(name, userId="u-anon:1")), CleanEvent)
    if name != "alias":
        assert isinstance(parse(mutated(name, anonymousId="anon:d1")), CleanEvent)


def test_alias_identity_comes_from_previous_id() -> None:
    assert failure(mutated("alias", userId=..., previousId=...), "missing_identity")
    result = failure(mutated("alias", userId=...), "schema_violation")
    assert result.schema_path == "userId"
    assert result.event_name == "Alias"


@pytest.mark.parametrize(
    ("name", "changes", "path"),
    [
        ("Product Viewed", {"properties__price": "cheap"}, "properties.price"),
        ("Product Added", {"properties__quantity": -1}, "properties.quantity"),
        (
            "Order Completed",
            {"properties__products": [{"product_id": "P1", "quantity": -3, "price": 1.0}]},
            "properties.products[0].quantity",
        ),
        ("Order Completed", {"properties__currency": "euro"}, "properties.currency"),
        ("Product Viewed", {"context__sessionId": ...}, "context.sessionId"),
        ("Product Viewed", {"timestamp": 1795169472345}, "timestamp"),
        ("Product Viewed", {"messageId": ...}, "messageId"),
        ("identify", {"traits__email": "lea at example"}, "traits.email"),
    ],
)
def test_schema_violations_name_the_field(name: str, changes: dict[str, Any], path: str) -> None:
    result = failure(mutated(name, **changes), "schema_violation")
    assert result.schema_path == path
    assert path in result.detail
    expected_name = {"identify": "Identify"}.get(name, name)
    assert result.event_name == expected_name


def test_unknown_event() -> None:
    result = failure(mutated("Product Viewed", event="Product Teleported"), "unknown_event")
    assert result.event_name == "Product Teleported"
    assert result.message_id == "m_product_viewed_0001"
    assert "Product Teleported" in result.detail
    assert failure(mutated("Product Viewed", type="screen"), "unknown_event")


@pytest.mark.parametrize(
    "timestamp",
    [
        "yesterday",
        "2026-11-20",
        "2026-11-20T10:11:12",
        "2026-13-40T10:11:12Z",
        "",
        "2026-11-20T10:11:12 Europe/Paris",
        "20261120",
    ],
)
def test_bad_timestamp(timestamp: str) -> None:
    reason: FailureReason = "schema_violation" if timestamp == "" else "bad_timestamp"
    result = failure(mutated("Product Viewed", timestamp=timestamp), reason)
    assert result.schema_path == "timestamp"


@pytest.mark.parametrize(
    "timestamp",
    [
        "2100-01-01T00:00:00Z",
        "1970-01-01T00:00:00Z",
        "1999-12-31T23:59:59.999Z",
        "2026-11-21T12:00:00.001Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
    ],
)
def test_timestamp_out_of_range(timestamp: str) -> None:
    result = failure(mutated("Product Viewed", timestamp=timestamp), "timestamp_out_of_range")
    assert result.schema_path == "timestamp"


def test_timestamp_range_edges_are_inclusive() -> None:
    assert iso_to_ms("2000-01-01T00:00:00Z") == MIN_TIMESTAMP_MS
    for ts in ("2000-01-01T00:00:00Z", "2026-11-21T12:00:00Z"):
        assert isinstance(parse(mutated("Product Viewed", timestamp=ts)), CleanEvent)


def test_duplicate_keys_last_one_wins() -> None:
    """Documented behaviour (orjson, like JSON.parse): the last duplicate is the value."""
    good = mutated("Product Viewed")
    last_ok = good.replace(b'"price":79.0', b'"price":"cheap","price":79.0')
    event = parse(last_ok)
    assert isinstance(event, CleanEvent) and event.properties["price"] == 79.0
    last_bad = good.replace(b'"price":79.0', b'"price":79.0,"price":"cheap"')
    assert failure(last_bad, "schema_violation").schema_path == "properties.price"


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"x": node}
    return node


def test_deep_nesting_is_refused_past_max_depth() -> None:
    raw = mutated("Product Viewed", properties__extra=_nested(40))
    result = failure(raw, "schema_violation")
    assert result.schema_path is not None
    assert result.schema_path.startswith("properties.extra.x.x")
    assert "nesting deeper than 32" in result.detail
    shallow = parse(mutated("Product Viewed", properties__extra=_nested(10)))
    assert isinstance(shallow, CleanEvent)


def test_many_shallow_containers_are_fine() -> None:
    products = [{"product_id": f"P{i}", "quantity": 1, "price": 1.0} for i in range(150)]
    event = parse(mutated("Order Completed", properties__products=products))
    assert isinstance(event, CleanEvent) and len(event.items) == 150


def test_size_limit_is_configurable() -> None:
    raw = orjson.dumps(example("Product Viewed"))
    small = ParseLimits(max_event_bytes=len(raw) - 1)
    result = parse_event(raw, registry=REGISTRY, limits=small, now_ms=NOW_MS, ingested_ms=0)
    assert isinstance(result, Failure) and result.reason == "too_large"
    exact = ParseLimits(max_event_bytes=len(raw))
    ok = parse_event(raw, registry=REGISTRY, limits=exact, now_ms=NOW_MS, ingested_ms=0)
    assert isinstance(ok, CleanEvent)


REASONS = set(typing.get_args(FailureReason))


def _check_result(result: CleanEvent | Failure) -> None:
    assert isinstance(result, CleanEvent | Failure)
    if isinstance(result, Failure):
        assert result.reason in REASONS
        orjson.dumps(result.to_dict())
    else:
        orjson.dumps(result.to_dict())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    _check_result(parse(raw))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_never_raises_on_arbitrary_json(value: Any) -> None:
    _check_result(parse(orjson.dumps(value)))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(NAMES), st.data())
def test_never_raises_on_mutated_real_events(name: str, data: st.DataObject) -> None:
    message = copy.deepcopy(example(name))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(message)[1:]))
        target = message
        for part in path[:-1]:
            target = target[part]
        if data.draw(st.booleans()) and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(json_values)
    _check_result(parse_dict(message))


def test_source_is_the_collectors_source_id_else_the_library() -> None:
    message = example("Product Viewed")
    assert clean(message).source == "analytics.js"
    message["context"]["sourceId"] = "web"
    assert clean(message).source == "web"
    message["properties"]["price"] = "12.00"  # refused, but its source is still known
    assert failure(orjson.dumps(message), "schema_violation").source == "web"
    del message["context"]["sourceId"]
    assert failure(orjson.dumps(message), "schema_violation").source == "analytics.js"
    message["context"] = {"device": {"type": "mobile"}, "sourceId": 7, "library": "x"}
    assert failure(orjson.dumps(message), "schema_violation").source is None
    assert failure(b"{not json", "not_json").source is None
