"""What the API serves, computed from the local profile store: plain methods, no HTTP.

Profiles are read per request (the latest version the processor wrote); the shared signals
(co-occurrence, trending) and the population (send-time prior, segment members) are rebuilt
in the background once older than their TTL, each from its own read-only connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from pipeline.api.cache import Refreshing
from pipeline.catalog import Catalog, load_catalog
from pipeline.delivery.payload import idempotency_key
from pipeline.emails import RenderedEmail, render_email
from pipeline.errors import ProfileNotFoundError
from pipeline.recommend import Recommendation, RecommendationSignals, recommend, signals_from_events
from pipeline.scoring import Profile, ScoreBreakdown, intent_stage, interaction_score
from pipeline.scoring import profile_from_dict as _profile_from_dict
from pipeline.segments import SegmentRule, evaluate, load_segments
from pipeline.sendtime import SendTime, best_send_time, population_prior
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse
from pipeline.triggers import TRIGGER_KINDS


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Population:
    """Population-wide figures at ``at_ms``: the send-time prior and each segment's members."""

    at_ms: int
    customers: int
    prior: tuple[float, ...]
    members: dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class CustomerView:
    """A stored profile with its score, stage and segments re-evaluated at ``at_ms``."""

    requested_id: str
    stored: dict[str, Any]
    profile: Profile
    at_ms: int
    score: ScoreBreakdown
    intent_stage: str
    segments: frozenset[str]


@dataclass(frozen=True, slots=True)
class CampaignEmail:
    """One rendered email of a campaign, its recipient and delivery key (None for a triggered
    campaign: each trigger occurrence is sent under a key of its own, made at delivery)."""

    to: str | None
    send_time: SendTime
    idempotency_key: str | None
    email: RenderedEmail


@dataclass(frozen=True, slots=True)
class CampaignRender:
    """The emails rendered for a segment's members (at most ``limit``)."""

    campaign_id: str
    segment: str
    at_ms: int
    members: int
    emails: list[CampaignEmail]


