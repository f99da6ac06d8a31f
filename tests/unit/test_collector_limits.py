"""Pure parts of the collector: token bucket, body limits, write keys, enrichment, intake."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from pipeline.collector.auth import WriteKeys, write_key_from_authorization
from pipeline.collector.enrich import (
    corrected_timestamp_ms,
    device_from_user_agent,
    enrich_context,
    enrich_times,
)
from pipeline.collector.errors import RequestRejected
from pipeline.collector.intake import events_of, identity_key, parse_body, prepare_messages
from pipeline.collector.limits import RateLimiter, TokenBucket, gunzip, read_body
from pipeline.events import iso_to_ms


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=20, clock=clock)
    assert bucket.take(20) == 0.0
    assert bucket.take(5) == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take(5) == 0.0
    assert bucket.take(1) == pytest.approx(0.1)


def test_token_bucket_lets_an_oversized_request_pass_full_and_charges_all_of_it() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=20, clock=clock)
    assert bucket.take(500) == 0.0  # from a full bucket: it can pass
    # but it cost 500 events: the next one waits until they are paid at 10/s
    assert bucket.take(1) == pytest.approx(48.1)
    clock.now += 48.2
    assert bucket.take(1) == 0.0


def test_rate_limiter_is_per_source_and_says_when_to_retry() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=4, clock=clock)
    limiter.check("storefront", 4)
    limiter.check("backend", 4)
    with pytest.raises(RequestRejected) as info:
        limiter.check("storefront", 3)
    assert info.value.status == 429
    assert info.value.code == "rate_limited"
    assert info.value.retry_after_s == 2


def _basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (_basic("wk_1"), "wk_1"),
        (_basic("wk_1", "ignored"), "wk_1"),
        ("basic " + base64.b64encode(b"wk_2:").decode(), "wk_2"),
        (_basic(""), None),
        ("Bearer wk_1", None),
        ("Basic !!!not-base64", None),
        (None, None),
        ("", None),
    ],
)
def test_write_key_from_authorization(header: str | None, key: str | None) -> None:
    assert write_key_from_authorization(header) == key


def test_write_keys_resolve_sources_and_refuse_unknown_or_missing() -> None:
    keys = WriteKeys({"storefront": SecretStr("wk_a"), "backend": SecretStr("wk_b")})
    assert keys.source_for("wk_b") == "backend"
    with pytest.raises(RequestRejected) as missing:
        keys.source_for(None)
    assert (missing.value.status, missing.value.code) == (401, "missing_write_key")
    with pytest.raises(RequestRejected) as bad:
        keys.source_for("wk_c")
    assert (bad.value.status, bad.value.code) == (401, "invalid_write_key")
    assert "wk_" not in bad.value.message


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _read(body: bytes, *, encoding: str | None = None, limit: int = 1000) -> bytes:
    return asyncio.run(
        read_body(
            _chunks(body[: len(body) // 2], body[len(body) // 2 :]),
            content_length=None,
            content_encoding=encoding,
            limit=limit,
        )
    )


def test_read_body_limits_plain_and_declared_sizes() -> None:
    assert _read(b"x" * 1000) == b"x" * 1000
    with pytest.raises(RequestRejected) as info:
        _read(b"x" * 1001)
    assert (info.value.status, info.value.code) == (413, "body_too_large")
    with pytest.raises(RequestRejected):
        asyncio.run(
            read_body(_chunks(b""), content_length="5000", content_encoding=None, limit=1000)
        )


def test_gzip_bodies_are_decompressed_and_zip_bombs_refused() -> None:
    assert _read(gzip.compress(b"a" * 900), encoding="gzip") == b"a" * 900
    bomb = gzip.compress(b"\0" * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(RequestRejected) as info:
        _read(bomb, encoding="gzip", limit=100_000)
    assert (info.value.status, info.value.code) == (413, "body_too_large")
    with pytest.raises(RequestRejected) as corrupt:
        gunzip(b"\x1f\x8b not gzip at all", 1000)
    assert corrupt.value.code == "bad_gzip"
    with pytest.raises(RequestRejected) as truncated:
        gunzip(gzip.compress(b"abc" * 100)[:-10], 1000)
    assert truncated.value.code == "bad_gzip"
    with pytest.raises(RequestRejected) as unknown:
        _read(b"x", encoding="br")
    assert (unknown.value.status, unknown.value.code) == (415, "unsupported_encoding")


def test_every_gzip_member_is_read_and_trailing_bytes_refused() -> None:
    body = b'{"batch": [{"a": 1}, {"b": 2}]}'
    members = gzip.compress(body[:12]) + gzip.compress(body[12:])
    assert gzip.decompress(members) == body  # what RFC 1952 and Python read
    assert _read(members, encoding="gzip") == body
    with pytest.raises(RequestRejected) as garbage:
        gunzip(gzip.compress(body) + b"TRAILING GARBAGE", 1000)
    assert (garbage.value.status, garbage.value.code) == (400, "bad_gzip")
    with pytest.raises(RequestRejected) as over:  # the limit holds over all members together
        gunzip(gzip.compress(b"a" * 600) + gzip.compress(b"b" * 600), 1000)
    assert (over.value.status, over.value.code) == (413, "body_too_large")


def test_skew_correction_keeps_the_time_between_event_and_send() -> None:
    assert corrected_timestamp_ms(1_000, 1_500, 10_000) == 9_500


def test_enrich_times_corrects_skew_and_keeps_original() -> None:
    event: dict[str, Any] = {
        "timestamp": "2026-01-01T10:00:00.000Z",
        "sentAt": "2026-01-01T10:00:02.000Z",
    }
    received = iso_to_ms("2026-01-01T09:00:05.000Z")
    enrich_times(event, received_ms=received, batch_sent_at=None)
    assert event["receivedAt"] == "2026-01-01T09:00:05.000Z"
    assert event["timestamp"] == "2026-01-01T09:00:03.000Z"
    assert event["originalTimestamp"] == "2026-01-01T10:00:00.000Z"


def test_enrich_times_uses_batch_sent_at_and_fills_missing_timestamp() -> None:
    received = iso_to_ms("2026-01-01T09:00:05.000Z")
    event: dict[str, Any] = {"timestamp": "2026-01-01T09:00:00+00:00"}
    enrich_times(event, received_ms=received, batch_sent_at="2026-01-01T09:00:01Z")
    assert event["timestamp"] == "2026-01-01T09:00:04.000Z"
    assert event["sentAt"] == "2026-01-01T09:00:01Z"
    bare: dict[str, Any] = {}
    enrich_times(bare, received_ms=received, batch_sent_at=None)
    assert bare["timestamp"] == bare["receivedAt"] == "2026-01-01T09:00:05.000Z"


@pytest.mark.parametrize(
    "event",
    [
        {"timestamp": "2026-01-01T10:00:00Z"},
        {"timestamp": "yesterday", "sentAt": "2026-01-01T10:00:00Z"},
        {"timestamp": "2026-01-01T10:00:00", "sentAt": "2026-01-01T10:00:00Z"},
        {"timestamp": "2026-01-01T10:00:00Z", "sentAt": 17},
    ],
)
def test_enrich_times_leaves_timestamp_without_a_usable_sent_at(event: dict[str, Any]) -> None:
    before = event["timestamp"]
    enrich_times(event, received_ms=0, batch_sent_at=None)
    assert event["timestamp"] == before
    assert "originalTimestamp" not in event


@pytest.mark.parametrize(
    ("user_agent", "kind"),
    [
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
            "mobile",
        ),
        ("Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15", "tablet"),
        (
            "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/124.0 Safari/537.36",
            "tablet",
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/125.0 Mobile Safari/537.36",
            "mobile",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
            "desktop",
        ),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "other"),
    ],
)
def test_device_type_from_user_agent(user_agent: str, kind: str) -> None:
    assert dict(device_from_user_agent(user_agent))["device.type"] == kind


def test_only_the_head_of_a_padded_user_agent_is_parsed_and_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collector parses before it knows an event is too large: a user agent padded to
    half a megabyte must cost ua-parser's regexes and the cache no more than a real one."""
    import pipeline.collector.enrich as enrich

    parsed: list[int] = []
    real_parse = enrich.ua_parser.parse

    def recorded(user_agent: str) -> Any:
        parsed.append(len(user_agent))
        return real_parse(user_agent)

    monkeypatch.setattr(enrich.ua_parser, "parse", recorded)
    enrich.device_from_user_agent.cache_clear()
    phone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148"
    context: dict[str, Any] = {"userAgent": phone + " " + "x" * 500_000}
    enrich_context(context, source_id="web")
    assert parsed == [enrich.MAX_PARSED_USER_AGENT]
    assert context["device"]["type"] == "mobile"
    assert len(context["userAgent"]) == len(phone) + 500_001  # forwarded as sent
    enrich.device_from_user_agent.cache_clear()


