"""Sending one email to the platform's HTTP API, exactly once, with retries.

Each send carries ``Idempotency-Key`` (the same on every retry), so a platform that keeps keys
sends an email once however often a timed-out request is retried. Retried: 408, 429 (after
``Retry-After``), 5xx, timeouts and connection errors, up to ``max_attempts`` tries with full
jitter backoff. A 401 refreshes the token and tries once more without counting a try. Any other
4xx, or running out of tries, gives a :class:`DeliveryFailure` for the dead-letter topic.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import httpx

from pipeline.delivery.backoff import parse_retry_after, retry_delay, utc_now_s
from pipeline.delivery.config import DeliverySettings
from pipeline.delivery.payload import (
    Delivered,
    DeliveryFailure,
    DeliveryOutcome,
    EmailPayload,
    FailureReason,
)
from pipeline.delivery.token import TokenProvider, TokenRejected, TokenUnavailable
from pipeline.errors import ConfigurationError

log = logging.getLogger(__name__)
_DETAIL_CHARS = 300


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class EmailPlatform(Protocol):
    """Anything that sends one email payload and says how it went."""

    def send(self, payload: EmailPayload) -> DeliveryOutcome: ...


class _Retryable(Exception):
    def __init__(self, detail: str, status: int | None, retry_after_s: float | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s


class DeliveryClient:
    """The email platform's HTTP API behind :class:`EmailPlatform` (thread-safe)."""

    def __init__(
        self,
        config: DeliverySettings,
        *,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock_s: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        if not config.send_url:
            raise ConfigurationError("delivery needs delivery.send_url")
        self.config = config
        self._send_url = config.send_url
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=httpx.Timeout(config.timeout_s))
        self.tokens = TokenProvider(config, self._http, clock_s=clock_s)
        self._sleep = sleep
        self._rand = rand
        self._wall_ms = wall_ms

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> DeliveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, payload: EmailPayload) -> DeliveryOutcome:
        """Send ``payload``; retries transient failures, returns what finally happened."""
        config = self.config
        tries = 0
        failed_tries = 0
        reauthorized = False
        last = _Retryable("not tried", None, None)
        while failed_tries < config.max_attempts:
            tries += 1
            try:
                token = self.tokens.token()
                response = self._post(payload, token)
            except TokenRejected as exc:
                return self._failure(payload, "token_rejected", exc.detail, exc.status, tries)
            except (TokenUnavailable, _Retryable) as exc:
                last = _Retryable(exc.detail, exc.status, exc.retry_after_s)
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._delivered(payload, response, tries)
                if status == 401:
                    self.tokens.invalidate(token)
                    if not reauthorized:
                        reauthorized = True
                        continue
                    return self._failure(
                        payload, "unauthorized", "401 with a fresh token", status, tries
                    )
                if status not in (408, 429) and status < 500:
                    detail = f"{status}: {response.text[:_DETAIL_CHARS]}"
                    return self._failure(payload, "rejected", detail, status, tries)
                retry_after = parse_retry_after(response.headers.get("Retry-After"), utc_now_s())
                last = _Retryable(f"platform answered {status}", status, retry_after)
            failed_tries += 1
            if failed_tries < config.max_attempts:
                delay = retry_delay(
                    failed_tries - 1,
                    base_s=config.backoff_base_s,
                    cap_s=config.backoff_max_s,
                    rand=self._rand,
                    retry_after_s=last.retry_after_s,
                    max_retry_after_s=config.max_retry_after_s,
                )
                log.info(
                    "send %s: %s; retry %d in %.2fs",
                    payload.idempotency_key,
                    last.detail,
                    failed_tries,
                    delay,
                )
                self._sleep(delay)
        return self._failure(payload, "retries_exhausted", last.detail, last.status, tries)

    def send_many(self, payloads: Iterable[EmailPayload]) -> list[DeliveryOutcome]:
        return [self.send(p) for p in payloads]

    def _post(self, payload: EmailPayload, token: str) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": payload.idempotency_key,
            "Accept": "application/json",
        }
        try:
            return self._http.post(self._send_url, json=payload.to_json(), headers=headers)
        except httpx.TimeoutException:
            raise _Retryable("send timed out", None, None) from None
        except httpx.HTTPError as exc:  # the connection, or a response it cannot read
            raise _Retryable(f"send failed: {type(exc).__name__}", None, None) from None

    def _delivered(self, payload: EmailPayload, response: httpx.Response, tries: int) -> Delivered:
        message_id: str | None = None
        try:
            body = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
            body = None
        if isinstance(body, dict):
            found = body.get("id", body.get("message_id"))
            message_id = str(found) if found is not None else None
        return Delivered(
            idempotency_key=payload.idempotency_key,
            customer=payload.customer,
            campaign=payload.campaign,
            status=response.status_code,
            attempts=tries,
            message_id=message_id,
            delivered_ms=self._wall_ms(),
        )

    def _failure(
        self,
        payload: EmailPayload,
        reason: FailureReason,
        detail: str,
        status: int | None,
        tries: int,
    ) -> DeliveryFailure:
        # a platform's refusal often quotes the recipient: not into logs and dead letters
        detail = re.sub(re.escape(payload.to), "<recipient>", detail, flags=re.IGNORECASE)
        log.warning("send %s failed for good: %s (%s)", payload.idempotency_key, reason, detail)
        return DeliveryFailure(
            reason=reason,
            detail=detail,
            status=status,
            attempts=tries,
            idempotency_key=payload.idempotency_key,
            customer=payload.customer,
            campaign=payload.campaign,
            failed_ms=self._wall_ms(),
            payload={k: v for k, v in payload.to_json().items() if k != "to"},
        )


class MemoryEmailPlatform:
    """An in-memory :class:`EmailPlatform` for unit tests: records each key's first payload."""

    def __init__(self) -> None:
        self.sent: dict[str, EmailPayload] = {}
        self.calls = 0

    def send(self, payload: EmailPayload) -> DeliveryOutcome:
        self.calls += 1
        self.sent.setdefault(payload.idempotency_key, payload)
        return Delivered(
            idempotency_key=payload.idempotency_key,
            customer=payload.customer,
            campaign=payload.campaign,
            status=202,
            attempts=1,
            message_id=payload.idempotency_key,
            delivered_ms=_wall_ms(),
        )
