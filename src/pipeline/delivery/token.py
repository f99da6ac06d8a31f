"""OAuth2 client-credentials tokens: fetched once, shared, refreshed before expiry or on 401."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from pipeline.delivery.backoff import parse_retry_after, utc_now_s
from pipeline.delivery.config import DeliverySettings
from pipeline.errors import ConfigurationError

DEFAULT_EXPIRES_IN_S = 300.0


class TokenUnavailable(Exception):
    """The token endpoint failed in a way that may pass (5xx, 429, timeout, connection)."""

    def __init__(self, detail: str, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s


class TokenRejected(Exception):
    """The token endpoint refused the client credentials (a permanent 4xx)."""

    def __init__(self, detail: str, status: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at_s: float


class TokenProvider:
    """Caches the access token until ``token_refresh_margin_s`` before its ``expires_in``."""

    def __init__(
        self,
        config: DeliverySettings,
        http: httpx.Client,
        *,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (config.token_url and config.client_id and config.client_secret):
            raise ConfigurationError(
                "delivery needs delivery.token_url, delivery.client_id and delivery.client_secret"
            )
        self._config = config
        self._url = config.token_url
        self._http = http
        self._clock_s = clock_s
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self.fetches = 0

    def token(self) -> str:
        """A valid access token, fetched when there is none or it is about to expire."""
        with self._lock:
            current = self._token
            if current is not None and self._clock_s() < current.refresh_at_s:
                return current.value
            self._token = self._fetch()
            return self._token.value

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the platform said 401); a newer token fetched meanwhile is kept."""
        with self._lock:
            if self._token is not None and self._token.value == token:
                self._token = None

    def _fetch(self) -> _Token:
        config = self._config
        secret = config.client_secret.get_secret_value() if config.client_secret else ""
        form = {"grant_type": "client_credentials"}
        if config.scope:
            form["scope"] = config.scope
        auth = httpx.Auth()  # the base class sends the request unchanged
        if config.token_auth == "client_secret_basic":
            auth = httpx.BasicAuth(config.client_id or "", secret)
        else:
            form |= {"client_id": config.client_id or "", "client_secret": secret}
        started = self._clock_s()
        try:
            response = self._http.post(
                str(self._url), data=form, auth=auth, headers={"Accept": "application/json"}
            )
        except httpx.TimeoutException:
            raise TokenUnavailable("token request timed out") from None
        except httpx.HTTPError as exc:  # the connection, or a response it cannot read
            raise TokenUnavailable(f"token request failed: {type(exc).__name__}") from None
        self.fetches += 1
        status = response.status_code
        if status == 429 or status == 408 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), utc_now_s())
            raise TokenUnavailable(f"token endpoint answered {status}", status, retry_after)
        if status != 200:
            raise TokenRejected(f"token endpoint refused the client credentials ({status})", status)
        try:
            body = response.json()
            value = body["access_token"]
            expires_in = float(body.get("expires_in", DEFAULT_EXPIRES_IN_S))
        except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
            raise TokenUnavailable("token endpoint sent no access_token", status) from None
        except OverflowError:
            raise TokenUnavailable(
                "token endpoint sent an expires_in out of range", status
            ) from None
        if not isinstance(value, str) or not value:
            raise TokenUnavailable("token endpoint sent an empty access_token", status)
        if not math.isfinite(expires_in) or expires_in <= 0:
            raise TokenUnavailable(f"token endpoint sent expires_in {expires_in}", status)
        # Never keep a token past half its life when the margin exceeds it (short-lived tokens).
        margin = min(config.token_refresh_margin_s, expires_in / 2)
        return _Token(value, started + expires_in - margin)
