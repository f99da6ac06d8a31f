"""Delivery against a real local HTTP server playing the email platform.

The platform issues OAuth2 client-credentials tokens, checks them on every send, injects 429
(with Retry-After), 500 and timeouts (before or after it has sent the email) on scripted
attempts, and keeps idempotency keys: a repeated key replays the first answer, never a second
email. Every email must be delivered exactly once, none lost, permanent failures typed.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipeline.delivery.client import DeliveryClient
from pipeline.delivery.config import DeliverySettings
from pipeline.delivery.payload import Delivered, DeliveryFailure, EmailPayload, idempotency_key
from pipeline.delivery.scheduler import DeliveryScheduler, RenderJob, deliver_due

CLIENT_ID = "pipeline-tests"
CLIENT_SECRET = "s3cret-for-tests"
CLIENT_TIMEOUT_S = 0.4


@dataclass
class Platform:
    """State of the fake email platform; ``script[key]`` lists the faults of attempts 1, 2, ..."""

    token_ttl_s: float = 300.0
    script: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    token_requests: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    unauthorized: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()


def _handler(platform: Platform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): exactly what a real network does

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if self.path == "/oauth/token":
                self._token(raw)
            elif self.path == "/v1/send":
                self._send(raw)
            else:
                self._reply(404, b'{"error":"not_found"}')

        def _token(self, raw: bytes) -> None:
            expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            form = dict(p.split("=", 1) for p in raw.decode().split("&") if "=" in p)
            with platform.lock:
                platform.token_requests += 1
                if self.headers.get("Authorization") != f"Basic {expected}":
                    self._reply(401, b'{"error":"invalid_client"}')
                    return
                if form.get("grant_type") != "client_credentials":
                    self._reply(400, b'{"error":"unsupported_grant_type"}')
                    return
                token = f"tok-{next(platform.ids)}"
                platform.tokens[token] = time.monotonic() + platform.token_ttl_s
            body = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": platform.token_ttl_s,
            }
            self._reply(200, json.dumps(body).encode())

        def _send(self, raw: bytes) -> None:
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ")
            key = self.headers.get("Idempotency-Key", "")
            with platform.lock:
                expires = platform.tokens.get(token)
                if expires is None or time.monotonic() >= expires:
                    platform.unauthorized += 1
                    self._reply(401, b'{"error":"invalid_token"}', {"WWW-Authenticate": "Bearer"})
                    return
                platform.attempts[key] += 1
                attempt = platform.attempts[key]
                faults = platform.script.get(key, [])
                fault = faults[attempt - 1] if attempt <= len(faults) else "ok"
            if fault == "429":
                self._reply(429, b'{"error":"slow_down"}', {"Retry-After": "1"})
                return
            if fault == "500":
                self._reply(500, b'{"error":"oops"}')
                return
            if fault == "400":
                self._reply(400, b'{"error":"invalid recipient"}')
                return
            if fault == "timeout-before":
                time.sleep(CLIENT_TIMEOUT_S * 3)  # lost before the platform did anything
                self._reply(503, b'{"error":"late"}')
                return
            payload = json.loads(raw)
            assert payload["idempotency_key"] == key
            with platform.lock:
                if key not in platform.responses:
                    platform.deliveries[key] += 1
                    platform.delivered[key] = payload
                    body = json.dumps({"id": f"msg-{next(platform.ids)}"}).encode()
                    platform.responses[key] = (202, body)
                status, body = platform.responses[key]
            if fault == "timeout-after":
                time.sleep(CLIENT_TIMEOUT_S * 3)  # sent, but the answer never arrives in time
            self._reply(status, body)

    return Handler


@pytest.fixture
def platform() -> Iterator[tuple[Platform, str]]:
    state = Platform()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-platform", daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _config(url: str, **overrides: Any) -> DeliverySettings:
    values: dict[str, Any] = {
        "send_url": f"{url}/v1/send",
        "token_url": f"{url}/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "timeout_s": CLIENT_TIMEOUT_S,
        "max_attempts": 5,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retry_after_s": 5.0,
        **overrides,
    }
    return DeliverySettings(**values)


class SleepRecorder:
    """Records requested waits and sleeps briefly instead (keeps the test fast)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(min(seconds, 0.02))


def _payload(i: int, campaign: str = "spring") -> EmailPayload:
    customer = f"cus_{i:04d}"
    return EmailPayload(
        to=f"{customer}@example.com",
        subject=f"Picks for {customer}",
        html=f"<p>Hello {customer}</p>",
        text=f"Hello {customer}",
        campaign=campaign,
        customer=customer,
        idempotency_key=idempotency_key(campaign, customer, i),
    )


