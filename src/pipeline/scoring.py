"""Profile scoring: documented formulas over plain data, no IO.

A profile keeps exponentially decayed sums referenced to ``as_of_ms`` (the newest event time
it has seen). Adding an event at time ``t``:

* if ``t > as_of``: every decayed sum is first multiplied by ``2 ** (-(t - as_of) / h)``
  and ``as_of`` moves to ``t``; then the event adds its weight ``w``;
* if ``t <= as_of`` (a late event): it adds ``w * 2 ** (-(as_of - t) / h)``.

Either way the sum equals ``sum_i w_i * 2 ** (-(as_of - t_i) / h)``, so the result does not
depend on arrival order: decay runs on event time, not processing time.

Customer Interaction Score at time ``t`` (0..100)::

    s_R = 2 ** (-(t - last_seen) / h_recency)
    s_F = 1 - exp(-engagement(t) / frequency_saturation)
    s_M = 1 - exp(-monetary(t) / monetary_saturation)
    CIS = 100 * (w_R * s_R + w_F * s_F + w_M * s_M)      with w_R + w_F + w_M = 1

Engagement is a signed sum (``Product Removed`` weighs -1); ``s_F`` uses ``max(0, engagement)``.
Affinities are clamped at 0 after every event (a removal can cancel interest, never make it
negative; an entry at 0 is dropped), so they are order-independent only for event sets without
negative weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.events import ALIAS_EVENT, IDENTIFY_EVENT, CleanEvent

IntentStage = Literal["browsing", "cart", "purchased", "lapsed"]

DAY_MS = 86_400_000
HOURS_PER_WEEK = 168
HOUR_MS = 3_600_000

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "Page Viewed": 0.5,
    "Product Viewed": 1.0,
    "Product Clicked": 2.0,
    "Product Added": 5.0,
    "Product Removed": -1.0,
    "Cart Viewed": 2.0,
    "Checkout Started": 6.0,
    "Order Completed": 10.0,
    "Email Opened": 1.0,
    "Email Clicked": 3.0,
    "Scroll Depth": 0.5,
    "Video Played": 1.5,
    "Signed Up": 3.0,
    "Logged In": 1.0,
    "Identify": 0.0,
    "Alias": 0.0,
}


class ScoringParams(BaseModel):
    """Every parameter of the scoring formulas; lives in settings, never hard-coded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engagement_half_life_days: float = Field(14.0, gt=0)
    affinity_half_life_days: float = Field(30.0, gt=0)
    monetary_half_life_days: float = Field(90.0, gt=0)
    recency_half_life_days: float = Field(14.0, gt=0)
    frequency_saturation: float = Field(20.0, gt=0)
    monetary_saturation: float = Field(200.0, gt=0)
    weight_recency: float = Field(0.3, ge=0)
    weight_frequency: float = Field(0.4, ge=0)
    weight_monetary: float = Field(0.3, ge=0)
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    cart_window_hours: float = Field(72.0, gt=0)
    purchased_window_days: float = Field(14.0, gt=0)
    lapsed_after_days: float = Field(30.0, gt=0)
    recent_views_kept: int = Field(20, ge=0)
    purchases_kept: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> ScoringParams:
        total = self.weight_recency + self.weight_frequency + self.weight_monetary
        if abs(total - 1.0) > 1e-9:
            raise ValueError(
                f"weight_recency + weight_frequency + weight_monetary = {total}, not 1"
            )
        return self


