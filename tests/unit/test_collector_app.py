"""The collector app with the in-memory publisher: routing, responses, 503 mapping, lifecycle."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from pipeline.collector.app import create_app
from pipeline.collector.config import CollectorSettings
from pipeline.collector.publish import KafkaPublisher, MemoryPublisher
from pipeline.settings import Settings

KEY = "wk_unit"


def _settings(**collector: Any) -> Settings:
    return Settings(collector=CollectorSettings(write_keys={"web": SecretStr(KEY)}, **collector))


def _event(**extra: object) -> dict[str, object]:
    return {"type": "track", "event": "Signed Up", "messageId": "m1", "userId": "u1", **extra}


def test_accepted_batch_is_published_with_key_and_received_at() -> None:
    publisher = MemoryPublisher()
    app = create_app(_settings(), lambda: publisher, clock_ms=lambda: 1_767_225_600_000)
    with TestClient(app) as http:
        response = http.post("/v1/batch", json={"batch": [_event()]}, auth=(KEY, ""))
    assert response.status_code == 200
    assert response.json() == {"success": True}
    [(topic, key, value)] = publisher.sent
    assert (topic, key) == ("events.raw", b"u1")
    assert orjson.loads(value)["receivedAt"] == "2026-01-01T00:00:00.000Z"
    assert publisher.closed


def test_unavailable_broker_is_503_with_retry_after() -> None:
    publisher = MemoryPublisher(available=False)
    app = create_app(_settings(retry_after_s=7), lambda: publisher)
    with TestClient(app) as http:
        response = http.post("/v1/track", json=_event(), auth=(KEY, ""))
        health = http.get("/health")
        alive = http.get("/livez")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.json()["error"]["code"] == "delivery_timeout"
    assert health.status_code == 503
    assert alive.status_code == 200  # not ready, but a restart would not mend the broker


def test_livez_is_503_once_the_delivery_report_thread_is_dead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class FailingPoll:
        """A producer whose poll fails: the thread that serves acknowledgements dies."""

        def poll(self, timeout: float) -> int:
            raise RuntimeError("poll failed")

        def flush(self, timeout: float) -> int:
            return 0

    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    publisher = KafkaPublisher(FailingPoll(), ack_timeout_s=1)  # type: ignore[arg-type]
    publisher._poller.join(5)
    with TestClient(create_app(_settings(), lambda: publisher)) as http:
        alive = http.get("/livez")
    assert alive.status_code == 503 and alive.json() == {"status": "dead"}
    assert len(died) == 1


def test_empty_batch_is_a_success_without_messages() -> None:
    publisher = MemoryPublisher()
    with TestClient(create_app(_settings(), lambda: publisher)) as http:
        response = http.post("/v1/batch", json={"batch": [], "writeKey": KEY})
    assert response.status_code == 200
    assert publisher.sent == []


def _rate_limited(burst: int) -> tuple[Any, MemoryPublisher, list[float]]:
    """A collector allowing 1 event/s in bursts of ``burst``, on a clock the test moves."""
    now = [0.0]
    publisher = MemoryPublisher()
    app = create_app(
        _settings(rate_limit_events_per_s=1.0, rate_limit_burst=burst),
        lambda: publisher,
        rate_clock=lambda: now[0],
    )
    return app, publisher, now


def test_rate_limit_uses_the_injected_clock() -> None:
    app, _, now = _rate_limited(burst=2)
    with TestClient(app) as http:
        body = {"batch": [_event(), _event(messageId="m2")]}
        assert http.post("/v1/batch", json=body, auth=(KEY, "")).status_code == 200
        limited = http.post("/v1/batch", json=body, auth=(KEY, ""))
        now[0] += 2.0
        again = http.post("/v1/batch", json=body, auth=(KEY, ""))
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert again.status_code == 200


def test_events_refused_after_the_rate_limit_charged_them_are_given_back() -> None:
    """A batch refused for one bad event, or for a broker that is down, is not accepted: the
    corrected batch, or the retry a 503 asks for, must not meet a bucket spent on it."""
    app, publisher, now = _rate_limited(burst=10)
    batch = [_event(messageId=f"m{i}") for i in range(10)]
    with TestClient(app) as http:
        bad = http.post(
            "/v1/batch", json={"batch": [*batch[:9], _event(messageId="")]}, auth=(KEY, "")
        )
        fixed = http.post("/v1/batch", json={"batch": batch}, auth=(KEY, ""))
        now[0] += 10.0  # the bucket is full again after the fixed batch
        publisher.available = False
        down = http.post("/v1/batch", json={"batch": batch}, auth=(KEY, ""))
        publisher.available = True
        retried = http.post("/v1/batch", json={"batch": batch}, auth=(KEY, ""))
        spent = http.post("/v1/track", json=_event(messageId="m11"), auth=(KEY, ""))
    assert [r.status_code for r in (bad, fixed)] == [400, 200]
    assert (down.status_code, retried.status_code) == (503, 200)
    assert spent.status_code == 429  # what was accepted is still charged
    assert len(publisher.sent) == 20


def test_a_malformed_origin_or_authorization_header_is_refused_not_a_500() -> None:
    publisher = MemoryPublisher()
    app = create_app(_settings(cors_origins=("https://shop.example",)), lambda: publisher)
    with TestClient(app, raise_server_exceptions=False) as http:
        origin = http.post(
            "/v1/track", json=_event(), auth=(KEY, ""), headers={"Origin": "http://[::1"}
        )
        basic = http.post("/v1/track", json=_event(), headers={"Authorization": b"Basic \xe9t\xe9"})
    assert (origin.status_code, origin.json()["error"]["code"]) == (403, "origin_not_allowed")
    assert (basic.status_code, basic.json()["error"]["code"]) == (401, "missing_write_key")
    assert publisher.sent == []


def test_forgotten_customers_events_are_acknowledged_but_never_published(tmp_path: Any) -> None:
    from pipeline.gdpr import suppression_path
    from pipeline.pii import sha256_hex

    settings = Settings(
        home=tmp_path,
        collector=CollectorSettings(write_keys={"web": SecretStr(KEY)}),
    )
    suppression_path(settings).parent.mkdir(parents=True, exist_ok=True)
    suppression_path(settings).write_text(
        orjson.dumps({"ids": [sha256_hex("u_gone")]}).decode() + "\n"
    )
    publisher = MemoryPublisher()
    batch = [_event(userId="u_gone"), _event(messageId="m2", userId="u_kept")]
    with TestClient(create_app(settings, lambda: publisher)) as http:
        response = http.post("/v1/batch", json={"batch": batch}, auth=(KEY, ""))
    assert response.status_code == 200
    assert [key for _, key, _ in publisher.sent] == [b"u_kept"]


def test_non_string_ids_with_a_suppression_list_are_forwarded_not_a_500(tmp_path: Any) -> None:
    """The processor dead-letters them with their schema reason; hashing them raised before."""
    from pipeline.gdpr import suppression_path
    from pipeline.pii import sha256_hex

    settings = Settings(
        home=tmp_path, collector=CollectorSettings(write_keys={"web": SecretStr(KEY)})
    )
    suppression_path(settings).parent.mkdir(parents=True, exist_ok=True)
    suppression_path(settings).write_text(orjson.dumps({"ids": [sha256_hex("x")]}).decode() + "\n")
    publisher = MemoryPublisher()
    batch = [_event(userId=12345), _event(messageId="m2", anonymousId="a1", userId={"x": 1})]
    with TestClient(create_app(settings, lambda: publisher)) as http:
        response = http.post("/v1/batch", json={"batch": batch}, auth=(KEY, ""))
    assert (response.status_code, response.json()) == (200, {"success": True})
    assert len(publisher.sent) == 2


def test_browsers_may_send_only_from_the_allowlist_or_the_collectors_own_origin() -> None:
    publisher = MemoryPublisher()
    app = create_app(_settings(cors_origins=("https://shop.example",)), lambda: publisher)
    body = orjson.dumps({**_event(), "writeKey": KEY})
    plain = {"Content-Type": "text/plain"}  # a "simple" request: browsers send no preflight
    with TestClient(app, base_url="http://collector.test") as http:
        foreign = http.post("/v1/t", content=body, headers={**plain, "Origin": "http://evil.test"})
        listed = http.post(
            "/v1/t", content=body, headers={**plain, "Origin": "https://shop.example"}
        )
        own = http.post("/v1/t", content=body, headers={**plain, "Origin": "http://collector.test"})
        server = http.post("/v1/t", content=body, headers=plain)  # no Origin: not a browser
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "origin_not_allowed"
    assert [r.status_code for r in (listed, own, server)] == [200, 200, 200]
    assert len(publisher.sent) == 3
    anyone = create_app(_settings(cors_origins=("*",)), lambda: publisher)  # CORS's "all"
    with TestClient(anyone) as http:
        response = http.post("/v1/t", content=body, headers={**plain, "Origin": "http://x.test"})
    assert response.status_code == 200


def test_unknown_routes_methods_and_bugs_answer_in_the_collectors_json_shape() -> None:
    publisher = MemoryPublisher()
    app = create_app(_settings(), lambda: publisher)
    with TestClient(app, raise_server_exceptions=False) as http:
        missing = http.post("/v1/nothing", json={}, auth=(KEY, ""))
        method = http.get("/v1/batch")
        publisher.send = None  # type: ignore[assignment,method-assign]  # a bug: not callable
        broken = http.post("/v1/track", json=_event(), auth=(KEY, ""))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert (method.status_code, method.json()["error"]["code"]) == (405, "method_not_allowed")
    assert "POST" in method.headers["Allow"]
    assert (broken.status_code, broken.json()["error"]["code"]) == (500, "internal_error")
    assert all(r.json()["success"] is False for r in (missing, method, broken))


def test_a_client_leaving_mid_body_is_counted_not_logged_as_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A page unloading or a dropped mobile connection ends the body early: routine, so no
    ERROR with a traceback (an operator's alert), and nothing is published."""
    import asyncio

    publisher = MemoryPublisher()
    app = create_app(_settings(), lambda: publisher)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/batch",
        "raw_path": b"/v1/batch",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"collector.test"), (b"authorization", b"Basic d2tfdW5pdDo=")],
        "client": ("127.0.0.1", 50000),
        "server": ("collector.test", 80),
    }
    incoming = [
        {"type": "http.request", "body": b'{"batch": [', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level("INFO"):
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert sent[0]["status"] == 499
    assert publisher.sent == []
    with TestClient(app) as http:
        metrics = http.get("/metrics").text
    assert 'code="client_disconnected",status="499"} 1.0' in metrics
