"""Backoff and jitter bounds, Retry-After, idempotency keys, the scheduler, and the client's
retry and token logic against an in-process transport (injected random, clock and sleep)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.delivery.backoff import (
    backoff_ceiling,
    full_jitter,
    parse_retry_after,
    retry_delay,
)
from pipeline.delivery.client import DeliveryClient, MemoryEmailPlatform
from pipeline.delivery.config import DeliverySettings
from pipeline.delivery.payload import Delivered, DeliveryFailure, EmailPayload, idempotency_key
from pipeline.delivery.scheduler import DeliveryScheduler, RenderJob, deliver_due
from pipeline.errors import ConfigurationError, StoreError


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    assert [backoff_ceiling(n, 0.5, 30.0) for n in range(8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0,
    ]  # fmt: skip
    assert backoff_ceiling(10_000, 0.5, 30.0) == 30.0


@given(
    retry=st.integers(0, 200),
    base=st.floats(0.001, 10),
    cap=st.floats(0.001, 600),
    r=st.floats(0, 1, exclude_max=True),
)
def test_full_jitter_stays_in_zero_to_ceiling(
    retry: int, base: float, cap: float, r: float
) -> None:
    delay = full_jitter(retry, base, cap, lambda: r)
    assert 0 <= delay <= backoff_ceiling(retry, base, cap) <= cap


def test_full_jitter_uses_the_whole_range() -> None:
    assert full_jitter(3, 1.0, 100.0, lambda: 0.0) == 0.0
    assert full_jitter(3, 1.0, 100.0, lambda: 0.5) == 4.0
    assert full_jitter(3, 1.0, 100.0, lambda: 0.999) == pytest.approx(7.992)


def test_retry_after_wins_and_is_capped() -> None:
    kwargs = {"base_s": 1.0, "cap_s": 30.0, "rand": lambda: 0.5}
    assert retry_delay(2, **kwargs) == 2.0  # type: ignore[arg-type]
    assert retry_delay(2, retry_after_s=7.0, **kwargs) == 7.0  # type: ignore[arg-type]
    assert retry_delay(2, retry_after_s=700.0, max_retry_after_s=60.0, **kwargs) == 60.0  # type: ignore[arg-type]


def test_parse_retry_after() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now.timestamp()) == 120.0
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now.timestamp()) == pytest.approx(30.0)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now.timestamp()) == 0.0
    assert parse_retry_after("soon", now.timestamp()) is None
    assert parse_retry_after(None, now.timestamp()) is None


def test_idempotency_key_is_one_per_campaign_customer_and_occurrence() -> None:
    key = idempotency_key("spring", "cus_1")
    assert key == idempotency_key("spring", "cus_1")
    assert key.startswith("pl-") and len(key) == 43
    others = {
        idempotency_key("summer", "cus_1"),
        idempotency_key("spring", "cus_2"),
        idempotency_key("spring\x1fcus_1", ""),
        idempotency_key("spring", "cus_1", "cus_1:cart_abandonment:1700000000000"),
        idempotency_key("spring", "cus_1", "cus_1:cart_abandonment:1700000600000"),
    }
    assert key not in others and len(others) == 5


def _payload(customer: str, occurrence: str = "") -> EmailPayload:
    return EmailPayload(
        to=f"{customer}@example.com",
        subject="s",
        html="<p>h</p>",
        text="t",
        campaign="c",
        customer=customer,
        idempotency_key=idempotency_key("c", customer, occurrence),
    )


def test_scheduler_yields_jobs_when_due_in_time_order() -> None:
    jobs = [
        RenderJob(300, _payload("a")),
        RenderJob(100, _payload("b")),
        RenderJob(300, _payload("c")),
    ]
    scheduler = DeliveryScheduler(jobs)
    assert len(scheduler) == 3 and scheduler.next_due_ms() == 100
    assert scheduler.due(99) == []
    assert [j.payload.customer for j in scheduler.due(100)] == ["b"]
    assert scheduler.next_due_ms() == 300
    assert [j.payload.customer for j in scheduler.due(1_000)] == ["a", "c"]  # ties: insertion
    assert scheduler.next_due_ms() is None and scheduler.due(10**15) == []


def test_scheduler_ignores_a_queued_key_but_accepts_it_after_it_went_out() -> None:
    scheduler = DeliveryScheduler()
    assert scheduler.add(RenderJob(100, _payload("a")))
    assert not scheduler.add(RenderJob(50, _payload("a")))
    assert scheduler.add(RenderJob(50, _payload("a", "a:cart_abandonment:2")))  # a new occurrence
    assert len(scheduler.due(100)) == 2
    assert scheduler.add(RenderJob(200, _payload("a")))


def test_deliver_due_sends_through_any_platform() -> None:
    platform = MemoryEmailPlatform()
    scheduler = DeliveryScheduler([RenderJob(10, _payload("a")), RenderJob(20, _payload("b"))])
    outcomes, failures = deliver_due(scheduler, platform, 15)
    assert [o.customer for o in outcomes] == ["a"] and not failures
    assert list(platform.sent) == [idempotency_key("c", "a")]


def test_deliver_due_drops_what_keep_refuses() -> None:
    platform = MemoryEmailPlatform()
    jobs = [RenderJob(10, _payload("a")), RenderJob(20, _payload("b"))]
    scheduler = DeliveryScheduler(jobs)
    outcomes, _ = deliver_due(
        scheduler, platform, 30, keep=lambda due: [j for j in due if j.payload.customer != "a"]
    )
    assert [o.customer for o in outcomes] == ["b"]
    assert list(platform.sent) == [idempotency_key("c", "b")]
    assert len(scheduler) == 0  # the refused job is gone too, not sent later


def test_deliver_due_queues_the_jobs_again_when_keep_raises() -> None:
    """``keep`` reads the store: a read that fails must not lose the jobs already popped."""
    platform = MemoryEmailPlatform()
    scheduler = DeliveryScheduler([RenderJob(10, _payload("a")), RenderJob(20, _payload("b"))])

    def failing_keep(due: object) -> list[RenderJob]:
        raise StoreError("query failed: database is locked")

    with pytest.raises(StoreError):
        deliver_due(scheduler, platform, 30, keep=failing_keep)
    assert len(scheduler) == 2 and platform.calls == 0
    outcomes, _ = deliver_due(scheduler, platform, 30)
    assert [o.customer for o in outcomes] == ["a", "b"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


CONFIG = DeliverySettings(
    send_url="https://esp.test/v1/send",
    token_url="https://esp.test/oauth/token",
    client_id="id",
    client_secret="secret",
    max_attempts=4,
    backoff_base_s=1.0,
    backoff_max_s=30.0,
    token_refresh_margin_s=60.0,
)


Seen = dict[str, list[Any]]


def _client(statuses: list[int], clock: FakeClock, **headers: str) -> tuple[DeliveryClient, Seen]:
    seen: Seen = {"send": [], "token": []}
    answers = iter(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            seen["token"].append(request.content.decode())
            return httpx.Response(
                200, json={"access_token": f"t{len(seen['token'])}", "expires_in": 600}
            )
        seen["send"].append((request.headers["Authorization"], request.headers["Idempotency-Key"]))
        status = next(answers)
        return httpx.Response(status, json={"id": "m1"}, headers=headers if status == 429 else {})

    http = httpx.Client(transport=httpx.MockTransport(handle))
    client = DeliveryClient(CONFIG, http=http, sleep=clock.sleep, rand=lambda: 0.5, clock_s=clock)
    return client, seen


def test_client_backs_off_with_jitter_then_delivers() -> None:
    clock = FakeClock()
    client, seen = _client([500, 503, 429, 202], clock, **{"Retry-After": "9"})
    outcome = client.send(_payload("a"))
    assert isinstance(outcome, Delivered) and outcome.attempts == 4 and outcome.message_id == "m1"
    assert clock.sleeps == [0.5, 1.0, 9.0]  # 0.5 * ceiling(0), 0.5 * ceiling(1), Retry-After
    assert {key for _, key in seen["send"]} == {idempotency_key("c", "a")}
    assert "grant_type=client_credentials" in seen["token"][0]


def test_client_gives_up_after_max_attempts_and_on_permanent_4xx() -> None:
    clock = FakeClock()
    client, _ = _client([500, 500, 500, 500], clock)
    failure = client.send(_payload("a"))
    assert isinstance(failure, DeliveryFailure)
    assert (failure.reason, failure.attempts, failure.status) == ("retries_exhausted", 4, 500)
    assert len(clock.sleeps) == 3
    for status in (400, 403, 404, 409, 422):
        client, _ = _client([status], FakeClock())
        failure = client.send(_payload("a"))
        assert isinstance(failure, DeliveryFailure)
        assert (failure.reason, failure.status, failure.attempts) == ("rejected", status, 1)
    client, _ = _client([408, 202], FakeClock())
    assert isinstance(client.send(_payload("a")), Delivered)


def test_a_refusal_quoting_the_recipient_is_logged_and_dead_lettered_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 600})
        return httpx.Response(422, json={"error": "mailbox A@Example.com does not exist"})

    http = httpx.Client(transport=httpx.MockTransport(handle))
    client = DeliveryClient(CONFIG, http=http, sleep=lambda _s: None)
    failure = client.send(_payload("a"))  # to a@example.com
    assert isinstance(failure, DeliveryFailure) and failure.reason == "rejected"
    assert "mailbox <recipient> does not exist" in failure.detail
    assert "example.com" not in caplog.text.lower()


def test_client_refreshes_token_on_401_once() -> None:
    clock = FakeClock()
    client, seen = _client([401, 202], clock)
    assert isinstance(client.send(_payload("a")), Delivered)
    assert [auth for auth, _ in seen["send"]] == ["Bearer t1", "Bearer t2"]
    assert clock.sleeps == []
    client, seen = _client([401, 401], FakeClock())
    failure = client.send(_payload("a"))
    assert isinstance(failure, DeliveryFailure) and failure.reason == "unauthorized"


def test_token_cached_until_margin_before_expiry() -> None:
    clock = FakeClock()
    client, seen = _client([202] * 3, clock)
    client.send(_payload("a"))
    clock.now += 539  # expires_in 600 - margin 60 = 540
    client.send(_payload("b"))
    assert len(seen["token"]) == 1
    clock.now += 1
    client.send(_payload("c"))
    assert len(seen["token"]) == 2


def test_client_needs_endpoints_and_credentials() -> None:
    with pytest.raises(ConfigurationError):
        DeliveryClient(DeliverySettings())
    with pytest.raises(ConfigurationError):
        DeliveryClient(DeliverySettings(send_url="https://esp.test/v1/send"))


@pytest.mark.parametrize(
    "url",
    [
        "http://esp.example.com/v1/send",  # credentials and addresses in clear text
        "ftp://esp.example.com/v1/send",
        "esp.example.com/v1/send",  # not absolute
        "https:///v1/send",  # no host
    ],
)
def test_platform_urls_must_be_https_except_to_this_machine(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        DeliverySettings(send_url=url)
    with pytest.raises(ValueError, match="http"):
        DeliverySettings(send_url="https://esp.example.com/v1/send", token_url=url)


@pytest.mark.parametrize(
    "url", ["https://esp.example.com/v1/send", "http://127.0.0.1:8025/send", "http://[::1]/s"]
)
def test_https_and_local_http_platform_urls_are_accepted(url: str) -> None:
    assert DeliverySettings(send_url=url, token_url=url).send_url == url
    assert DeliverySettings(send_url="http://localhost:9/v1/send").enabled


def test_failure_record_is_json_safe() -> None:
    clock = FakeClock()
    client, _ = _client([400], clock)
    failure = client.send(_payload("a"))
    assert isinstance(failure, DeliveryFailure)
    record = json.loads(json.dumps(failure.to_dict()))
    assert record["payload"]["idempotency_key"] == record["idempotency_key"]