@dataclass(slots=True)
class Profile:
    """The live state of one customer (or one not-yet-identified device, ``anon:<id>``).

    Mutable on purpose: the stream folds thousands of events a second into it.
    """

    customer_id: str
    is_anonymous: bool
    anonymous_ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged_into: str | None = None
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    as_of_ms: int | None = None
    event_count: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    engagement: float = 0.0
    monetary: float = 0.0
    revenue_total: float = 0.0
    order_count: int = 0
    last_order_ms: int | None = None
    last_cart_ms: int | None = None
    last_view_ms: int | None = None
    category_affinity: dict[str, float] = field(default_factory=dict)
    brand_affinity: dict[str, float] = field(default_factory=dict)
    hour_of_week: dict[str, float] = field(default_factory=dict)
    sessions: int = 0
    last_session_id: str | None = None
    # the newest SESSIONS_KEPT session ids: two tabs or devices taking turns count once each
    recent_sessions: list[str] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)
    timezone: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    recent_views: list[str] = field(default_factory=list)
    cart: dict[str, int] = field(default_factory=dict)
    # The cart as a function of event time, not arrival order: per product, its adds (+) and
    # removals (-) since its newest order, and the time of that order (the newest
    # CART_CLOSED_KEPT); ``cart`` is their running sum in event-time order, never below zero.
    cart_log: dict[str, list[list[int]]] = field(default_factory=dict)
    cart_closed_ms: dict[str, int] = field(default_factory=dict)
    purchased: list[str] = field(default_factory=list)
    cis: float = 0.0
    intent_stage: IntentStage = "browsing"
    version: int = 0
    updated_ms: int = 0
    # Event time of the newest Identify merged into traits, so a late one cannot overwrite it.
    traits_ms: int | None = None
    segments: list[str] = field(default_factory=list)
    # The stream's clock (event time) when segments were last evaluated without a new event
    # (pipeline.stream.stages: ticks), so that a late event does not turn the clock back.
    segments_ms: int | None = None


ITEM_EVENTS = frozenset({"Order Completed", "Cart Viewed", "Checkout Started"})
VIEW_EVENTS = frozenset({"Product Viewed", "Product Clicked"})
EMAIL_EVENTS = frozenset({"Email Opened", "Email Clicked"})
NON_ENGAGEMENT_EVENTS = frozenset({IDENTIFY_EVENT, ALIAS_EVENT})
# An email open or click says when the customer reads mail, the very thing send-time
# optimization predicts, so it counts three times as much as a site visit in the histogram.
EMAIL_HOUR_WEIGHT = 3.0
HOUR_WEIGHT = 1.0

_exp2 = math.exp2
_exp = math.exp


def decay_factor(dt_ms: int, half_life_days: float) -> float:
    """``2 ** (-dt / h)``: the weight left after ``dt_ms`` with half-life ``h`` days (dt >= 0)."""
    return _exp2(-dt_ms / (half_life_days * DAY_MS))


def new_profile(customer_id: str, *, is_anonymous: bool) -> Profile:
    """An empty profile for a customer, or for a device (``anon:<id>``) not yet identified."""
    return Profile(customer_id=customer_id, is_anonymous=is_anonymous)


@lru_cache(maxsize=1024)
def _zone(tz: str) -> tzinfo:
    """The zone named ``tz``; an unknown or malformed name falls back to UTC (so does a name
    that is a folder of the time-zone database, "Europe", which raises IsADirectoryError)."""
    if tz == "UTC":
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return UTC


@lru_cache(maxsize=1024)
def known_zone(tz: str) -> bool:
    """Whether ``tz`` names a zone of the time-zone database. Only a known zone becomes the
    profile's: an empty or unknown name (any string passes the schema) would otherwise stand
    in for the customer's real zone, which then never replaces it, while it reads as UTC."""
    return tz == "UTC" or _zone(tz) is not UTC


def _has_zone_trait(profile: Profile) -> bool:
    """Whether the traits name a known zone: that wins over the events' zones."""
    tz = profile.traits.get("timezone")
    return type(tz) is str and known_zone(tz)


def _quantity(value: object) -> int:
    """A line's quantity: a positive whole number (JSON Schema's integers include 3.0), else 1."""
    if type(value) is int and value >= 1:
        return value
    if type(value) is float and value >= 1 and value.is_integer():
        return int(value)
    return 1


def hour_of_week_bin(ts_ms: int, tz: str) -> int:
    """Local hour of the week in ``tz`` (0..167, Monday 00:00-00:59 is 0); unknown tz is UTC."""
    local = datetime.fromtimestamp(ts_ms / 1000, _zone(tz))
    return local.weekday() * 24 + local.hour


