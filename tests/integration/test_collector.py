"""The collector as clients meet it: a real uvicorn server, a real broker, real HTTP clients."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from collector_helpers import (
    ALLOWED_ORIGIN,
    KEYS,
    all_raw_ids,
    collector_settings,
    read_raw,
    read_raw_matching,
    running_collector,
)
from segment.analytics import Client as SegmentClient

from pipeline.broker import EmbeddedBroker, ensure_topics
from pipeline.events import iso_to_ms
from pipeline.settings import Settings

pytestmark = pytest.mark.integration

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)


@dataclass
class Collector:
    settings: Settings
    address: str
    url: str

    def client(self, key: str | None = KEYS["storefront"]) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(key, "") if key else None, timeout=30)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker.start() as b:
        yield b


@pytest.fixture(scope="module")
def collector(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Collector]:
    settings = collector_settings(tmp_path_factory.mktemp("collector") / "home")
    ensure_topics(settings, broker.address)
    with running_collector(settings, broker.address) as url:
        yield Collector(settings, broker.address, url)


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(kind: str = "track", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": kind,
        "messageId": f"m-{uuid.uuid4()}",
        "anonymousId": f"a-{uuid.uuid4()}",
        "timestamp": _iso(datetime.now(UTC)),
        "context": {"library": {"name": "test", "version": "1"}},
    }
    if kind == "track":
        event["event"] = "Product Viewed"
        event["properties"] = {"product_id": "P00001"}
    event.update(fields)
    return event


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["success"] is False
    error: dict[str, Any] = body["error"]
    assert error["message"]
    return error


def test_valid_batch_is_acknowledged_then_on_the_raw_topic_enriched(collector: Collector) -> None:
    skewed = datetime.now(UTC) + timedelta(hours=1)  # the device clock runs an hour ahead
    page = _event("page", name="Home", timestamp=_iso(skewed - timedelta(seconds=2)))
    page["context"]["userAgent"] = IPHONE
    track = _event(userId="cus_1", timestamp=_iso(skewed - timedelta(seconds=5)))
    identify = _event("identify", userId="cus_1", traits={"email": "a@b.example"})
    identify.pop("timestamp")
    batch = {"batch": [page, track, identify], "sentAt": _iso(skewed)}
    before = int(time.time() * 1000)
    with collector.client() as http:
        response = http.post("/v1/batch", content=orjson.dumps(batch))
    after = int(time.time() * 1000)
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}

    ids = {e["messageId"] for e in batch["batch"]}
    found = read_raw(collector.settings, collector.address, ids)
    assert found.keys() == ids
    key, got = found[page["messageId"]]
    assert key == page["anonymousId"].encode()
    received = iso_to_ms(got["receivedAt"])
    assert before - 5 <= received <= after + 5
    assert iso_to_ms(got["timestamp"]) == received - 2000
    assert got["originalTimestamp"] == page["timestamp"]
    assert got["context"]["sourceId"] == "storefront"
    assert got["context"]["device"] == {
        "type": "mobile",
        "manufacturer": "Apple",
        "model": "iPhone",
    }
    assert got["context"]["os"]["name"] == "iOS"
    key, got = found[track["messageId"]]
    assert key == track["anonymousId"].encode()  # the device, not the user
    assert iso_to_ms(got["timestamp"]) == iso_to_ms(got["receivedAt"]) - 5000
    assert got["context"]["device"] == {"type": "server"}
    _, got = found[identify["messageId"]]
    assert got["timestamp"] == got["receivedAt"]


@pytest.mark.parametrize("kind", ["track", "identify", "page", "screen", "alias", "group"])
def test_single_event_endpoints_take_the_type_from_the_path(
    collector: Collector, kind: str
) -> None:
    event = _event("track", userId="cus_2", previousId="a-prev", groupId="g1")
    with collector.client(None) as http:
        response = http.post(f"/v1/{kind}", json={**event, "writeKey": KEYS["backend"]})
    assert response.status_code == 200, response.text
    [(key, got)] = read_raw(collector.settings, collector.address, {event["messageId"]}).values()
    assert key == event["anonymousId"].encode()  # keyed by device, whatever the type
    assert got["type"] == kind
    assert got["context"]["sourceId"] == "backend"
    assert "writeKey" not in got


def _big_event() -> dict[str, Any]:
    return _event(properties={"product_id": "P1", "description": "x" * 33_000})


def _gzip_bomb() -> bytes:
    return gzip.compress(b'{"batch": [' + b" " * 20_000_000 + b"]}")


PROTECTION_CASES: list[tuple[str, dict[str, Any], int, str, int | None]] = [
    ("no write key", {"key": None}, 401, "missing_write_key", None),
    ("unknown write key", {"key": "wk_wrong"}, 401, "invalid_write_key", None),
    (
        "unknown write key in body",
        {"key": None, "body_key": "wk_wrong"},
        401,
        "invalid_write_key",
        None,
    ),
    ("invalid JSON", {"raw": b'{"batch": [{"type": "track",'}, 400, "invalid_json", None),
    ("not UTF-8", {"raw": b'{"batch": [{"name": "\xc3\x28\xff"}]}'}, 400, "not_utf8", None),
    ("not an object", {"raw": b"[]"}, 400, "not_an_object", None),
    ("event over 32 KB", {"events": [_event(), _big_event()]}, 400, "event_too_large", 1),
    (
        "batch over 500 KB",
        {"events": [_event() for _ in range(20)], "pad": 520_000},
        413,
        "body_too_large",
        None,
    ),
    ("gzip bomb", {"raw": _gzip_bomb(), "gzip": True}, 413, "body_too_large", None),
    ("corrupt gzip", {"raw": b"\x1f\x8b\x08\x00garbage", "gzip": True}, 400, "bad_gzip", None),
    (
        "no userId or anonymousId",
        {"events": [_event(), _event(anonymousId=None)]},
        400,
        "missing_identity",
        1,
    ),
    (
        "no messageId",
        {"events": [_event(), _event(), _event(messageId="")]},
        400,
        "missing_message_id",
        2,
    ),
    ("unknown type", {"events": [_event(type="purchase")]}, 400, "invalid_type", 0),
    ("batch not an array", {"raw": b'{"batch": {}}'}, 400, "invalid_batch", None),
]


@pytest.mark.parametrize(
    ("case", "status", "code", "index"),
    [(c[1], c[2], c[3], c[4]) for c in PROTECTION_CASES],
    ids=[c[0] for c in PROTECTION_CASES],
)
def test_protection_rule_answers_status_and_named_error_and_produces_nothing(
    collector: Collector, case: dict[str, Any], status: int, code: str, index: int | None
) -> None:
    events = [dict(e) for e in case.get("events", [_event()])]
    body: dict[str, Any] = {"batch": events}
    if "body_key" in case:
        body["writeKey"] = case["body_key"]
    if "pad" in case:
        body["padding"] = "p" * case["pad"]
    content = case.get("raw", orjson.dumps(body))
    headers = {"Content-Encoding": "gzip"} if case.get("gzip") else {}
    with collector.client(case.get("key", KEYS["storefront"])) as http:
        response = http.post("/v1/batch", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code
    assert error.get("index") == index
    assert KEYS["storefront"] not in response.text
    if "raw" not in case:
        ids = {e["messageId"] for e in events if e.get("messageId")}
        assert read_raw(collector.settings, collector.address, ids, timeout_s=1.0) == {}


def test_gzip_body_is_accepted(collector: Collector) -> None:
    event = _event()
    with collector.client() as http:
        response = http.post(
            "/v1/batch",
            content=gzip.compress(orjson.dumps({"batch": [event]})),
            headers={"Content-Encoding": "gzip"},
        )
    assert response.status_code == 200, response.text
    assert read_raw(collector.settings, collector.address, {event["messageId"]})


def test_cors_allows_listed_origins_only(collector: Collector) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with collector.client(None) as http:
        allowed = http.options("/v1/batch", headers={"Origin": ALLOWED_ORIGIN, **preflight})
        denied = http.options("/v1/batch", headers={"Origin": "http://evil.test", **preflight})
        simple = http.post(
            "/v1/track",
            content=orjson.dumps({**_event(), "writeKey": KEYS["storefront"]}),
            headers={"Origin": ALLOWED_ORIGIN, "Content-Type": "text/plain"},
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert denied.status_code == 400
    assert "access-control-allow-origin" not in denied.headers
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_health_reports_the_broker(collector: Collector) -> None:
    with collector.client(None) as http:
        response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["broker"] is True


def test_segment_python_sdk_sends_through_the_collector(collector: Collector) -> None:
    errors: list[Any] = []
    sdk = SegmentClient(
        KEYS["backend"],
        host=collector.url,
        sync_mode=True,
        gzip=True,
        on_error=lambda e, batch: errors.append(e),
    )
    user = f"cus_sdk_{uuid.uuid4().hex[:8]}"
    sdk.identify(user, {"email": f"{user}@example.com"}, anonymous_id="a-sdk-1")
    sdk.track(
        user,
        "Order Completed",
        {
            "order_id": "o-1",
            "revenue": 72.99,
            "currency": "EUR",
            "products": [{"product_id": "P00001", "quantity": 1, "price": 72.99}],
        },
    )
    sdk.page(user, name="Checkout")
    sdk.alias("a-sdk-1", user)
    assert errors == []
    found = read_raw_matching(
        collector.settings, collector.address, lambda p: p.get("userId") == user, expect=4
    )
    assert sorted(p["type"] for p in found) == ["alias", "identify", "page", "track"]
    for payload in found:
        assert payload["context"]["library"]["name"] == "analytics-python"
        assert payload["context"]["sourceId"] == "backend"
        assert payload["originalTimestamp"]
        assert abs(iso_to_ms(payload["timestamp"]) - iso_to_ms(payload["receivedAt"])) < 5000


def test_flood_gets_429_with_retry_after_and_no_crash(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = collector_settings(
        tmp_path / "home", rate_limit_events_per_s=50.0, rate_limit_burst=100
    )
    ensure_topics(settings, broker.address)
    statuses: list[int] = []
    sent: dict[str, list[str]] = {"ok": [], "limited": []}
    with (
        running_collector(settings, broker.address) as url,
        httpx.Client(base_url=url, auth=(KEYS["storefront"], "")) as http,
    ):
        for _ in range(60):
            events = [_event() for _ in range(10)]
            response = http.post("/v1/batch", content=orjson.dumps({"batch": events}))
            statuses.append(response.status_code)
            ids = [e["messageId"] for e in events]
            if response.status_code == 200:
                sent["ok"] += ids
            else:
                assert response.status_code == 429
                assert _error(response)["code"] == "rate_limited"
                assert int(response.headers["Retry-After"]) >= 1
                sent["limited"] += ids
        other = http.post(
            "/v1/batch",
            content=orjson.dumps({"batch": [_event()]}),
            auth=(KEYS["backend"], ""),
        )
        health = http.get("/health")
    assert statuses.count(200) >= 10
    assert statuses.count(429) >= 30
    assert other.status_code == 200, "a flood from one key does not limit another"
    assert health.status_code == 200
    on_topic = set(all_raw_ids(settings, broker.address))
    assert set(sent["ok"]) <= on_topic
    assert not set(sent["limited"]) & on_topic


def test_broker_down_answers_503_with_retry_after(tmp_path: Path) -> None:
    settings = collector_settings(tmp_path / "home", ack_timeout_s=1.5, health_timeout_s=1.0)
    own = EmbeddedBroker.start()
    try:
        ensure_topics(settings, own.address)
        with (
            running_collector(settings, own.address) as url,
            httpx.Client(base_url=url, auth=(KEYS["storefront"], ""), timeout=30) as http,
        ):
            first = http.post("/v1/batch", content=orjson.dumps({"batch": [_event()]}))
            assert first.status_code == 200
            own.stop()
            started = time.monotonic()
            down = http.post("/v1/batch", content=orjson.dumps({"batch": [_event()]}))
            waited = time.monotonic() - started
            health = http.get("/health")
            alive = http.get("/livez")
        assert down.status_code == 503, down.text
        assert _error(down)["code"] in ("delivery_timeout", "delivery_failed", "queue_full")
        assert down.headers["Retry-After"] == str(settings.collector.retry_after_s)
        assert waited < settings.collector.ack_timeout_s + 3
        assert health.status_code == 503
        assert health.json()["broker"] is False
        # not ready, but alive: a restart would not bring the broker back
        assert alive.status_code == 200 and alive.json() == {"status": "alive"}
    finally:
        own.stop()


def test_pipeline_collect_command_serves_until_terminated(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = collector_settings(tmp_path / "home")
    port = settings.collector.port
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env |= {
        "PIPELINE_BROKER": broker.address,
        "PIPELINE_COLLECTOR__WRITE_KEYS": json.dumps({"backend": KEYS["backend"]}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "collect", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.1)
        event = _event()
        response = httpx.post(f"{url}/v1/track", json=event, auth=(KEYS["backend"], ""))
        assert response.status_code == 200, response.text
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert KEYS["backend"].encode() not in output
    assert read_raw(settings, broker.address, {event["messageId"]})
