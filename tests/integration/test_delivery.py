"""Delivery against a real local HTTP server playing the email platform (``esp_platform``),
which injects faults on scripted attempts. Every email must be delivered exactly once, none
lost, permanent failures typed.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from esp_platform import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLIENT_TIMEOUT_S,
    Platform,
    running_platform,
)

from pipeline.delivery.client import DeliveryClient
from pipeline.delivery.config import DeliverySettings
from pipeline.delivery.payload import Delivered, DeliveryFailure, EmailPayload, idempotency_key
from pipeline.delivery.scheduler import DeliveryScheduler, RenderJob, deliver_due


@pytest.fixture
def platform() -> Iterator[tuple[Platform, str]]:
    with running_platform() as running:
        yield running


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
        idempotency_key=idempotency_key(campaign, customer),
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
    assert exhausted.payload["customer"] == "cus_0005" and "to" not in exhausted.payload
    record = json.dumps(exhausted.to_dict())  # a JSON-safe dead-letter record
    assert "cus_0005@example.com" not in record  # no address: `forget` cannot reach a topic

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


def test_answers_that_cannot_be_read_are_retried_not_raised(
    platform: tuple[Platform, str],
) -> None:
    """A platform's odd answer is a retry or a delivery, never an exception that would take
    the due emails with it (and stop the delivery thread)."""
    state, url = platform
    payloads = [_payload(i, campaign="odd") for i in range(3)]
    keys = [p.idempotency_key for p in payloads]
    state.script = {keys[0]: ["bad-gzip"], keys[1]: ["deep-json"], keys[2]: ["429-odd-retry-after"]}
    scheduler = DeliveryScheduler(RenderJob(0, p) for p in payloads)
    with DeliveryClient(_config(url), sleep=SleepRecorder()) as client:
        outcomes, failures = deliver_due(scheduler, client, now_ms=1)
    assert failures == [] and all(isinstance(o, Delivered) for o in outcomes)
    by_key = {o.idempotency_key: o for o in outcomes}
    assert by_key[keys[0]].attempts == 2  # undecodable: sent again, a no-op by its key
    assert by_key[keys[1]].attempts == 1 and by_key[keys[1]].message_id is None
    assert by_key[keys[2]].attempts == 2  # "²" is no delay: backed off instead
    assert all(state.deliveries[k] == 1 for k in keys)  # each email sent once


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