class PersonalizationService:
    """Profiles, recommendations, send times and emails for the API, at the clock's now."""

    def __init__(
        self,
        settings: Settings,
        warehouse_path: Path | None = None,
        *,
        catalog: Catalog | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        background_refresh: bool = True,
    ) -> None:
        self.settings = settings
        self.config = settings.api
        self.warehouse_path = Path(warehouse_path or settings.warehouse_path)
        self.catalog = catalog if catalog is not None else load_catalog(settings.catalog_path)
        self.rules: list[SegmentRule] = load_segments(settings.segments_path)
        self._rules_by_name = {rule.name: rule for rule in self.rules}
        self.clock_ms = clock_ms
        self._lock = threading.Lock()
        self._warehouse: LocalWarehouse | None = None
        self.signals = Refreshing(
            "signals",
            self._build_signals,
            self.config.signals_ttl_s,
            background=background_refresh,
        )
        self.population = Refreshing(
            "population",
            self._build_population,
            self.config.population_ttl_s,
            background=background_refresh,
        )

    def close(self) -> None:
        self.signals.join(5)
        self.population.join(5)
        with self._lock:
            if self._warehouse is not None:
                self._warehouse.close()
                self._warehouse = None

    def warm(self) -> bool:
        """Whether the shared caches (signals, population) are built: a call then answers in
        about a millisecond, where the first build reads up to ``signals_max_events`` events."""
        return self.signals.ready and self.population.ready

    def warehouse_ready(self) -> bool:
        return self.warehouse_path.exists()

    def _stored(self, customer_id: str) -> dict[str, Any]:
        """The stored profile (following merges); opens the shared connection on first use."""
        with self._lock:
            if self._warehouse is None:
                self._warehouse = LocalWarehouse(self.warehouse_path, read_only=True)
            return self._warehouse.get_profile(customer_id)

    def _build_signals(self) -> RecommendationSignals:
        window_ms = int(self.config.signals_window_days * 86_400_000)
        with LocalWarehouse(self.warehouse_path, read_only=True) as wh:
            rows = wh.query(
                "SELECT payload FROM events WHERE event_ts_ms >= "
                "(SELECT MAX(event_ts_ms) FROM events) - ? "
                "ORDER BY event_ts_ms DESC LIMIT ?",
                (window_ms, self.config.signals_max_events),
            )
        events = [orjson.loads(p) for p in reversed(rows["payload"].tolist())] if len(rows) else []
        return signals_from_events(events, self.config.recommend)

    def _build_population(self) -> Population:
        at_ms = self.clock_ms()
        with LocalWarehouse(self.warehouse_path, read_only=True) as wh:
            rows = wh.query(
                "SELECT profile FROM profiles WHERE merged_into IS NULL ORDER BY customer_id"
            )
        profiles = [_profile_from_dict(orjson.loads(p)) for p in rows["profile"].tolist()]
        members: dict[str, list[str]] = {rule.name: [] for rule in self.rules}
        customers = 0
        for profile in profiles:
            if profile.is_anonymous:
                continue
            customers += 1
            for name in evaluate(profile, at_ms, self.rules, scoring=self.settings.scoring):
                members[name].append(profile.customer_id)
        prior = population_prior(profiles, self.config.send_time)
        return Population(
            at_ms=at_ms,
            customers=customers,
            prior=tuple(prior),
            members={name: tuple(ids) for name, ids in members.items()},
        )

    def customer(self, customer_id: str) -> CustomerView:
        """The profile of ``customer_id`` with score, stage and segments now."""
        stored = self._stored(customer_id)
        profile = _profile_from_dict(stored)
        at_ms = self.clock_ms()
        scoring = self.settings.scoring
        return CustomerView(
            requested_id=customer_id,
            stored=stored,
            profile=profile,
            at_ms=at_ms,
            score=interaction_score(profile, at_ms, scoring),
            intent_stage=intent_stage(profile, at_ms, scoring),
            segments=evaluate(profile, at_ms, self.rules, scoring=scoring),
        )

    def _recommend(self, profile: Profile, k: int, at_ms: int) -> list[Recommendation]:
        return recommend(
            profile,
            self.catalog,
            k=k,
            signals=self.signals.get(),
            params=self.config.recommend,
            at_ms=at_ms,
        )

    def recommendations(
        self, customer_id: str, k: int
    ) -> tuple[Profile, int, list[Recommendation]]:
        """``(profile, at_ms, up to k recommendations)`` for ``customer_id`` now."""
        profile = _profile_from_dict(self._stored(customer_id))
        at_ms = self.clock_ms()
        return profile, at_ms, self._recommend(profile, k, at_ms)

    def _send_time(self, profile: Profile, at_ms: int) -> SendTime:
        prior = self.population.get().prior
        return best_send_time(profile, prior, at_ms=at_ms, params=self.config.send_time)

    def send_time(self, customer_id: str) -> tuple[Profile, SendTime]:
        """The next best send time of ``customer_id`` after now."""
        profile = _profile_from_dict(self._stored(customer_id))
        return profile, self._send_time(profile, self.clock_ms())

    def _render(
        self, profile: Profile, campaign_id: str, at_ms: int, segments: frozenset[str]
    ) -> tuple[RenderedEmail, SendTime]:
        config = self.config
        send_time = self._send_time(profile, at_ms)
        email = render_email(
            profile,
            self._recommend(profile, config.email_items, at_ms),
            send_time,
            self.catalog,
            campaign_id=campaign_id,
            unsubscribe_url=config.unsubscribe_url.replace(
                "{customer_id}", quote(profile.customer_id, safe="")
            ),
            as_of_ms=at_ms,
            segments=segments,
            scoring=self.settings.scoring,
            parameters={
                "recommend": config.recommend.model_dump(),
                "send_time": config.send_time.model_dump(),
            },
            params=config.email,
        )
        return email, send_time

    def email(self, customer_id: str, campaign_id: str) -> RenderedEmail:
        """The email ``customer_id`` would get in ``campaign_id`` if it were rendered now."""
        profile = _profile_from_dict(self._stored(customer_id))
        at_ms = self.clock_ms()
        segments = evaluate(profile, at_ms, self.rules, scoring=self.settings.scoring)
        return self._render(profile, campaign_id, at_ms, segments)[0]

    def _campaign_email(
        self, profile: Profile, campaign_id: str, at_ms: int, segments: frozenset[str]
    ) -> CampaignEmail:
        email, send_time = self._render(profile, campaign_id, at_ms, segments)
        to = profile.traits.get("email")
        return CampaignEmail(
            to=to if isinstance(to, str) else None,
            send_time=send_time,
            idempotency_key=(
                None
                if campaign_id in TRIGGER_KINDS
                else idempotency_key(campaign_id, profile.customer_id)
            ),
            email=email,
        )

    def campaign_email(self, customer_id: str, campaign_id: str) -> CampaignEmail:
        """:meth:`email` with its send time, recipient and delivery key (the workbench preview)."""
        profile = _profile_from_dict(self._stored(customer_id))
        at_ms = self.clock_ms()
        segments = evaluate(profile, at_ms, self.rules, scoring=self.settings.scoring)
        return self._campaign_email(profile, campaign_id, at_ms, segments)

    def has_segment(self, name: str) -> bool:
        return name in self._rules_by_name

    def render_campaign(self, campaign_id: str, segment: str, limit: int) -> CampaignRender:
        """Emails for up to ``limit`` members of ``segment``; membership is re-checked now."""
        population = self.population.get()
        at_ms = self.clock_ms()
        members = population.members.get(segment, ())
        scoring = self.settings.scoring
        emails: list[CampaignEmail] = []
        for customer_id in members:
            if len(emails) >= limit:
                break
            try:
                profile = _profile_from_dict(self._stored(customer_id))
            except ProfileNotFoundError:
                continue
            segments = evaluate(profile, at_ms, self.rules, scoring=scoring)
            if segment not in segments:
                continue
            emails.append(self._campaign_email(profile, campaign_id, at_ms, segments))
        return CampaignRender(campaign_id, segment, at_ms, len(members), emails)

    def segment_sizes(self) -> tuple[Population, list[tuple[SegmentRule, int]]]:
        """The population snapshot and each rule with its member count."""
        population = self.population.get()
        return population, [(r, len(population.members.get(r.name, ()))) for r in self.rules]
