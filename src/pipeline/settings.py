"""The one frozen settings object: the only place that reads environment variables.

Every field can be set as ``PIPELINE_<FIELD>`` (nested fields with ``__``, e.g.
``PIPELINE_SCORING__ENGAGEMENT_HALF_LIFE_DAYS``) or from a ``.env`` file. Unknown
``PIPELINE_`` keys are refused so that typos fail loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.scoring import ScoringParams

ProcessingGuarantee = Literal["exactly-once", "at-least-once"]


def _repo_sample_data() -> Path:
    return Path(__file__).resolve().parents[2] / "sample_data"


class TopicNames(BaseModel):
    """Names of every topic the pipeline reads or writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    raw: str = "events.raw"
    dlq: str = "events.dlq"
    clean: str = "events.clean"
    profiles: str = "profiles.updates"
    identities: str = "identities.links"
    by_device: str = "events.by_device"
    attributed: str = "events.attributed"

    def all(self) -> tuple[str, ...]:
        return (
            self.raw,
            self.dlq,
            self.clean,
            self.profiles,
            self.identities,
            self.by_device,
            self.attributed,
        )


class Settings(BaseSettings):
    """Configuration of one deployment; passed down, the environment is read nowhere else."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    home: Path = Field(Path(".pipeline"), description="Data directory: state, stores, reports.")
    broker: str | None = Field(
        None,
        description="host:port of a Kafka/Redpanda cluster; unset = start the embedded broker.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    topics: TopicNames = TopicNames()
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)
    topic_retention_ms: int = Field(7 * 86_400_000, ge=-1)
    consumer_group: str = "pipeline-processor"
    instance_id: str = Field(
        "0", description="Stable id of this processor replica; makes its transactional.id stable."
    )
    processing_guarantee: ProcessingGuarantee = "exactly-once"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    commit_interval_s: float = Field(0.5, gt=0)
    consumer_session_timeout_ms: int | None = Field(
        None,
        ge=1000,
        description="Consumer group session timeout; unset = 3000 embedded (fast first "
        "assignment), librdkafka's default for a cluster (brokers refuse < 6000 by default).",
    )
    dedupe_window_hours: float = Field(24.0, gt=0)
    anonymous_history_limit: int = Field(
        1000, ge=0, description="Events kept per unidentified device for merging on login."
    )
    max_event_bytes: int = Field(32_768, ge=256, le=900_000)
    max_future_skew_s: int = Field(86_400, ge=0)
    catalog_path: Path = Field(default_factory=lambda: _repo_sample_data() / "catalog.csv")
    scoring: ScoringParams = ScoringParams()

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError("SASL needs sasl_mechanism, sasl_username and sasl_password")
        return self

    @property
    def embedded(self) -> bool:
        """True when the pipeline runs its own broker instead of connecting to a cluster."""
        return self.broker is None

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def warehouse_path(self) -> Path:
        return self.home / "warehouse.sqlite"

    @property
    def profile_store_path(self) -> Path:
        return self.home / "profiles.sqlite"

    def kafka_security_config(self) -> dict[str, Any]:
        """librdkafka settings for authentication and TLS (empty for plaintext)."""
        conf: dict[str, Any] = {"security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = str(self.ssl_ca_location)
        return conf


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with explicit overrides (tests, CLI flags) on top."""
    return Settings(**overrides)