def _add_affinity(affinity: dict[str, float], key: str, amount: float) -> None:
    """Add to one affinity, dropping it when it falls to 0 or below (the clamp at 0)."""
    value = affinity.get(key, 0.0) + amount
    if value > 0.0:
        affinity[key] = value
    else:
        affinity.pop(key, None)


def _rescale(affinity: dict[str, float], ratio: float) -> None:
    """Decay every entry in place when ``as_of`` moves forward (no new dict per event)."""
    for key in affinity:
        affinity[key] *= ratio


def _push_recent(items: list[str], product_ids: list[str], newest: bool, cap: int) -> None:
    """Keep ``items`` most recent first, unique, at most ``cap`` long.

    A late event (``newest`` false) cannot say where its products belong among newer ones,
    so they only fill free room at the back.
    """
    if newest:
        for pid in reversed(product_ids):
            if pid in items:
                items.remove(pid)
            items.insert(0, pid)
        del items[cap:]
    else:
        for pid in product_ids:
            if len(items) >= cap:
                break
            if pid not in items:
                items.append(pid)


def apply_event(
    profile: Profile, event: CleanEvent, params: ScoringParams, *, processed_ms: int
) -> None:
    """Fold one enriched event into ``profile`` in place; decayed sums follow the module formulas.

    Decay runs on event time, so late events land where they belong; ``processed_ms`` only
    stamps ``updated_ms``.
    """
    t = event.timestamp_ms
    name = event.name
    weight = params.event_weights.get(name, 0.0)
    zone = event.timezone
    if zone and not known_zone(zone):
        zone = None  # read as UTC, it would put the hour off in the customer's zone

    profile.event_count += 1
    profile.version += 1
    counts = profile.counts
    counts[name] = counts.get(name, 0) + 1

    as_of = profile.as_of_ms
    if as_of is None or profile.first_seen_ms is None or profile.last_seen_ms is None:
        profile.first_seen_ms = profile.last_seen_ms = profile.as_of_ms = t
        f_eng = f_mon = f_aff = 1.0
    elif t > as_of:
        dt = t - as_of
        profile.engagement *= _exp2(-dt / (params.engagement_half_life_days * DAY_MS))
        profile.monetary *= _exp2(-dt / (params.monetary_half_life_days * DAY_MS))
        ratio = _exp2(-dt / (params.affinity_half_life_days * DAY_MS))
        _rescale(profile.category_affinity, ratio)
        _rescale(profile.brand_affinity, ratio)
        profile.as_of_ms = profile.last_seen_ms = t
        f_eng = f_mon = f_aff = 1.0
    else:
        dt = as_of - t
        if dt == 0:
            f_eng = f_mon = f_aff = 1.0
        else:
            f_eng = _exp2(-dt / (params.engagement_half_life_days * DAY_MS))
            f_mon = _exp2(-dt / (params.monetary_half_life_days * DAY_MS))
            f_aff = _exp2(-dt / (params.affinity_half_life_days * DAY_MS))
        if t < profile.first_seen_ms:
            profile.first_seen_ms = t

    if weight != 0.0:
        profile.engagement += weight * f_eng
        if name in ITEM_EVENTS and event.items:
            share = weight * f_aff / len(event.items)
            for item in event.items:
                if item.category is not None:
                    _add_affinity(profile.category_affinity, item.category, share)
                if item.brand is not None:
                    _add_affinity(profile.brand_affinity, item.brand, share)
        else:
            amount = weight * f_aff
            if event.category is not None:
                _add_affinity(profile.category_affinity, event.category, amount)
            if event.brand is not None:
                _add_affinity(profile.brand_affinity, event.brand, amount)
        if zone and not _has_zone_trait(profile):
            adopt_timezone(profile, zone, t)  # before its own hour is binned
        if weight > 0.0 and name not in NON_ENGAGEMENT_EVENTS:
            tz = zone or profile.timezone or "UTC"
            key = str(hour_of_week_bin(t, tz))
            hours = profile.hour_of_week
            bump = EMAIL_HOUR_WEIGHT if name in EMAIL_EVENTS else HOUR_WEIGHT
            hours[key] = hours.get(key, 0.0) + bump

    if name == "Order Completed":
        _apply_order(profile, event, params, t, f_mon)
    elif name == "Product Added":
        pid = event.product_id
        if pid is not None:
            _cart_change(profile, pid, t, _quantity(event.properties.get("quantity", 1)))
        if profile.last_cart_ms is None or t > profile.last_cart_ms:
            profile.last_cart_ms = t
    elif name == "Product Removed":
        pid = event.product_id
        if pid is not None:
            _cart_change(profile, pid, t, -_quantity(event.properties.get("quantity", 1)))
    elif name in VIEW_EVENTS:
        newest = profile.last_view_ms is None or t >= profile.last_view_ms
        if newest:
            profile.last_view_ms = t
        if event.product_id is not None:
            _push_recent(profile.recent_views, [event.product_id], newest, params.recent_views_kept)
    elif name == IDENTIFY_EVENT:
        _merge_traits(profile, event.traits, t)

    session = event.session_id
    if session is not None:
        seen = profile.recent_sessions
        if not seen and profile.last_session_id is not None:
            seen.append(profile.last_session_id)  # (a profile from before this list)
        if session not in seen:
            profile.sessions += 1
            seen.append(session)
            if len(seen) > SESSIONS_KEPT:
                del seen[0]
        profile.last_session_id = session
    device = event.device_type
    if device is not None:
        profile.devices[device] = profile.devices.get(device, 0) + 1
    if zone and not _has_zone_trait(profile):
        adopt_timezone(profile, zone, t)

    profile.cis = _cis(profile, profile.as_of_ms, params)
    profile.intent_stage = intent_stage(profile, profile.as_of_ms, params)
    profile.updated_ms = processed_ms


