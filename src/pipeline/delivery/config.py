"""Configuration of delivery to the email platform, nested in the settings as ``delivery``."""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class DeliverySettings(BaseModel):
    """Where and how rendered emails are sent; unset ``send_url`` = delivery disabled.

    The platform is reached with an OAuth2 client-credentials token from ``token_url``, e.g.
    ``PIPELINE_DELIVERY__CLIENT_SECRET=...`` (never logged).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    send_url: str | None = Field(None, description="POST endpoint that sends one email.")
    token_url: str | None = Field(None, description="OAuth2 token endpoint (client credentials).")
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scope: str | None = None
    token_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    token_refresh_margin_s: float = Field(
        60.0, ge=0, description="Refresh a token this long before it expires."
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout (connect/read/write).")
    max_attempts: int = Field(6, ge=1, le=50, description="Tries per email, the first included.")
    backoff_base_s: float = Field(0.5, gt=0, description="Backoff ceiling of the first retry.")
    backoff_max_s: float = Field(30.0, gt=0, description="Largest backoff ceiling.")
    max_retry_after_s: float = Field(
        120.0, gt=0, description="Longest Retry-After honoured; longer waits are capped."
    )

    @field_validator("send_url", "token_url")
    @classmethod
    def _https(cls, url: str | None) -> str | None:
        """An absolute https URL; plain http only to this machine (a local platform or test
        double): the token's client secret and bearer, and every address, travel in them."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{url!r} is not an absolute http(s) URL")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError(
                f"{url!r}: plain http only to this machine (localhost); use https, since "
                "credentials and customers' addresses travel in the requests"
            )
        return url

    @property
    def enabled(self) -> bool:
        return self.send_url is not None


def _loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
