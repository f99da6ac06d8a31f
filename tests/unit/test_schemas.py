"""Schema files, the registry's validation messages, and its backward-compatibility gate."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import IncompatibleSchemaError, SchemaError
from pipeline.schemas import (
    SCHEMA_DIR,
    SchemaRegistry,
    ValidationProblem,
    backward_incompatibilities,
    default_registry,
    slug,
)

TRACK_EVENTS = (
    "Product Viewed",
    "Product Clicked",
    "Product Added",
    "Product Removed",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Email Opened",
    "Email Clicked",
    "Scroll Depth",
    "Video Played",
    "Signed Up",
    "Logged In",
)
ALL_NAMES = (*TRACK_EVENTS, "page", "identify", "alias")


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load()


def example(registry: SchemaRegistry, name: str) -> dict[str, Any]:
    """The realistic wire message shipped in the schema file's ``examples``."""
    message: dict[str, Any] = registry.schema(name, 1)["examples"][0]
    return message


def problem_of(registry: SchemaRegistry, message: dict[str, Any]) -> ValidationProblem:
    problem = registry.validate(message)
    assert problem is not None, message
    return problem


def test_registry_lists_every_event_and_envelope(registry: SchemaRegistry) -> None:
    versions = registry.versions()
    assert set(versions) == {*ALL_NAMES, "envelope"}
    assert all(v == (1,) for v in versions.values())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_shipped_example_validates(registry: SchemaRegistry, name: str) -> None:
    assert registry.validate(example(registry, name)) is None


def test_track_files_are_named_after_their_title() -> None:
    for path in (SCHEMA_DIR / "track").glob("*.json"):
        title = json.loads(path.read_text())["title"]
        assert path.name == f"{slug(title)}.v1.json"


def test_validator_is_compiled_once_and_cached(registry: SchemaRegistry) -> None:
    first = registry.validator("track", "Order Completed", 1)
    assert first is registry.validator("track", "Order Completed", 1)
    assert registry.validator("page", None, 1) is registry.validator("page", "ignored", 1)
    assert default_registry() is default_registry()
    with pytest.raises(SchemaError, match="Nope"):
        registry.validator("track", "Nope", 1)


