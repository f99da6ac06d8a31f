"""The one frozen settings object: the only place that reads environment variables.

Every field can be set as ``PIPELINE_<FIELD>`` (nested fields with ``__``, e.g.
``PIPELINE_SCORING__ENGAGEMENT_HALF_LIFE_DAYS``) or from a ``.env`` file. Unknown
``PIPELINE_`` keys are refused so that typos fail loudly.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.anomaly import AnomalyParams
from pipeline.api.config import ApiSettings
from pipeline.collector.config import CollectorSettings
from pipeline.delivery.config import DeliverySettings
from pipeline.errors import ConfigurationError
from pipeline.scoring import ScoringParams
from pipeline.triggers import TriggerParams

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
    attributed: str = "events.attributed"
    segment_changes: str = "segments.changes"
    triggers: str = "email.triggers"
    email_dlq: str = "email.dlq"
    crm_customers: str = "crm.customers"
    alerts: str = "alerts"
    # `pipeline forget`'s hashed ids, compacted and kept forever: every machine's list
    suppressions: str = "customers.suppressed"

    def all(self) -> tuple[str, ...]:
        return (
            self.raw,
            self.dlq,
            self.clean,
            self.profiles,
            self.identities,
            self.attributed,
            self.segment_changes,
            self.triggers,
            self.email_dlq,
            self.crm_customers,
            self.alerts,
            self.suppressions,
        )


class BigQuerySettings(BaseModel):
    """The BigQuery warehouse: off unless ``enabled``; credentials from Google's ADC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    project: str | None = Field(None, description="GCP project; unset = the ADC default.")
    dataset: str = "pipeline"
    location: str = "US"
    api_endpoint: str | None = Field(
        None, description="Override (e.g. an emulator's http://127.0.0.1:PORT): no credentials."
    )
    partition_expiration_days: int | None = Field(
        None, ge=1, description="Expiry of every partitioned table; unset = per-table retention."
    )
    insert_batch_size: int = Field(500, ge=1, le=10_000)
    retry_deadline_s: float = Field(120.0, gt=0)


