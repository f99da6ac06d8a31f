"""Send-time optimization: the hour of the week a customer most likely reads email.

Each profile keeps ``hour_of_week``: weighted counts ``n_b`` of activity per local hour-of-week
bin ``b`` (0..167, Monday 00:00-00:59 local time is 0; email opens and clicks weigh more, see
:mod:`pipeline.scoring`). With few observations those counts are noise, so they are smoothed
towards the population's distribution ``p`` with a Dirichlet-multinomial model: the prior is
``Dirichlet(alpha * p)`` and the posterior mean of bin ``b`` is::

    theta_b = (n_b + alpha * p_b) / (N + alpha)          N = sum_b n_b

``alpha`` is the prior's weight in pseudo-observations. The best bin is the one with the largest
``theta_b`` among the hours ahead (``horizon_days``), ties to the earliest. ``confidence`` is
``N / (N + alpha)``: the share of the estimate that comes from the customer's own data (0 with
none, the ``fallback`` case, tending to 1 as data accrue); ``probability`` is ``theta_b`` of
the chosen bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.scoring import DAY_MS, HOUR_MS, Profile, _zone

BINS = 168
MINUTE_MS = 60_000
HOURS_PER_DAY = 24

# Relative share of email reading per local hour: low at night, a morning commute and lunch
# bump, the evening peak. Used when there is no population data yet.
DEFAULT_DAILY_CURVE: tuple[float, ...] = (
    0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.3, 0.7, 1.0, 0.9, 0.8, 0.8,
    1.0, 0.9, 0.7, 0.7, 0.8, 0.9, 1.1, 1.4, 1.6, 1.5, 1.0, 0.5,
)  # fmt: skip


class SendTimeParams(BaseModel):
    """Every parameter of send-time optimization (see the module formulas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(10.0, gt=0, description="prior weight in pseudo-observations")
    horizon_days: int = Field(7, ge=1, le=28, description="how far ahead to look for a slot")
    min_lead_minutes: int = Field(0, ge=0, description="earliest slot after the as-of time")
    prior_floor: float = Field(
        0.01, ge=0, lt=1, description="share of a uniform distribution mixed into the prior"
    )
    default_timezone: str = "UTC"
    default_daily_curve: tuple[float, ...] = DEFAULT_DAILY_CURVE

    @field_validator("default_daily_curve")
    @classmethod
    def _curve(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != HOURS_PER_DAY or min(value) < 0 or sum(value) <= 0:
            raise ValueError("default_daily_curve needs 24 non-negative values, not all zero")
        return value


@dataclass(frozen=True, slots=True)
class SendTime:
    """When to send: the next start of the best local hour, and how sure we are of it."""

    send_at_ms: int
    hour_of_week: int
    timezone: str
    confidence: float
    probability: float
    observations: float
    fallback: bool

    @property
    def send_at(self) -> datetime:
        """``send_at_ms`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.send_at_ms / 1000, UTC)

    @property
    def local_time(self) -> datetime:
        """``send_at_ms`` in the customer's time zone."""
        return datetime.fromtimestamp(self.send_at_ms / 1000, _zone(self.timezone))

    def weeks_later_ms(self, weeks: int) -> int:
        """The same local hour ``weeks`` weeks on (a weekly send): across a daylight-saving
        change that is an hour more or less than ``weeks`` * 7 * 24 h in UTC."""
        return round((self.local_time + timedelta(weeks=weeks)).timestamp() * 1000)


def _normalized(weights: Sequence[float], floor: float) -> list[float]:
    """``weights`` scaled to sum to 1, then mixed with ``floor`` of the uniform distribution."""
    total = math.fsum(weights)
    uniform = 1.0 / len(weights)
    if total <= 0:
        return [uniform] * len(weights)
    return [(1.0 - floor) * w / total + floor * uniform for w in weights]


def default_prior(params: SendTimeParams | None = None) -> list[float]:
    """The default curve repeated over the 7 days, normalized: the prior before any data."""
    params = params or SendTimeParams()
    return _normalized(list(params.default_daily_curve) * 7, params.prior_floor)


def histogram(profile: Profile) -> list[float]:
    """The profile's 168 hour-of-week counts; malformed or out-of-range keys are ignored."""
    counts = [0.0] * BINS
    for key, value in profile.hour_of_week.items():
        try:
            b = int(key)
        except ValueError:
            continue
        if 0 <= b < BINS and value > 0:
            counts[b] += value
    return counts


def population_prior(
    profiles: Iterable[Profile], params: SendTimeParams | None = None
) -> list[float]:
    """The population's hour-of-week distribution (168 values summing to 1).

    Each customer's histogram is normalized first, so every customer counts once and heavy
    users do not dominate; with no data at all, :func:`default_prior`.
    """
    params = params or SendTimeParams()
    total = [0.0] * BINS
    customers = 0
    for profile in profiles:
        counts = histogram(profile)
        n = math.fsum(counts)
        if n <= 0:
            continue
        customers += 1
        for b, c in enumerate(counts):
            total[b] += c / n
    if customers == 0:
        return default_prior(params)
    return _normalized(total, params.prior_floor)


def posterior(counts: Sequence[float], prior: Sequence[float], alpha: float) -> list[float]:
    """Posterior mean ``(n_b + alpha * p_b) / (N + alpha)`` of every bin."""
    n = math.fsum(counts)
    return [(c + alpha * p) / (n + alpha) for c, p in zip(counts, prior, strict=True)]


def _offset_ms(at_ms: int, zone: tzinfo) -> int:
    offset = datetime.fromtimestamp(at_ms / 1000, zone).utcoffset()
    return int(offset.total_seconds() * 1000) if offset is not None else 0


def _jumped_at(before_ms: int, after_ms: int, zone: tzinfo) -> int:
    """The first second in ``(before_ms, after_ms]`` with ``after_ms``'s UTC offset: where
    the clocks jumped between the two (bisected; a zone changes offset on a whole second)."""
    target = _offset_ms(after_ms, zone)
    while after_ms - before_ms > 1000:
        middle = (before_ms + after_ms) // 2000 * 1000
        if middle <= before_ms:
            break
        if _offset_ms(middle, zone) == target:
            after_ms = middle
        else:
            before_ms = middle
    return after_ms


def local_hour_starts(after_ms: int, tz: str, hours: int) -> list[tuple[int, int]]:
    """The starts of the next ``hours`` local hours in ``tz`` strictly after ``after_ms``:
    ``(UTC ms, local hour-of-week bin)`` each, in order.

    Walked on the local wall clock, not in steps of an hour of UTC: after a daylight-saving
    change of half an hour (Australia/Lord_Howe) UTC steps would land on local half-hours. A
    local hour that begins in a spring-forward gap starts at its first instant that exists
    (Lord Howe's 02:00 at 02:30); one wholly inside a gap (02:00 where clocks jump to 03:00)
    does not exist and is left out; a repeated hour after a fall-back counts once. The
    first instant of an hour is found where the clocks jumped (bisected), also when the jump
    is not on the hour (St John's jumped at 00:01 until 2010).
    """
    zone = _zone(tz)
    offset_ms = _offset_ms(after_ms, zone)
    wall_ms = after_ms + offset_ms  # local wall time, as ms since the epoch read as UTC
    wall_ms -= wall_ms % HOUR_MS  # the start of the local hour after_ms is in
    starts: list[tuple[int, int]] = []
    previous = after_ms
    while len(starts) < hours:
        wall_ms += HOUR_MS
        at_ms = wall_ms - offset_ms
        # 1970-01-01 was a Thursday (weekday 3)
        weekday, hour = (wall_ms // DAY_MS + 3) % 7, wall_ms // HOUR_MS % HOURS_PER_DAY
        local = datetime.fromtimestamp(at_ms / 1000, zone)
        if local.minute or local.hour != hour or local.weekday() != weekday:
            # the offset changed since the last slot: let the zone place this wall time
            wall = datetime.fromtimestamp(wall_ms / 1000, UTC).replace(tzinfo=zone, fold=0)
            at_ms = round(wall.timestamp() * 1000)
            offset_ms = _offset_ms(at_ms, zone)
            if at_ms + offset_ms != wall_ms:
                # the wall time is in a gap (fold=0 read it with the offset before the jump,
                # so the jump lies after wall - new offset): the hour starts where the clocks
                # jumped, unless the gap took all of it
                at_ms = _jumped_at(wall_ms - offset_ms, at_ms, zone)
                if (at_ms + offset_ms) // HOUR_MS != wall_ms // HOUR_MS:
                    continue
        if at_ms <= previous:
            continue
        starts.append((at_ms, weekday * HOURS_PER_DAY + hour))
        previous = at_ms
    return starts


def best_send_time(
    profile: Profile,
    prior: Sequence[float],
    *,
    at_ms: int,
    params: SendTimeParams | None = None,
) -> SendTime:
    """The next start of the hour with the highest posterior mean within the horizon."""
    params = params or SendTimeParams()
    if len(prior) != BINS:
        raise ValueError(f"prior has {len(prior)} bins, expected {BINS}")
    counts = histogram(profile)
    n = math.fsum(counts)
    theta = posterior(counts, prior, params.alpha)
    tz = profile.timezone or params.default_timezone
    slots = local_hour_starts(
        at_ms + params.min_lead_minutes * MINUTE_MS, tz, params.horizon_days * HOURS_PER_DAY
    )
    best_ms, best_bin = slots[0]
    for t, b in slots[1:]:
        if theta[b] > theta[best_bin]:
            best_ms, best_bin = t, b
    return SendTime(
        send_at_ms=best_ms,
        hour_of_week=best_bin,
        timezone=tz,
        confidence=n / (n + params.alpha),
        probability=theta[best_bin],
        observations=n,
        fallback=n <= 0,
    )


def open_slot_ms(slot_ms: int, now_ms: int, tz: str) -> int:
    """When to send an email planned for the local hour that starts at ``slot_ms``, at
    ``now_ms``: ``slot_ms`` while that hour lasts; once it is over (the process was down, the
    platform too), the same local time on the first later day whose hour has not ended yet.

    A missed send time keeps the customer's best hour instead of going out at whatever local
    hour the sender came back (3 am). Days are counted on the local wall clock, so the hour
    stays put across a daylight-saving change (one that starts in a spring-forward gap is
    read with the offset before the jump, as :func:`datetime.timestamp` does).
    """
    if now_ms < slot_ms + HOUR_MS:
        return slot_ms
    local = datetime.fromtimestamp(slot_ms / 1000, _zone(tz))
    days = max(1, (now_ms - slot_ms) // DAY_MS - 1)  # (a day's wall clock is 23 to 25 h)
    while True:
        at_ms = round((local + timedelta(days=days)).timestamp() * 1000)
        if now_ms < at_ms + HOUR_MS:
            return at_ms
        days += 1