@pytest.mark.parametrize(
    ("name", "mutate", "path", "words"),
    [
        (
            "Product Viewed",
            lambda m: m["properties"].update(price="cheap"),
            "properties.price",
            "must be number",
        ),
        (
            "Product Viewed",
            lambda m: m["properties"].update(price=True),
            "properties.price",
            "must be number",
        ),
        (
            "Product Viewed",
            lambda m: m["properties"].update(price=-1),
            "properties.price",
            "bigger than or equal to 0",
        ),
        (
            "Product Viewed",
            lambda m: m["properties"].pop("product_id"),
            "properties.product_id",
            "is required",
        ),
        (
            "Product Clicked",
            lambda m: m["properties"].update(position=1.5),
            "properties.position",
            "must be integer",
        ),
        (
            "Product Added",
            lambda m: m["properties"].update(quantity=0),
            "properties.quantity",
            "bigger than or equal to 1",
        ),
        (
            "Order Completed",
            lambda m: m["properties"]["products"][1].update(quantity=-2),
            "properties.products[1].quantity",
            "bigger than or equal to 1",
        ),
        (
            "Order Completed",
            lambda m: m["properties"]["products"][0].update(quantity=1001),
            "properties.products[0].quantity",
            "smaller than or equal to 1000",
        ),
        (
            "Order Completed",
            lambda m: m["properties"].update(products=[]),
            "properties.products",
            "must contain at least 1 items",
        ),
        (
            "Order Completed",
            lambda m: m["properties"].update(
                products=[{"product_id": "P1", "quantity": 1, "price": 1.0}] * 201
            ),
            "properties.products",
            "201 items",
        ),
        (
            "Order Completed",
            lambda m: m["properties"].update(currency="eur"),
            "properties.currency",
            "must match pattern",
        ),
        (
            "Order Completed",
            lambda m: m["properties"].pop("revenue"),
            "properties.revenue",
            "is required",
        ),
        (
            "Scroll Depth",
            lambda m: m["properties"].update(depth=101),
            "properties.depth",
            "smaller than or equal to 100",
        ),
        (
            "identify",
            lambda m: m["traits"].update(email="not-an-email"),
            "traits.email",
            "must match pattern",
        ),
        ("alias", lambda m: m.pop("previousId"), "previousId", "is required"),
        (
            "Product Viewed",
            lambda m: m.update(messageId=""),
            "messageId",
            "longer than or equal to 1",
        ),
        (
            "Product Viewed",
            lambda m: m.update(messageId="m" * 201),
            "messageId",
            "shorter than or equal to 200",
        ),
        (
            "Product Viewed",
            lambda m: m["context"]["device"].update(type="fridge"),
            "context.device.type",
            "must be one of",
        ),
        ("Product Viewed", lambda m: m["context"].pop("device"), "context.device", "is required"),
        (
            "Product Viewed",
            lambda m: m["context"].pop("sessionId"),
            "context.sessionId",
            "is required",
        ),
        ("page", lambda m: m["context"].pop("sessionId"), "context.sessionId", "is required"),
        ("Product Viewed", lambda m: m.update(userId=7), "userId", "must be string or null"),
        (
            "Product Viewed",
            lambda m: m.update(userId=None, anonymousId=None),
            "userId",
            "userId or anonymousId",
        ),
        ("Product Viewed", lambda m: m.update(event=42), "event", "non-empty string"),
        ("Product Viewed", lambda m: m.pop("type"), "type", "must be one of"),
        (
            "Product Viewed",
            lambda m: m["context"].update(schemaVersion="1"),
            "context.schemaVersion",
            "positive integer",
        ),
    ],
)
def test_violations_name_the_field(
    registry: SchemaRegistry, name: str, mutate: Any, path: str, words: str
) -> None:
    message = copy.deepcopy(example(registry, name))
    mutate(message)
    problem = problem_of(registry, message)
    assert problem.reason == "schema_violation"
    assert problem.schema_path == path
    assert path in problem.detail and words in problem.detail


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda m: m.update(event="Product Teleported"), "no schema for track event"),
        (lambda m: m.update(type="screen"), "unknown message type 'screen'"),
        (lambda m: m.update(event="page"), "reserved"),
    ],
)
def test_unknown_events(registry: SchemaRegistry, mutate: Any, words: str) -> None:
    message = copy.deepcopy(example(registry, "Product Viewed"))
    mutate(message)
    problem = problem_of(registry, message)
    assert problem.reason == "unknown_event"
    assert words in problem.detail


def test_server_events_need_no_session(registry: SchemaRegistry) -> None:
    message = copy.deepcopy(example(registry, "Product Viewed"))
    message["context"] = {"device": {"type": "server"}}
    assert registry.validate(message) is None


def test_unknown_extra_properties_are_allowed(registry: SchemaRegistry) -> None:
    message = copy.deepcopy(example(registry, "Product Viewed"))
    message["properties"]["variant"] = {"size": "M"}
    message["context"]["ip"] = "203.0.113.9"
    assert registry.validate(message) is None


def test_defaults_are_filled_in(registry: SchemaRegistry) -> None:
    message = copy.deepcopy(example(registry, "Product Added"))
    del message["properties"]["quantity"]
    assert registry.validate(message) is None
    assert message["properties"]["quantity"] == 1


def test_schema_version_selects_the_newest_version_not_above_it() -> None:
    registry = SchemaRegistry.load()
    v1 = registry.schema("Product Viewed", 1)
    v2 = copy.deepcopy(v1)
    v2["properties"]["properties"]["properties"]["variant"] = {"type": "string"}
    registry.register("Product Viewed", 2, v2)
    assert registry.versions()["Product Viewed"] == (1, 2)
    message = copy.deepcopy(v1["examples"][0])
    message["properties"]["variant"] = 5
    assert registry.validate(message) is None
    for asked in (2, 3):
        message["context"]["schemaVersion"] = asked
        assert problem_of(registry, message).schema_path == "properties.variant"


