"""Records of the simulator: its configuration, the raw messages it emits and the ground truth.

Everything here is frozen plain data, so notebooks and tests can compare what the pipeline
computed with what the simulator knows to be true.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import KW_ONLY, asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson

PriceBand = Literal["low", "mid", "high"]
DeviceType = Literal["mobile", "desktop", "tablet"]
MessageKind = Literal["valid", "duplicate", "malformed"]
MalformedReason = Literal[
    "not_json",
    "not_utf8",
    "too_large",
    "missing_identity",
    "schema_violation",
    "bad_timestamp",
    "timestamp_out_of_range",
    "unknown_event",
]
MALFORMED_REASONS: tuple[MalformedReason, ...] = (
    "not_json",
    "not_utf8",
    "too_large",
    "missing_identity",
    "schema_violation",
    "bad_timestamp",
    "timestamp_out_of_range",
    "unknown_event",
)
ANONYMOUS_PREFIX = "anon:"
LIBRARY = {"name": "pipeline-simulator", "version": "1"}
"""``context.library`` of every simulated event."""
MAX_EVENT_BYTES = 32 * 1024


def default_end() -> datetime:
    """Today at 00:00 UTC: the usual end of a simulated period (reads the clock, so pass it in)."""
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def end_of(day: date | str | None) -> datetime:
    """00:00 UTC of ``day`` (a date or an ISO ``YYYY-MM-DD``) as a simulated period's end;
    today's when it is empty. A fixed day makes a seeded run the same on every day it runs
    (the calendar, weekdays and daylight-saving changes shape the traffic)."""
    if not day:
        return default_end()
    when = day if isinstance(day, date) else date.fromisoformat(day)
    return datetime(when.year, when.month, when.day, tzinfo=UTC)


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; ``events`` is the exact number of raw messages, faults included.

    ``customers`` counts known (logged-in) customers; ``anonymous_visitor_share`` of all
    visitors are extra ones who never log in.
    """

    events: int
    _: KW_ONLY
    end: datetime
    seed: int = 42
    days: int = 14
    customers: int | None = None
    anonymous_visitor_share: float = 0.15
    duplicate_rate: float = 0.02
    malformed_rate: float = 0.005
    late_rate: float = 0.02

    def __post_init__(self) -> None:
        if self.events < 1:
            raise ValueError(f"events must be at least 1, got {self.events}")
        if self.end.tzinfo is None or self.end.utcoffset() != timedelta(0):
            raise ValueError(f"end must be a timezone-aware UTC datetime, got {self.end!r}")
        if self.days < 1:
            raise ValueError(f"days must be at least 1, got {self.days}")
        if self.customers is not None and self.customers < 1:
            raise ValueError(f"customers must be at least 1, got {self.customers}")
        if not 0.0 <= self.anonymous_visitor_share < 1.0:
            raise ValueError(
                f"anonymous_visitor_share must be in [0, 1), got {self.anonymous_visitor_share}"
            )
        for name in ("duplicate_rate", "malformed_rate", "late_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 0.5:
                raise ValueError(f"{name} must be in [0, 0.5], got {value}")
        if self.duplicate_rate + self.malformed_rate > 0.5:
            raise ValueError("duplicate_rate + malformed_rate must not exceed 0.5")

    @property
    def known_customers(self) -> int:
        """Number of known customers: ``customers`` or ``max(10, events // 60)``."""
        return self.customers if self.customers is not None else max(10, self.events // 60)

    @property
    def start(self) -> datetime:
        """Beginning of the simulated period (inclusive)."""
        return self.end - timedelta(days=self.days)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as a collector would produce it to ``events.raw``, with its hidden truth.

    ``true_customer_id`` is the id the pipeline should attribute the event to: the userId, or
    ``anon:<anonymousId>`` for a device never linked to a customer; ``""`` for malformed
    messages, which must not be attributed. ``delivered_ms`` is when it reached the collector.
    """

    key: bytes | None
    value: bytes
    kind: MessageKind
    message_id: str | None
    true_customer_id: str
    malformed_reason: MalformedReason | None
    timestamp_ms: int
    delivered_ms: int
    late: bool = False


@dataclass(frozen=True, slots=True)
class Device:
    """One browser or app install; its ``anonymous_id`` is stable across sessions."""

    anonymous_id: str
    type: DeviceType
    user_agent: str


@dataclass(frozen=True, slots=True)
class TruePreferences:
    """What a visitor really likes; recommendations are measured against this."""

    category_prefs: dict[str, float]
    brand_prefs: dict[str, float]
    price_band: PriceBand
    timezone: str
    active_hours: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TrueCustomer:
    """A simulated visitor: a known customer, or (``is_known=False``) one who never logs in.

    ``active_hours`` are local hours in ``timezone``; ``activity`` scales how often they visit.
    """

    customer_id: str
    is_known: bool
    email: str | None
    first_name: str | None
    last_name: str | None
    timezone: str
    active_hours: tuple[int, ...]
    category_prefs: dict[str, float]
    brand_prefs: dict[str, float]
    price_band: PriceBand
    devices: tuple[Device, ...]
    activity: float

    @property
    def anonymous_ids(self) -> tuple[str, ...]:
        return tuple(d.anonymous_id for d in self.devices)

    @property
    def preferences(self) -> TruePreferences:
        return TruePreferences(
            category_prefs=self.category_prefs,
            brand_prefs=self.brand_prefs,
            price_band=self.price_band,
            timezone=self.timezone,
            active_hours=self.active_hours,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GroundTruth:
    """What the pipeline should find, recomputed from the messages actually emitted.

    ``identity_links`` maps every anonymousId that some valid message ties to a userId
    (identify, alias, or an event carrying both). ``expected_event_counts`` counts valid,
    de-duplicated messages per true customer id.
    """

    identity_links: dict[str, str]
    duplicates: frozenset[str]
    expected_event_counts: dict[str, int]
    malformed_by_reason: dict[str, int]
    preferences: dict[str, TruePreferences]
    late_message_ids: frozenset[str]
    product_price_bands: dict[str, PriceBand]


@dataclass(frozen=True)
class Simulation:
    """The output of :func:`~pipeline.simulate.simulate`: messages in delivery order plus truth."""

    config: SimulationConfig
    messages: list[RawMessage]
    customers: list[TrueCustomer]
    ground_truth: GroundTruth
    sessions: int = 0
    orders: int = 0
    revenue: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Headline numbers of the run, JSON-serializable."""
        kinds = Counter(m.kind for m in self.messages)
        truth = self.ground_truth
        active = set(truth.expected_event_counts)
        known = [c for c in self.customers if c.is_known]
        return {
            "seed": self.config.seed,
            "start": self.config.start.isoformat(),
            "end": self.config.end.isoformat(),
            "messages": len(self.messages),
            "valid": kinds.get("valid", 0),
            "duplicates": kinds.get("duplicate", 0),
            "malformed": kinds.get("malformed", 0),
            "malformed_by_reason": dict(sorted(truth.malformed_by_reason.items())),
            "late": len(truth.late_message_ids),
            "known_customers": len(known),
            "active_known_customers": sum(1 for c in known if c.customer_id in active),
            "anonymous_visitors": len(self.customers) - len(known),
            "true_ids_with_events": len(active),
            "identity_links": len(truth.identity_links),
            "sessions": self.sessions,
            "orders": self.orders,
            "revenue": round(self.revenue, 2),
        }

    def write_ground_truth(self, directory: Path) -> dict[str, Path]:
        """Write the truth as JSON/JSONL files into ``directory``; returns name -> path.

        ``messages.jsonl`` has one line per message in delivery order (``offset`` = position).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        truth = self.ground_truth
        paths = {
            name: directory / name
            for name in (
                "summary.json",
                "customers.jsonl",
                "identity_links.json",
                "expected_event_counts.json",
                "messages.jsonl",
            )
        }
        paths["summary.json"].write_text(json.dumps(self.summary(), indent=2) + "\n")
        with paths["customers.jsonl"].open("wb") as handle:
            for customer in self.customers:
                handle.write(orjson.dumps(customer.to_dict()) + b"\n")
        paths["identity_links.json"].write_bytes(
            orjson.dumps(truth.identity_links, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        )
        paths["expected_event_counts.json"].write_bytes(
            orjson.dumps(
                truth.expected_event_counts, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2
            )
        )
        with paths["messages.jsonl"].open("wb") as handle:
            for offset, m in enumerate(self.messages):
                record = {
                    "offset": offset,
                    "message_id": m.message_id,
                    "kind": m.kind,
                    "key": m.key.decode("utf-8", errors="replace") if m.key is not None else None,
                    "true_customer_id": m.true_customer_id,
                    "malformed_reason": m.malformed_reason,
                    "timestamp_ms": m.timestamp_ms,
                    "delivered_ms": m.delivered_ms,
                    "late": m.late,
                    "resent": m.kind == "valid" and m.message_id in truth.duplicates,
                }
                handle.write(orjson.dumps(record) + b"\n")
        return paths