def test_enrich_context_adds_parsed_fields_but_keeps_the_clients() -> None:
    context: dict[str, Any] = {
        "device": {"type": "tablet"},
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148",
    }
    enrich_context(context, source_id="storefront")
    assert context["sourceId"] == "storefront"
    assert context["device"] == {"type": "tablet", "manufacturer": "Apple", "model": "iPhone"}
    assert context["os"] == {"name": "iOS", "version": "17.5"}
    server: dict[str, Any] = {}
    enrich_context(server, source_id="backend")
    assert server == {"sourceId": "backend", "device": {"type": "server"}}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"batch": [', "invalid_json"),
        (b'{"name": "\xc3\x28"}', "not_utf8"),
        (b"[1, 2]", "not_an_object"),
        # orjson would read these as floats, losing digits
        (b'{"properties": {"n": 123456789012345678901234567890}}', "number_out_of_range"),
        (b'{"properties": {"n": -9223372036854775809}}', "number_out_of_range"),
    ],
)
def test_parse_body_names_the_problem(body: bytes, code: str) -> None:
    with pytest.raises(RequestRejected) as info:
        parse_body(body)
    assert (info.value.status, info.value.code) == (400, code)


def test_identity_key_is_the_device_anonymous_id_then_alias_previous_id_then_user_id() -> None:
    assert identity_key({"userId": "u1", "anonymousId": "a1"}) == "a1"
    assert identity_key({"type": "alias", "userId": "u1", "previousId": "p1"}) == "p1"
    assert identity_key({"userId": "u1"}) == "u1"
    assert identity_key({"userId": "", "anonymousId": "a1"}) == "a1"
    assert identity_key({"userId": 42}) == "42"
    assert identity_key({"type": "alias", "previousId": "p1"}) == "p1"
    assert identity_key({"type": "track", "previousId": "p1"}) is None