def test_every_email_delivered_exactly_once_despite_faults(
    platform: tuple[Platform, str],
) -> None:
    state, url = platform
    payloads = [_payload(i) for i in range(24)]
    keys = [p.idempotency_key for p in payloads]
    state.script = {
        keys[0]: ["429"],
        keys[1]: ["500", "500"],
        keys[2]: ["timeout-after"],  # the platform sent it; the retry must not send again
        keys[3]: ["timeout-before", "429", "500"],
        keys[4]: ["400"],  # permanent
        keys[5]: ["500"] * 5,  # exhausts max_attempts
        keys[6]: ["timeout-after", "timeout-after"],
    }
    sleep = SleepRecorder()
    with (
        DeliveryClient(_config(url), sleep=sleep) as client,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        outcomes = list(pool.map(client.send, payloads))

    by_key = {o.idempotency_key: o for o in outcomes}
    failures = {k: o for k, o in by_key.items() if isinstance(o, DeliveryFailure)}
    assert set(failures) == {keys[4], keys[5]}
    rejected, exhausted = failures[keys[4]], failures[keys[5]]
    assert (rejected.reason, rejected.status, rejected.attempts) == ("rejected", 400, 1)
    assert (exhausted.reason, exhausted.status, exhausted.attempts) == ("retries_exhausted", 500, 5)
    assert exhausted.payload["to"] == "cus_0005@example.com"
    assert json.dumps(exhausted.to_dict())  # a JSON-safe dead-letter record

    delivered = {k for k, o in by_key.items() if isinstance(o, Delivered)}
    assert delivered == set(keys) - set(failures)  # none lost
    assert set(state.delivered) == delivered
    assert all(state.deliveries[k] == 1 for k in keys if k not in failures)  # exactly once
    assert sum(state.deliveries.values()) == len(delivered)
    for k in delivered:
        assert state.delivered[k]["customer"] == by_key[k].customer

    attempts = {k: by_key[k].attempts for k in [*keys[:4], keys[6]]}
    assert attempts == {keys[0]: 2, keys[1]: 3, keys[2]: 2, keys[3]: 4, keys[6]: 3}
    assert state.attempts[keys[2]] == 2 and state.deliveries[keys[2]] == 1
    assert 1.0 in sleep.waits  # Retry-After: 1 honoured
    assert all(0 <= w <= 1.0 for w in sleep.waits)
    assert state.token_requests == 1  # one token shared by all threads


def test_token_refreshed_before_expiry_and_on_401(platform: tuple[Platform, str]) -> None:
    state, url = platform
    state.token_ttl_s = 1.0
    with DeliveryClient(_config(url, token_refresh_margin_s=0.3), sleep=SleepRecorder()) as client:
        assert isinstance(client.send(_payload(1)), Delivered)
        assert state.token_requests == 1
        time.sleep(0.8)  # past expires_in - margin: refreshed before the platform refuses it
        assert isinstance(client.send(_payload(2)), Delivered)
        assert state.token_requests == 2 and state.unauthorized == 0

        state.revoke_tokens()  # the platform forgets the token early: 401, refresh, resend
        outcome = client.send(_payload(3))
        assert isinstance(outcome, Delivered) and outcome.attempts == 2
        assert state.unauthorized == 1 and state.token_requests == 3
    assert all(n == 1 for n in state.deliveries.values()) and len(state.deliveries) == 3


def test_rejected_client_credentials_are_a_typed_failure(platform: tuple[Platform, str]) -> None:
    state, url = platform
    config = _config(url, client_secret="wrong")
    with DeliveryClient(config, sleep=SleepRecorder()) as client:
        outcome = client.send(_payload(1))
    assert isinstance(outcome, DeliveryFailure)
    assert (outcome.reason, outcome.status) == ("token_rejected", 401)
    assert "wrong" not in outcome.detail and not state.delivered


def test_unreachable_platform_exhausts_retries(platform: tuple[Platform, str]) -> None:
    _, url = platform
    config = _config(url, send_url="http://127.0.0.1:9/v1/send", max_attempts=3)
    sleep = SleepRecorder()
    with DeliveryClient(config, sleep=sleep) as client:
        outcome = client.send(_payload(1))
    assert isinstance(outcome, DeliveryFailure)
    assert (outcome.reason, outcome.attempts, outcome.status) == ("retries_exhausted", 3, None)
    assert len(sleep.waits) == 2


def test_scheduled_emails_go_out_when_due(platform: tuple[Platform, str]) -> None:
    state, url = platform
    scheduler = DeliveryScheduler(
        RenderJob(send_at_ms=1_000 * (i + 1), payload=_payload(i)) for i in range(5)
    )
    scheduler.add(RenderJob(send_at_ms=500, payload=_payload(0)))  # same email: ignored
    sent: defaultdict[int, list[str]] = defaultdict(list)
    with DeliveryClient(_config(url), sleep=SleepRecorder()) as client:
        for now in (500, 2_000, 2_500, 10_000):
            outcomes, failures = deliver_due(scheduler, client, now)
            assert not failures
            sent[now] = [o.customer for o in outcomes]
    assert dict(sent) == {
        500: [],
        2_000: ["cus_0000", "cus_0001"],
        2_500: [],
        10_000: ["cus_0002", "cus_0003", "cus_0004"],
    }
    assert len(state.delivered) == 5 and len(scheduler) == 0
