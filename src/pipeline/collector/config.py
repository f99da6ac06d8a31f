"""Configuration of the collector, nested in the settings as ``collector``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEV_WRITE_KEYS = {"local": SecretStr("wk_local_dev")}
"""The development key a fresh checkout accepts; any real deployment sets its own keys."""


class CollectorSettings(BaseModel):
    """HTTP address, write keys, size and rate limits, CORS allowlist and delivery deadline.

    ``write_keys`` maps a source id to its write key, e.g.
    ``PIPELINE_COLLECTOR__WRITE_KEYS='{"storefront": "wk_...", "backend": "wk_..."}'``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535)
    write_keys: dict[str, SecretStr] = Field(default_factory=lambda: dict(DEV_WRITE_KEYS))
    max_batch_bytes: int = Field(
        500 * 1024, ge=1024, description="Largest request body, after gzip decompression."
    )
    rate_limit_events_per_s: float = Field(
        5000.0, gt=0, description="Sustained events per second per write key (token bucket)."
    )
    rate_limit_burst: int = Field(10_000, ge=1, description="Token bucket size, in events.")
    cors_origins: tuple[str, ...] = Field(
        (), description="Browser origins allowed to send, e.g. http://localhost:8088."
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="How long a request waits for the broker's acknowledgements."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 (broker unavailable).")
    health_timeout_s: float = Field(2.0, gt=0)