def _event(**extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Product Viewed", "messageId": "m1", "userId": "u1", **extra}


def _prepare(events: list[Any], endpoint_type: str | None = None, limit: int = 32768) -> Any:
    return prepare_messages(
        events,
        endpoint_type=endpoint_type,
        source_id="backend",
        received_ms=iso_to_ms("2026-01-01T09:00:00Z"),
        batch_sent_at=None,
        max_event_bytes=limit,
    )


def test_prepare_messages_keys_enriches_and_drops_the_write_key() -> None:
    [(key, value)] = _prepare([_event(writeKey="wk_secret")])
    assert key == b"u1"
    produced = orjson.loads(value)
    assert "writeKey" not in produced
    assert produced["context"]["sourceId"] == "backend"
    assert produced["receivedAt"] == "2026-01-01T09:00:00.000Z"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("not an object", "invalid_event"),
        ({**_event(), "type": "purchase"}, "invalid_type"),
        ({**_event(), "messageId": ""}, "missing_message_id"),
        ({k: v for k, v in _event().items() if k != "messageId"}, "missing_message_id"),
        ({**_event(), "userId": None}, "missing_identity"),
        ({**_event(), "userId": "anon:d1"}, "reserved_user_id"),
        ({**_event(), "context": []}, "invalid_context"),
        ({**_event(), "properties": {"blob": "x" * 2000}}, "event_too_large"),
    ],
)
def test_prepare_messages_refuses_a_batch_naming_the_bad_events_index(bad: Any, code: str) -> None:
    with pytest.raises(RequestRejected) as info:
        _prepare([_event(), bad], limit=1024)
    assert (info.value.status, info.value.code, info.value.index) == (400, code, 1)
    assert "event 1" in info.value.message


def test_single_event_endpoints_set_the_type() -> None:
    [(_, value)] = _prepare([_event(type="page")], endpoint_type="identify")
    assert orjson.loads(value)["type"] == "identify"
    with pytest.raises(RequestRejected) as info:
        _prepare([{**_event(), "userId": None}], endpoint_type="track")
    assert info.value.index is None
    assert info.value.message.startswith("the event")


def test_events_of_requires_a_batch_array() -> None:
    assert events_of({"batch": [], "sentAt": "x"}, None) == ([], "x")
    with pytest.raises(RequestRejected) as info:
        events_of({"batch": {}}, None)
    assert info.value.code == "invalid_batch"
    # a batch-level sentAt that is not a string would spoil every event it is copied into
    with pytest.raises(RequestRejected) as sent_at:
        events_of({"batch": [{"type": "track"}], "sentAt": {"t": 1}}, None)
    assert (sent_at.value.status, sent_at.value.code) == (400, "invalid_batch")
    assert "sentAt" in str(sent_at.value.body())


def test_integers_in_64_bits_and_long_digit_strings_are_kept_exactly() -> None:
    body = (
        b'{"n": 18446744073709551615, "m": -9223372036854775808, "id": "12345678901234567890123"}'
    )
    assert parse_body(body) == {
        "n": 18446744073709551615,
        "m": -9223372036854775808,
        "id": "12345678901234567890123",
    }
