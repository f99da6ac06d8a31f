"""Configuration of the serving API, nested in the settings as ``api``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from pipeline.emails import EmailParams
from pipeline.recommend import RecommendParams
from pipeline.sendtime import SendTimeParams

DEV_API_KEYS = {"local": SecretStr("ak_local_dev")}
"""The development key a fresh checkout accepts; any real deployment sets its own keys."""


class JwtSettings(BaseModel):
    """How OAuth2 bearer tokens (JWTs) are verified; no key configured = bearer tokens refused.

    ``hs256_secret`` verifies HS256 tokens, ``rs256_public_key`` (PEM) RS256 tokens; ``issuer``
    and ``audience``, when set, must match the ``iss`` and ``aud`` claims. ``exp`` is required.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hs256_secret: SecretStr | None = None
    rs256_public_key: SecretStr | None = Field(None, description="PEM of the RS256 public key.")
    issuer: str | None = None
    audience: str | None = None
    leeway_s: float = Field(30.0, ge=0, description="Clock skew tolerated on exp/nbf/iat.")

    @model_validator(mode="after")
    def _strong_secret(self) -> JwtSettings:
        secret = self.hs256_secret
        if secret is not None and len(secret.get_secret_value().encode()) < 32:
            raise ValueError("jwt.hs256_secret needs at least 32 bytes")
        return self

    @property
    def enabled(self) -> bool:
        return self.hs256_secret is not None or self.rs256_public_key is not None


class ApiSettings(BaseModel):
    """Address, credentials, cache lifetimes and personalization parameters of the API.

    ``api_keys`` maps a client name to its key, e.g.
    ``PIPELINE_API__API_KEYS='{"workbench": "ak_...", "crm": "ak_..."}'``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    follow_topics: bool = Field(
        False,
        description="Keep this API's own copy of the serving store from the processor's output "
        "topics (PIPELINE_BROKER): for an API that does not share the processor's files.",
    )
    api_keys: dict[str, SecretStr] = Field(default_factory=lambda: dict(DEV_API_KEYS))
    jwt: JwtSettings = JwtSettings()
    signals_ttl_s: float = Field(
        60.0, gt=0, description="Age after which co-occurrence/trending signals are rebuilt."
    )
    signals_window_days: float = Field(
        14.0, gt=0, description="Events read for the signals: this far back from the newest."
    )
    signals_max_events: int = Field(500_000, ge=1, description="Most recent events read at most.")
    population_ttl_s: float = Field(
        30.0, gt=0, description="Age after which the send-time prior and segment sizes are rebuilt."
    )
    email_items: int = Field(6, ge=1, le=50, description="Recommended products per email.")
    render_limit_max: int = Field(
        1000, ge=1, description="Most emails one campaign render returns."
    )
    max_body_bytes: int = Field(
        65_536, ge=1024, description="Largest request body read (413 beyond, before parsing)."
    )
    default_campaign: str = "preview"
    unsubscribe_url: str = Field(
        "https://shop.example.com/unsubscribe?c={customer_id}",
        description="Unsubscribe link; {customer_id} is replaced (URL-quoted).",
    )
    recommend: RecommendParams = RecommendParams()
    send_time: SendTimeParams = SendTimeParams()
    email: EmailParams = EmailParams()