def _apply_order(
    profile: Profile, event: CleanEvent, params: ScoringParams, t: int, f_mon: float
) -> None:
    """Order bookkeeping: counts, revenue, decayed monetary value, purchases, cart clean-up."""
    items = event.items
    revenue = event.revenue
    if revenue is None:
        revenue = sum(item.price * item.quantity for item in items)
    profile.order_count += 1
    profile.revenue_total += revenue
    profile.monetary += revenue * f_mon
    newest = profile.last_order_ms is None or t >= profile.last_order_ms
    if newest:
        profile.last_order_ms = t
    if items:
        bought = [item.product_id for item in items]
    elif event.product_id is not None:
        bought = [event.product_id]
    else:
        return
    _push_recent(profile.purchased, bought, newest, params.purchases_kept)
    for pid in bought:  # a checkout takes the line, whatever quantity it names
        _cart_change(profile, pid, t, None)


SESSIONS_KEPT = 10
CART_CLOSED_KEPT = 50  # late events older than the 50th newest order are rare: small profiles
CART_LOG_KEPT = 20  # changes kept per line; older ones are summed into one


def _cart_change(profile: Profile, pid: str, t: int, delta: int | None) -> None:
    """An add (``delta`` > 0), a removal (< 0) or an order (None: the line is bought) of
    ``pid`` at event time ``t``, applied so that the cart does not depend on arrival order:
    a change from before the product's newest order is part of what that order took; the line
    is the running sum of the changes since, in event-time order (adds first within the same
    millisecond), never below zero."""
    closed = profile.cart_closed_ms
    log = profile.cart_log.get(pid)
    if log is None:
        # a line from before the log was kept: one add at the newest add-to-cart time
        held = profile.cart.get(pid)
        log = [[profile.last_cart_ms or 0, held]] if held else []
    if delta is None:
        closed[pid] = max(closed.get(pid, t), t)
        if len(closed) > CART_CLOSED_KEPT:
            del closed[min(closed, key=closed.__getitem__)]
        log = [change for change in log if change[0] > t]
    elif t > closed.get(pid, t - 1):
        log.append([t, delta])
    log.sort(key=lambda change: (change[0], -change[1]))
    if len(log) > CART_LOG_KEPT:
        cut = len(log) - CART_LOG_KEPT + 1
        folded, at = _running(log[:cut]), log[cut - 1][0]
        log = log[cut:]
        if folded:
            log.insert(0, [at, folded])
    held = _running(log)
    if log:
        profile.cart_log[pid] = log
    else:
        profile.cart_log.pop(pid, None)
    if held > 0:
        profile.cart[pid] = held
    else:
        profile.cart.pop(pid, None)