def test_registering_the_same_schema_twice_is_a_no_op(registry: SchemaRegistry) -> None:
    schema = registry.schema("Signed Up", 1)
    registry.register("Signed Up", 1, schema)
    changed = copy.deepcopy(schema)
    changed["description"] = "another"
    with pytest.raises(SchemaError, match="already registered"):
        registry.register("Signed Up", 1, changed)


def _props(**fields: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"properties": {"type": "object", **fields}}}


BASE = _props(
    required=["product_id"],
    properties={
        "product_id": {"type": "string", "maxLength": 200},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "size": {"type": "string"},
        "color": {"enum": ["red", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 0},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"quantity": {"type": "integer", "minimum": 1}},
            },
        },
    },
)


def _changed(**edits: Any) -> dict[str, Any]:
    """BASE with ``properties.properties`` keywords or fields replaced."""
    new = copy.deepcopy(BASE)
    inner = new["properties"]["properties"]
    for key, value in edits.items():
        if key in inner["properties"]:
            inner["properties"][key] = value
        else:
            inner[key] = value
    return new


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (
            _changed(required=["product_id", "price"]),
            "properties.price: newly required without a default",
        ),
        (
            _changed(price={"type": "integer", "minimum": 0, "maximum": 1000}),
            "properties.price: type narrowed from number to integer",
        ),
        (
            _changed(size={"type": "string", "enum": ["S", "M", "L"]}),
            "properties.size: values restricted to enum",
        ),
        (_changed(color={"enum": ["red"]}), "properties.color: enum values removed: ['blue']"),
        (
            _changed(product_id={"type": "string", "maxLength": 100}),
            "properties.product_id: maxLength lowered from 200 to 100",
        ),
        (
            _changed(price={"type": "number", "minimum": 0, "maximum": 500}),
            "properties.price: maximum lowered from 1000 to 500",
        ),
        (
            _changed(price={"type": "number", "minimum": 1, "maximum": 1000}),
            "properties.price: minimum raised from 0 to 1",
        ),
        (
            _changed(product_id={"type": "string", "maxLength": 200, "minLength": 3}),
            "properties.product_id: minLength 3 added",
        ),
        (
            _changed(tags={"type": "array", "items": {"type": "string"}, "minItems": 1}),
            "properties.tags: minItems raised from 0 to 1",
        ),
        (
            _changed(
                items={
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"quantity": {"type": "integer", "minimum": 2}},
                    },
                }
            ),
            "properties.items[].quantity: minimum raised from 1 to 2",
        ),
        (
            _changed(size={"type": "string", "pattern": "^[A-Z]+$"}),
            "properties.size: pattern added",
        ),
        (_changed(additionalProperties=False), "properties: additionalProperties changed to false"),
    ],
)
def test_incompatible_versions_are_refused(new: dict[str, Any], message: str) -> None:
    registry = SchemaRegistry.load()
    registry.register("Try On", 1, BASE)
    with pytest.raises(IncompatibleSchemaError) as caught:
        registry.register("Try On", 2, new)
    assert "'Try On' v2 is not backward compatible with v1" in str(caught.value)
    assert message in str(caught.value)
    assert registry.versions()["Try On"] == (1,)


def test_removed_property_with_closed_object_is_refused() -> None:
    closed = _changed(additionalProperties=False)
    new = copy.deepcopy(closed)
    del new["properties"]["properties"]["properties"]["size"]
    assert backward_incompatibilities(closed, new) == [
        "properties.size: property removed while additionalProperties is false"
    ]


@pytest.mark.parametrize(
    "new",
    [
        _changed(
            properties={
                **BASE["properties"]["properties"]["properties"],
                "variant": {"type": "string"},
            }
        ),
        _changed(required=[]),
        _changed(price={"type": "number"}),
        _changed(price={"type": ["number", "string"], "minimum": 0, "maximum": 1000}),
        _changed(product_id={"type": "string", "maxLength": 500}),
        _changed(color={"enum": ["red", "blue", "green"]}),
        _changed(size={}),
        _changed(
            required=["product_id", "currency"],
            properties={
                **BASE["properties"]["properties"]["properties"],
                "currency": {"type": "string", "default": "EUR"},
            },
        ),
        _changed(description="documentation only"),
    ],
)
def test_compatible_versions_are_accepted(new: dict[str, Any]) -> None:
    assert backward_incompatibilities(BASE, new) == []
    registry = SchemaRegistry.load()
    registry.register("Try On", 1, BASE)
    registry.register("Try On", 2, new)
    assert registry.versions()["Try On"] == (1, 2)