class RetentionSettings(BaseModel):
    """Days raw-ish data is kept (unset = forever); applied by ``pipeline retention``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    events_days: int | None = Field(400, ge=1)
    dead_letters_days: int | None = Field(30, ge=1)
    sent_emails_days: int | None = Field(90, ge=1)


class SyncSettings(BaseModel):
    """CRM import sources: a CSV export and, optionally, a SQLite database table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    crm_csv_path: Path | None = Field(
        default_factory=lambda: _repo_sample_data() / "crm_customers.csv"
    )
    crm_sqlite_path: Path | None = None
    crm_sqlite_table: str = Field("customers", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class Settings(BaseSettings):
    """Configuration of one deployment; passed down, the environment is read nowhere else."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        # a .env shared with other tools (GOOGLE_APPLICATION_CREDENTIALS=...) is fine; an
        # unknown PIPELINE_* key in it is refused like any unknown setting
        dotenv_filtering="match_prefix",
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
    partitions: int = Field(
        1,
        ge=1,
        le=1024,
        description="Partitions of every topic the pipeline creates: the unit of scale-out "
        "(replicas beyond it sit idle). 1 suits one processor on the embedded broker: in nine "
        "interleaved bench pairs against 4 the broker's CPU over a backlog fell from 3.1-5.8 to "
        "1.7-3.7 s, a half-load checkpoint commit by a third or more, the half-load p99 in the "
        "median, with the same throughput. `pipeline up --replicas N` and the bench's scale-out "
        "raise it to N on the embedded broker; a cluster sets it (deploy/kubernetes: 4).",
    )
    replication_factor: int = Field(1, ge=1)
    topic_retention_ms: int = Field(7 * 86_400_000, ge=-1)
    replica_seed: Path | None = Field(
        None,
        description="A snapshot (`pipeline snapshot`) a serving replica starts its copy from "
        "when it has none yet, so that it holds more than the topics retain; it then reads "
        "the topics from the snapshot's saved positions (from their start without any).",
    )
    consumer_group: str = "pipeline-processor"
    instance_id: str = Field(
        "0", description="Stable id of this processor replica; makes its transactional.id stable."
    )
    processing_guarantee: ProcessingGuarantee = "exactly-once"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    commit_interval_s: float = Field(
        0.5,
        gt=0,
        description="Checkpoint interval: transactions commit, offsets and state persist, and "
        "a crash replays at most this much (invisibly under exactly-once). Each commit stops "
        "the loop while it waits on the broker: at 0.1 s the loop spent 25% of its time "
        "committing at half load on the embedded broker, at 0.5 s 7%, and the half-load p50 "
        "fell from 106-174 to 73-95 ms (four interleaved pairs). It bounds latency only for "
        "read_committed readers (stage 2 reads uncommitted by default).",
    )
    producer_linger_ms: int = Field(
        10,
        ge=0,
        le=1000,
        description="How long the processor's producer gathers records into one batch. On the "
        "embedded broker at 900 ev/s paced after a 20k backlog (2 rounds each): 5 ms gave p50 "
        "50-57, p99 140-241 ms and 0.71 broker CPU-s per 1k events; 10 ms p50 47-51, p99 82-95 "
        "ms, 0.56-0.62 CPU-s; 20 ms p50 51-58; 50 ms p50 72-105. Backlog throughput was the "
        "same within the noise. Fewer, larger requests cost the broker less per event.",
    )
    consumer_isolation: Literal["read_committed", "read_uncommitted"] = Field(
        "read_uncommitted",
        description="How the processor's consumer reads stage 1's output. read_uncommitted: "
        "stage 2 sees a record as soon as it is written instead of when stage 1's transaction "
        "commits, which removes about one commit interval from every event's latency "
        "(1,000 ev/s: p50 103-115 -> 37-39 ms). Safe because stage 1 is deterministic and "
        "stage 2 drops replayed positions (pipeline.stream.stages). read_committed: wait "
        "for the commit.",
    )
    outputs_max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="0: stage 2 sends each output record (events.clean, profiles.updates, "
        "segments.changes) as it is made. Above 0: in bursts, when the oldest waiting is this "
        "old and at each checkpoint, with only the newest profile per customer in a burst; "
        "readers of those topics see records up to this much later (the warehouse and the "
        "stage 1 -> stage 2 hop are not delayed). The Kafka client sends a produce request "
        "per partition per linger window: bursts of 100 ms cut the processor's produce "
        "requests per event by half (paced, 25% load: 700-740 -> 420-440 per 1,000 events) "
        "and the embedded broker's CPU per event by up to a third, but the loop stalls while "
        "it sends a burst and half-load p99 rose (160-189 -> 291-686 ms, two interleaved "
        "runs): worth it where the brokers, not the processor's latency, are the constraint.",
    )
    sink_max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="Longest a record waits in a warehouse sink before the sink's writer "
        "thread writes it (0 = as soon as the writer is free: what arrives while it writes "
        "makes the next batch); the rest is written at each checkpoint. 0 since 2026-11-29 "
        "(was 10): the store step's median 8-9 -> 1-3 ms, at about 10% more processor CPU "
        "per event under paced load and the same on a backlog.",
    )
    state_write_buffer_mb: int = Field(
        4, ge=1, description="RocksDB write buffer per state store (quixstreams' default is 64)."
    )
    state_block_cache_mb: int = Field(
        16, ge=1, description="RocksDB block cache per state store (quixstreams' default 1024)."
    )
    gc_young_threshold: int = Field(
        10_000,
        ge=0,
        description="While the processor runs, the objects alive once it is built are frozen "
        "out of Python's cyclic garbage collector and its thresholds are (this, 20, 100) "
        "instead of (700, 10, 10): full collections, which stop the loop for about 210 ms each "
        "in the bench's process, become rare (pipeline.gc_pauses). Four interleaved bench pairs: "
        "the loop's time in pauses over the backlog 7.8-8.1% -> 1.6-2.1%, the longest pause "
        "203-211 -> 21-33 ms, events per CPU-s +0.4, +9, +17, +19%. The HTTP collector and "
        "the API do the same once started. 0 = leave the collector as Python sets it.",
    )
    consumer_fetch_wait_max_ms: int = Field(
        20,
        ge=0,
        le=500,
        description="Longest the broker holds a consumer's fetch open waiting for data: a floor "
        "under each hop's latency when a partition is idle, against more fetch requests.",
    )
    consumer_session_timeout_ms: int | None = Field(
        None,
        ge=1000,
        description="Consumer group session timeout; unset = 3000 embedded (fast first "
        "assignment), librdkafka's default for a cluster (brokers refuse < 6000 by default).",
    )
    dedupe_window_hours: float = Field(24.0, gt=0)
    anonymous_history_limit: int = Field(
        1000,
        ge=0,
        description="The newest events kept per unidentified device, re-attributed at its "
        "login (older ones stay with the retired anonymous profile).",
    )
    max_event_bytes: int = Field(32_768, ge=256, le=900_000)
    max_future_skew_s: int = Field(86_400, ge=0)
    catalog_path: Path = Field(default_factory=lambda: _repo_sample_data() / "catalog.csv")
    scoring: ScoringParams = ScoringParams()
    triggers: TriggerParams = TriggerParams()
    anomaly: AnomalyParams = AnomalyParams()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics; 0 = any.")
    workbench_host: str = "127.0.0.1"
    workbench_port: int = Field(8501, ge=1, le=65535)
    segments_path: Path | None = Field(
        None, description="Segment rules (YAML); unset = the rules shipped in the package."
    )
    collector: CollectorSettings = CollectorSettings()
    api: ApiSettings = ApiSettings()
    delivery: DeliverySettings = DeliverySettings()
    bigquery: BigQuerySettings = BigQuerySettings()
    retention: RetentionSettings = RetentionSettings()
    sync: SyncSettings = SyncSettings()

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
        """Processor state; per instance, as replicas of one group must not share RocksDB."""
        if self.instance_id == "0":
            return self.home / "state"
        return self.home / f"state-{self.instance_id}"

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


ENV_PREFIX = "PIPELINE_"


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """``PIPELINE_*`` variables that name no setting, each with the nearest one when there is
    one (``PIPELINE_BROKERS (PIPELINE_BROKER?)``). pydantic-settings ignores them, so a typo
    in ``PIPELINE_BROKER`` would silently start the embedded broker instead of the cluster."""
    fields = {name.upper() for name in Settings.model_fields}
    out = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        head = upper[len(ENV_PREFIX) :].split("__")[0]
        if head in fields:
            continue
        near = difflib.get_close_matches(head, fields, n=1)
        out.append(f"{key} ({ENV_PREFIX}{near[0]}?)" if near else key)
    return out


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with explicit overrides (tests, CLI flags) on top.

    Raises ConfigurationError for a ``PIPELINE_*`` variable that names no setting, and for
    values that do not validate, in one line per problem (not pydantic's report).
    """
    unknown = unknown_settings(os.environ)
    if unknown:
        raise ConfigurationError(f"unknown settings in the environment: {', '.join(unknown)}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            + (f" (got {e['input']!r})" if not isinstance(e["input"], dict) else "")
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from None