def _running(changes: list[list[int]]) -> int:
    """The quantity after ``changes`` in order, never below zero."""
    held = 0
    for _, delta in changes:
        held = max(0, held + delta)
    return held


def _merge_traits(profile: Profile, traits: dict[str, Any], t: int) -> None:
    """Merge identify traits: a newer identify wins per field, a late one only fills gaps.

    Null values never erase a known trait. A ``timezone`` trait wins over context timezones.
    """
    merged = profile.traits
    if profile.traits_ms is None or t >= profile.traits_ms:
        profile.traits_ms = t
        for key, value in traits.items():
            if value is not None:
                merged[key] = value
    else:
        for key, value in traits.items():
            if value is not None and key not in merged:
                merged[key] = value
    tz = merged.get("timezone")
    if isinstance(tz, str) and tz:
        adopt_timezone(profile, tz, t)


def adopt_timezone(profile: Profile, tz: str, at_ms: int) -> None:
    """Set the profile's time zone. The first one known also moves the send-time histogram's
    bins, counted in UTC until then (server-side email opens carry no zone), to local hours at
    the zone's offset at ``at_ms``: the histogram is read in the profile's zone, and the opens
    must not land hours off depending on whether they arrived before the zone did. An empty
    or unknown name changes nothing (:func:`known_zone`)."""
    if not tz or not known_zone(tz):
        return
    if profile.timezone is None and profile.hour_of_week:
        offset = datetime.fromtimestamp(at_ms / 1000, _zone(tz)).utcoffset()
        seconds = offset.total_seconds() if offset is not None else 0.0
        profile.hour_of_week = shift_hours(profile.hour_of_week, seconds / 3600)
    profile.timezone = tz


def shift_hours(histogram: dict[str, float], hours: float) -> dict[str, float]:
    """An hour-of-week histogram moved ``hours`` later (a zone's UTC offset, in hours).

    A whole number of hours moves each bin; a fraction (India +5:30, Nepal +5:45,
    Newfoundland -3:30) splits each bin between the two local hours it overlaps, in proportion
    (UTC 10:00-10:59 is 15:30-16:29 in India: half in 15, half in 16), since the minute of
    each count is gone. Rounding instead put half of those counts an hour off.
    """
    whole = math.floor(hours)
    later = hours - whole  # the share that spills into the next local hour
    if later < 1e-9:
        later = 0.0
    moved: dict[str, float] = {}
    for key, value in histogram.items():
        first = (int(key) + whole) % HOURS_PER_WEEK
        for b, share in ((first, 1.0 - later), ((first + 1) % HOURS_PER_WEEK, later)):
            if share > 0:
                moved[str(b)] = moved.get(str(b), 0.0) + value * share
    return moved


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """The Customer Interaction Score (0..100) and its three components (each 0..1)."""

    score: float
    recency: float
    frequency: float
    monetary: float


def _components(profile: Profile, at_ms: int, params: ScoringParams) -> tuple[float, float, float]:
    """``(s_R, s_F, s_M)`` at ``at_ms``; times before ``as_of`` read as ``as_of`` (no un-decay)."""
    last_seen = profile.last_seen_ms
    as_of = profile.as_of_ms
    if last_seen is None or as_of is None:
        return 0.0, 0.0, 0.0
    s_r = _exp2(-max(0, at_ms - last_seen) / (params.recency_half_life_days * DAY_MS))
    dt = max(0, at_ms - as_of)
    engagement = profile.engagement * _exp2(-dt / (params.engagement_half_life_days * DAY_MS))
    monetary = profile.monetary * _exp2(-dt / (params.monetary_half_life_days * DAY_MS))
    s_f = 1.0 - _exp(-max(0.0, engagement) / params.frequency_saturation)
    s_m = 1.0 - _exp(-max(0.0, monetary) / params.monetary_saturation)
    return s_r, s_f, s_m