def test_integer_to_number_is_widening() -> None:
    old = {"type": "integer"}
    assert backward_incompatibilities(old, {"type": "number"}) == []
    assert backward_incompatibilities({"type": "number"}, old) == [
        "$: type narrowed from number to integer (no longer accepts number)"
    ]


def test_unknown_keywords_are_refused_conservatively() -> None:
    new = _changed(oneOf=[{"required": ["a"]}, {"required": ["b"]}])
    problems = backward_incompatibilities(BASE, new)
    assert problems == [
        "properties: keyword 'oneOf' added or changed; cannot prove backward compatibility"
    ]


def test_versions_only_grow() -> None:
    registry = SchemaRegistry.load()
    with pytest.raises(SchemaError, match="positive integer"):
        registry.register("Product Viewed", 0, {})
    registry.register("Try On", 3, BASE)
    with pytest.raises(SchemaError, match="older than the registered v3"):
        registry.register("Try On", 2, BASE)


def _copy_schemas(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    for path in SCHEMA_DIR.rglob("*.json"):
        dest = target / path.relative_to(SCHEMA_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    return target


def test_load_from_a_copy_of_the_packaged_schemas(tmp_path: Path) -> None:
    assert (
        SchemaRegistry.load(_copy_schemas(tmp_path)).versions() == SchemaRegistry.load().versions()
    )


def test_packaged_schemas_pass_the_meta_schema_that_processes_skip() -> None:
    """The processor loads the packaged schemas unchecked (a second of imports saved): so here."""
    assert SchemaRegistry.load(check=True).versions() == default_registry().versions()


def test_collector_and_api_import_neither_jsonschema_nor_bigquery() -> None:
    """They validate with the packaged schemas; those imports took 1.5 of their 2.4 s start-up."""
    code = (
        "import sys; import pipeline.collector.app, pipeline.api.app; from pipeline.schemas import "
        "default_registry; default_registry(); "
        "print(sorted(m for m in ('jsonschema', 'google.cloud.bigquery') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("relative", "content", "words"),
    [
        ("track/broken.v1.json", "{not json", "cannot read schema"),
        ("track/list.v1.json", "[]", "must be a JSON object"),
        ("track/bad_type.v1.json", '{"title": "Bad Type", "type": 5}', "not a valid JSON Schema"),
        ("track/mismatch.v1.json", '{"title": "Something Else"}', "does not match title"),
        ("track/untitled.v1.json", "{}", "needs a title"),
        ("track/page.v1.json", '{"title": "page"}', "reserved"),
        ("track/Product Viewed.json", "{}", "named <name>.v<N>.json"),
        ("stray.v1.json", "{}", "unexpected schema file"),
        (
            "track/product_viewed.v2.json",
            '{"title": "Product Viewed", "properties": {"properties": {"required": ["sku"]}}}',
            "properties.sku: newly required without a default",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_file(
    tmp_path: Path, relative: str, content: str, words: str
) -> None:
    root = _copy_schemas(tmp_path)
    (root / relative).write_text(content)
    with pytest.raises(SchemaError) as caught:
        SchemaRegistry.load(root)
    assert str(root / relative) in str(caught.value)
    assert words in str(caught.value)


def test_missing_envelope_or_directory(tmp_path: Path) -> None:
    root = _copy_schemas(tmp_path)
    (root / "envelope.v1.json").unlink()
    with pytest.raises(SchemaError, match="no envelope"):
        SchemaRegistry.load(root)
    with pytest.raises(SchemaError, match="does not exist"):
        SchemaRegistry.load(tmp_path / "nowhere")