def _cis(profile: Profile, at_ms: int | None, params: ScoringParams) -> float:
    if at_ms is None:
        return 0.0
    s_r, s_f, s_m = _components(profile, at_ms, params)
    return 100.0 * (
        params.weight_recency * s_r + params.weight_frequency * s_f + params.weight_monetary * s_m
    )


def interaction_score(profile: Profile, at_ms: int, params: ScoringParams) -> ScoreBreakdown:
    """The Customer Interaction Score at ``at_ms`` per the module formulas; unseen profile → 0."""
    s_r, s_f, s_m = _components(profile, at_ms, params)
    score = 100.0 * (
        params.weight_recency * s_r + params.weight_frequency * s_f + params.weight_monetary * s_m
    )
    return ScoreBreakdown(score=score, recency=s_r, frequency=s_f, monetary=s_m)


def intent_stage(profile: Profile, at_ms: int | None, params: ScoringParams) -> IntentStage:
    """Where the customer stands at ``at_ms``, first match wins (bounds are inclusive):

    ``lapsed`` if not seen for more than ``lapsed_after_days``; ``purchased`` if the last order
    is no older than the last cart add and at most ``purchased_window_days`` old; ``cart`` if the
    last add is newer than the last order, at most ``cart_window_hours`` old and the cart is not
    empty; otherwise ``browsing`` (also for a profile never seen).
    """
    last_seen = profile.last_seen_ms
    if last_seen is None or at_ms is None:
        return "browsing"
    if at_ms - last_seen > params.lapsed_after_days * DAY_MS:
        return "lapsed"
    last_order = profile.last_order_ms
    last_cart = profile.last_cart_ms
    if (
        last_order is not None
        and last_order >= (last_cart or 0)
        and at_ms - last_order <= params.purchased_window_days * DAY_MS
    ):
        return "purchased"
    if (
        last_cart is not None
        and (last_order is None or last_cart > last_order)
        and at_ms - last_cart <= params.cart_window_hours * HOUR_MS
        and profile.cart
    ):
        return "cart"
    return "browsing"


def affinity_shares(affinity: dict[str, float]) -> dict[str, float]:
    """Affinities as shares summing to 1, largest first (ties by name); empty when none positive."""
    positive = [(key, value) for key, value in affinity.items() if value > 0.0]
    total = math.fsum(value for _, value in positive)
    if total <= 0.0:
        return {}
    positive.sort(key=lambda kv: (-kv[1], kv[0]))
    return {key: value / total for key, value in positive}


def merge_provenance(
    profile: Profile, anonymous_id: str, *, linked_ms: int, via_message_id: str
) -> None:
    """Record that ``anonymous_id`` was merged into this profile, when and by which message.

    Idempotent and order-independent: replays keep the earliest link.
    """
    known = profile.anonymous_ids.get(anonymous_id)
    if known is None or linked_ms < known["linked_ms"]:
        profile.anonymous_ids[anonymous_id] = {"linked_ms": linked_ms, "via": via_message_id}


def profile_to_dict(p: Profile, *, copy: bool = True) -> dict[str, Any]:
    """A JSON-safe dict of the profile, for state stores and topics: its containers copied, or
    with ``copy=False`` shared with ``p`` (for a caller that serializes it or never changes
    ``p`` again, as the stream's fold does: a state store serializes the value it is given)."""
    if not copy:
        return {name: getattr(p, name) for name in _FIELDS}
    return {
        "customer_id": p.customer_id,
        "is_anonymous": p.is_anonymous,
        "anonymous_ids": {k: dict(v) for k, v in p.anonymous_ids.items()},
        "merged_into": p.merged_into,
        "first_seen_ms": p.first_seen_ms,
        "last_seen_ms": p.last_seen_ms,
        "as_of_ms": p.as_of_ms,
        "event_count": p.event_count,
        "counts": dict(p.counts),
        "engagement": p.engagement,
        "monetary": p.monetary,
        "revenue_total": p.revenue_total,
        "order_count": p.order_count,
        "last_order_ms": p.last_order_ms,
        "last_cart_ms": p.last_cart_ms,
        "last_view_ms": p.last_view_ms,
        "category_affinity": dict(p.category_affinity),
        "brand_affinity": dict(p.brand_affinity),
        "hour_of_week": dict(p.hour_of_week),
        "sessions": p.sessions,
        "last_session_id": p.last_session_id,
        "recent_sessions": list(p.recent_sessions),
        "devices": dict(p.devices),
        "timezone": p.timezone,
        "traits": dict(p.traits),
        "recent_views": list(p.recent_views),
        "cart": dict(p.cart),
        "cart_log": {pid: [list(c) for c in log] for pid, log in p.cart_log.items()},
        "cart_closed_ms": dict(p.cart_closed_ms),
        "purchased": list(p.purchased),
        "cis": p.cis,
        "intent_stage": p.intent_stage,
        "version": p.version,
        "updated_ms": p.updated_ms,
        "traits_ms": p.traits_ms,
        "segments": list(p.segments),
        "segments_ms": p.segments_ms,
    }


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Profile))
_FIELD_SET = frozenset(_FIELDS)


def profile_from_dict(d: dict[str, Any], *, copy: bool = True) -> Profile:
    """Inverse of :func:`profile_to_dict`; fields missing from older state get their defaults.

    ``copy=False`` takes ``d``'s containers over instead of copying them, for a ``d`` nobody
    else holds (a value just read from a state store, which deserializes it afresh).
    """
    g = d.get
    if not copy and d.keys() >= _FIELD_SET:
        return Profile(**{name: d[name] for name in _FIELDS})
    return Profile(
        customer_id=d["customer_id"],
        is_anonymous=d["is_anonymous"],
        anonymous_ids={k: dict(v) for k, v in (g("anonymous_ids") or {}).items()},
        merged_into=g("merged_into"),
        first_seen_ms=g("first_seen_ms"),
        last_seen_ms=g("last_seen_ms"),
        as_of_ms=g("as_of_ms"),
        event_count=g("event_count", 0),
        counts=dict(g("counts") or {}),
        engagement=float(g("engagement", 0.0)),
        monetary=float(g("monetary", 0.0)),
        revenue_total=float(g("revenue_total", 0.0)),
        order_count=g("order_count", 0),
        last_order_ms=g("last_order_ms"),
        last_cart_ms=g("last_cart_ms"),
        last_view_ms=g("last_view_ms"),
        category_affinity=dict(g("category_affinity") or {}),
        brand_affinity=dict(g("brand_affinity") or {}),
        hour_of_week=dict(g("hour_of_week") or {}),
        sessions=g("sessions", 0),
        last_session_id=g("last_session_id"),
        recent_sessions=list(g("recent_sessions") or ()),
        devices=dict(g("devices") or {}),
        timezone=g("timezone"),
        traits=dict(g("traits") or {}),
        recent_views=list(g("recent_views") or ()),
        cart=dict(g("cart") or {}),
        cart_log={pid: [list(c) for c in log] for pid, log in (g("cart_log") or {}).items()},
        cart_closed_ms=dict(g("cart_closed_ms") or {}),
        purchased=list(g("purchased") or ()),
        cis=float(g("cis", 0.0)),
        intent_stage=g("intent_stage", "browsing"),
        version=g("version", 0),
        updated_ms=g("updated_ms", 0),
        traits_ms=g("traits_ms"),
        segments=list(g("segments") or ()),
        segments_ms=g("segments_ms"),
    )
